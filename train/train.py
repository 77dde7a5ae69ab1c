"""Train mmdit end to end: `accelerate launch train/train.py [--config FILE] [section.key=value ...]`.

With no arguments it runs the embedded default (configs/shapes.yaml), fully offline:
  1. data:   generate the synthetic shapes dataset if it is missing;
  2. text:   encode every distinct caption once with the frozen text encoder into the caption cache;
  3. vqvae:  train the VQ-VAE tokenizer, export it, encode every image once into the latent cache;
  4. dit:    train the diffusion transformer on cached latents + cached caption embeddings, export the
             whole pipeline (loadable with TextToImagePipeline.from_pretrained) and write a sample grid.
`train.stage` runs one stage alone (data | vqvae | dit); a later stage reuses what earlier ones wrote.
Everything a run writes goes under `train.output_dir` (the resolved config first).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from mmdit.checkpoints import CheckpointError, DiskFull
from mmdit.cli import ArgumentParser, run_cli
from mmdit.config import ConfigError, load_config
from mmdit.data.loader import DataError
from mmdit.runlock import RunLock, RunLocked
from mmdit.shards import CacheError
from mmdit.stages import check_inputs, run
from mmdit.text_encoder import TextEncoderLoadError
from mmdit.trainer import TrainingDiverged, stop_with_parent
from mmdit.weights import ExportError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "shapes.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.seed=1")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    check_inputs(cfg)
    # One run per output directory; the job's main process holds the lock (if it stops, the launcher stops the rest).
    with RunLock(cfg.train.output_dir) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext():
        run(cfg)


def cli(argv: list[str] | None = None) -> int:
    """The command line. Exit codes: 0 done; 2 and one `error: ...` line for a mistake in the config or the data
    or an output directory another run holds; 1 (one line too) for a diverged run or a full disk; 75 stopped by
    SIGTERM / SIGINT after a checkpoint, resumable by the same command."""
    stop_with_parent()
    return run_cli(main, argv, user_errors=(ConfigError, DataError, TextEncoderLoadError, CheckpointError, RunLocked,
                                              ExportError, CacheError),
                   failures=(TrainingDiverged, DiskFull))


if __name__ == "__main__":
    sys.exit(cli())
