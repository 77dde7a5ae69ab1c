"""The text stage: every caption of the run encoded once by the frozen text encoder into the caption cache."""
from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator
from accelerate.logging import get_logger

from mmdit.config import Config
from mmdit.data.loader import split_captions
from mmdit.text_encoder import CaptionCache, TextEncoder

log = get_logger("mmdit.train")


def cache_captions(cfg: Config, accelerator: Accelerator) -> CaptionCache:
    """Encode every caption of both splits (and the empty and sample prompts) once; later stages only read
    the cache. Captions already cached, by this run or an earlier one, are not encoded again."""
    # Reading the captions first checks the dataset (path, splits, columns) before the encoder loads.
    splits = {s: split_captions(cfg.data, s) for s in (cfg.data.train_split, cfg.data.val_split)
              } if accelerator.is_main_process else {}
    encoder = TextEncoder(cfg.text_encoder.name, max_length=cfg.text_encoder.max_length,
                          trust_remote_code=cfg.text_encoder.trust_remote_code)
    root = Path(cfg.train.cache_dir) / "captions"
    cache = CaptionCache(encoder, root)
    for split, captions in splits.items():
        before = len(cache)
        cache.encode_all(captions)
        log.info(f"captions: {split}: {len(captions)} distinct, {len(cache) - before} newly encoded, "
                 f"cache {cache.dir}")
    if accelerator.is_main_process:
        cache.encode_all(["", *cfg.dit_train.sample_prompts])
    accelerator.wait_for_everyone()
    return cache if accelerator.is_main_process else CaptionCache(encoder, root)  # re-read what the main one wrote
