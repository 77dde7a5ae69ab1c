"""Train mmdit end to end: `accelerate launch train/train.py [--config FILE] [section.key=value ...]`.

With no arguments it runs the embedded default (configs/shapes.yaml), fully offline:
  1. data:  generate the synthetic shapes dataset if it is missing, check both splits load;
  2. text:  encode every distinct caption once with the frozen text encoder into the caption cache.
Everything a run writes goes under `train.output_dir` (the resolved config first).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed

from mmdit.config import ConfigError, load_config
from mmdit.data.loader import DataError, ensure_dataset, split_captions
from mmdit.text_encoder import CaptionCache, TextEncoder, TextEncoderLoadError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "shapes.yaml"
log = get_logger("mmdit.train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.seed=1")
    return parser.parse_args(argv)


def cache_captions(cfg, accelerator: Accelerator) -> CaptionCache:
    """Encode every caption of both splits once; later stages only read the cache."""
    encoder = TextEncoder(cfg.text_encoder.name, max_length=cfg.text_encoder.max_length,
                          trust_remote_code=cfg.text_encoder.trust_remote_code)
    cache = CaptionCache(encoder, Path(cfg.train.cache_dir) / "captions")
    if accelerator.is_main_process:
        for split in (cfg.data.train_split, cfg.data.val_split):
            captions = split_captions(cfg.data, split)
            before = len(cache)
            cache.encode_all(captions)
            log.info(f"captions: {split}: {len(captions)} distinct, {len(cache) - before} newly encoded, "
                     f"cache {cache.dir}")
    accelerator.wait_for_everyone()
    return cache


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    set_seed(cfg.train.seed)

    out = Path(cfg.train.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.yaml")
        ensure_dataset(cfg.data)
    accelerator.wait_for_everyone()
    cache_captions(cfg, accelerator)
    log.info(f"done: run directory {out}")


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError, TextEncoderLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
