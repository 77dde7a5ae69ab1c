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
    the cache. The main process plans the captions not yet cached, by this run or an earlier one, into shards;
    every process encodes its share of them (mmdit/text_encoder.py, CaptionCache.encode_all)."""
    # Reading the captions first checks the dataset (path, splits, columns) before the encoder loads.
    # A streamed train split's captions are not read up front: its latent cache encodes them as it streams.
    names = [cfg.data.val_split] if cfg.data.streaming else [cfg.data.train_split, cfg.data.val_split]
    splits = {s: split_captions(cfg.data, s) for s in names} if accelerator.is_main_process else {}
    encoder = TextEncoder(cfg.text_encoder.name, max_length=cfg.text_encoder.max_length,
                          trust_remote_code=cfg.text_encoder.trust_remote_code)
    cache = CaptionCache(encoder, Path(cfg.train.cache_dir) / "captions")
    before = len(cache) if accelerator.is_main_process else 0
    captions = [c for split in splits.values() for c in split]
    extra = ["", *cfg.dit_train.sample_prompts] if accelerator.is_main_process else []
    # The empty caption and the sample prompts first: the DiT stage finds their rows in the first shard.
    cache.encode_all(extra + captions, accelerator.process_index, accelerator.num_processes,
                     accelerator.wait_for_everyone)
    for split, distinct in splits.items():
        log.info(f"captions: {split}: {len(distinct)} distinct, cache {cache.dir}")
    if accelerator.is_main_process:
        log.info(f"captions: {len(cache) - before} newly encoded by {accelerator.num_processes} processes")
    return cache
