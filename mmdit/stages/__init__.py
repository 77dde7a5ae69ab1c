"""The training stages, in the order a run takes them: data (generated or checked), text (the caption cache),
vqvae (the tokenizer and the latent cache), dit (the generator and the exported pipeline). `run(cfg)` runs
the ones `train.stage` names; train/train.py is its command line."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

from mmdit import precision
from mmdit.checkpoints import checkpoint_stage, remove_partial_saves
from mmdit.cli import check_writable, multi_cpu
from mmdit.config import Config, ConfigError
from mmdit.data.loader import DataError, ensure_dataset

log = get_logger("mmdit.train")


def check_inputs(cfg: Config) -> None:
    """The mistakes that would otherwise surface hours in, or as a traceback: one ConfigError line each."""
    f, p = cfg.vqvae.downsample, cfg.dit.patch_size
    if cfg.data.resolution % (f * p):
        raise ConfigError(f"data.resolution={cfg.data.resolution} is not divisible by the VQ-VAE downsampling {f} "
                          f"x the DiT patch size {p} = {f * p}; accepted: multiples of {f * p}")
    if cfg.train.resume not in ("auto", "never"):
        if not Path(cfg.train.resume).is_dir():
            raise ConfigError(f"train.resume={cfg.train.resume}: no such directory; accepted: auto, never, or a "
                              "checkpoint directory like <output_dir>/dit/checkpoints/step-00000500")
        try:
            stage = checkpoint_stage(cfg.train.resume)
        except ValueError as e:
            raise ConfigError(f"train.resume={cfg.train.resume}: {e}") from None
        if cfg.train.stage not in ("all", stage):
            raise ConfigError(f"train.resume={cfg.train.resume} is a checkpoint of the {stage} stage, which "
                              f"train.stage={cfg.train.stage} does not run; accepted: train.stage=all or {stage}")
    out = Path(cfg.train.output_dir)
    if cfg.train.stage == "dit":
        for need in (out / "vqvae" / "model" / "model.safetensors", out / "latents" / "stats.json"):
            if not need.is_file():
                raise ConfigError(f"train.stage=dit needs the VQ-VAE stage's output, but {need} is missing; "
                                  f"accepted: a train.output_dir where train.stage=vqvae (or all) has run")
    check_writable(out, "train.output_dir")
    check_writable(cfg.train.cache_dir, "train.cache_dir")


def check_enough_rows(n: int, global_batch: int, section: str) -> None:
    if n < global_batch:
        raise DataError(f"the train split has {n} usable images, fewer than one global batch of {global_batch} "
                        f"({section}.batch_size x processes x gradient_accumulation_steps); accepted: a global "
                        f"batch of at most {n}")


def run(cfg: Config) -> None:
    """Every stage `train.stage` asks for, in order, under one Accelerator; see train/train.py."""
    from mmdit.stages.dit import train_dit  # the stage modules import this one's helpers
    from mmdit.stages.text import cache_captions
    from mmdit.stages.vqvae import train_vqvae

    accelerator = Accelerator(mixed_precision=precision.accelerator_precision(cfg.train.mixed_precision), cpu=multi_cpu(),
                              log_with="tensorboard", project_dir=cfg.train.output_dir)
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    if accelerator.device.type == "cpu":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        torch.set_num_threads(cfg.train.cpu_threads or max(1, len(os.sched_getaffinity(0)) // local))

    out = Path(cfg.train.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        remove_partial_saves(out)  # before anything else writes: after a full disk they keep it full
        cfg.save(out / "config.yaml")
        ensure_dataset(cfg.data)
    accelerator.wait_for_everyone()
    accelerator.init_trackers("tensorboard")
    cache = cache_captions(cfg, accelerator)
    if cfg.train.stage in ("all", "vqvae"):
        train_vqvae(cfg, accelerator, out, cache)
    accelerator.wait_for_everyone()
    if cfg.train.stage in ("all", "dit"):
        train_dit(cfg, accelerator, out, cache)
    accelerator.end_training()
    log.info(f"done: run directory {out}")
