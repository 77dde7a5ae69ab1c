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
import copy
import dataclasses
import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed

from mmdit import latents, precision
from mmdit.config import ArgumentParser, Config, ConfigError, DataConfig, check_writable, load_config, run_cli
from mmdit.data.shapes import ATTRIBUTES, judge_accuracy
from mmdit.data.loader import (DataError, ImageCaptions, StreamingImageCaptions, ensure_dataset, iter_examples,
                               open_split, pick_caption, split_captions)
from mmdit.dit import DiT
from mmdit.flow import flow_loss, sample_t
from mmdit.grid import save_grid, to_pil
from mmdit.pipeline import PipelineInfo, TextToImagePipeline
from mmdit.text_encoder import CaptionCache, TextEncoder, TextEncoderLoadError
from mmdit.checkpoints import CheckpointError, DiskFull, checkpoint_stage, remove_partial_saves
from mmdit.runlock import RunLock, RunLocked
from mmdit.trainer import TrainingDiverged, batch_indices, fit, multi_cpu, stop_with_parent
from mmdit.vqvae import VQVAE, code_stats, psnr

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "shapes.yaml"
log = get_logger("mmdit.train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.seed=1")
    return parser.parse_args(argv)


def cache_captions(cfg, accelerator: Accelerator) -> CaptionCache:
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


class StreamBatches:
    """`get_batch` for data.streaming=true: batches of uint8 images (B, 3, R, R) from one stream per shard this
    process draws (one per accumulation micro-batch), each a disjoint part of the dataset (datasets'
    split_dataset_by_node), epoch after epoch. Its position (datasets' state_dict) is checkpointed, so a
    resumed run continues where it stopped; datasets refills the shuffle buffer on resume, so this resume is
    close, not bitwise exact like the in-memory one."""

    def __init__(self, cfg: DataConfig, split: str, shards: range, num_shards: int, batch_size: int):
        self.streams = {s: StreamingImageCaptions(cfg, split, s, num_shards) for s in shards}
        self.batch_size = batch_size
        self.iters: dict = {}  # shard -> its running iterator (absent at the start of an epoch)
        self.in_epoch: dict = {}  # shard -> images it yielded in this epoch (0 at the end: an empty shard)
        self.restored: dict = {}  # shard -> the state loaded from a checkpoint, until it is iterated again

    def __call__(self, step: int, shard: int, num_shards: int) -> torch.Tensor:
        stream, images = self.streams[shard], []
        self.restored.pop(shard, None)
        while len(images) < self.batch_size:
            if shard not in self.iters:
                self.iters[shard], self.in_epoch[shard] = iter(stream), 0
            item = next(self.iters[shard], None)
            if item is None:  # the end of this shard's epoch; the next one is reshuffled
                if self.in_epoch[shard] == 0:
                    raise DataError(f"shard {shard} of {num_shards} of the streamed split has no usable images; "
                                    "accepted: a dataset with at least as many files as shards, or fewer processes")
                del self.iters[shard]
                stream.set_epoch(stream.epoch + 1)
                continue
            self.in_epoch[shard] += 1
            images.append(item["image"])
        return torch.stack(images)

    def state_dict(self) -> dict:
        return {str(s): self.restored.get(s) or (stream.ds.state_dict() if s in self.iters else {"epoch": stream.epoch})
                for s, stream in self.streams.items()}

    def load_state_dict(self, state: dict) -> None:
        for s, stream in self.streams.items():
            self.restored[s] = state[str(s)]
            self.iters.pop(s, None)
            stream.set_epoch(state[str(s)]["epoch"])
            if "examples_iterable" in state[str(s)]:  # else the epoch had not started
                stream.ds.load_state_dict(state[str(s)])


@torch.no_grad()
def encode_stream(vqvae: VQVAE, cfg: DataConfig, split: str) -> tuple[torch.Tensor, ImageCaptions]:
    """The latent cache of a streamed split, 256 images at a time: code indices (N, h, w) and the captions and
    columns of each row (an ImageCaptions without images); the split's images are never all in memory."""
    indices, captions, columns, chunk = [], [], {}, []
    rows = iter_examples(open_split(dataclasses.replace(cfg, streaming=True), split), cfg, Counter(),
                         desc=f"latent cache: {split}")
    for image, caps, extra in rows:
        chunk.append(image)
        captions.append(caps)
        for key, value in extra.items():
            columns.setdefault(key, []).append(value)
        if len(chunk) == 256:
            indices.append(latents.encode_images(vqvae, torch.stack(chunk)))
            chunk = []
    if chunk:
        indices.append(latents.encode_images(vqvae, torch.stack(chunk)))
    return torch.cat(indices), ImageCaptions(torch.empty(0, 3, 0, 0, dtype=torch.uint8), captions, columns)


def check_enough_rows(n: int, global_batch: int, section: str) -> None:
    if n < global_batch:
        raise DataError(f"the train split has {n} usable images, fewer than one global batch of {global_batch} "
                        f"({section}.batch_size x processes x gradient_accumulation_steps); accepted: a global "
                        f"batch of at most {n}")


def train_vqvae(cfg: Config, accelerator: Accelerator, out: Path) -> None:
    """Stage 1: train the tokenizer on the train split, export it, then fill the latent cache."""
    tcfg = cfg.vqvae_train
    set_seed(cfg.train.seed)  # a stage's result must not depend on what ran before it in this process
    val = ImageCaptions.from_split(cfg.data, cfg.data.val_split, progress=accelerator.is_main_process)
    fixed = val.images[:8].float() / 127.5 - 1
    global_batch = tcfg.batch_size * accelerator.num_processes * tcfg.gradient_accumulation_steps
    if cfg.data.streaming:  # each process streams its own shards; nothing is held in memory
        train = None
        accum = tcfg.gradient_accumulation_steps
        first = accelerator.process_index * accum
        stream = StreamBatches(cfg.data, cfg.data.train_split, range(first, first + accum),
                               accelerator.num_processes * accum, tcfg.batch_size)

        def get_batch(step: int, shard: int, num_shards: int) -> torch.Tensor:
            return (stream(step, shard, num_shards).float() / 127.5 - 1).to(accelerator.device)
    else:
        stream = None
        train = ImageCaptions.from_split(cfg.data, cfg.data.train_split, progress=accelerator.is_main_process)
        images = train.images  # (N, 3, R, R) uint8, kept uint8 until the batch is gathered
        check_enough_rows(len(images), global_batch, "vqvae_train")

        def get_batch(step: int, shard: int, num_shards: int) -> torch.Tensor:
            rows = batch_indices(step, len(images), tcfg.batch_size, cfg.train.seed, shard, num_shards)
            return (images[rows].float() / 127.5 - 1).to(accelerator.device)

    def loss_fn(model, x):
        recon, commit, stats = model(x)
        recon = recon.float()
        l1, mse = (recon - x).abs().mean(), F.mse_loss(recon, x)
        loss = tcfg.l1_weight * l1 + tcfg.mse_weight * mse + commit
        return loss, {"l1": l1.detach(), "mse": mse.detach(), "commit": commit.detach(),
                      "psnr": psnr(x, recon.detach()).mean(), **stats}

    def on_image(step: int, model: VQVAE) -> None:
        model.eval()
        with torch.no_grad():
            recon = model.decode(model.encode(fixed.to(accelerator.device))[0])
        model.train()
        save_grid([to_pil(fixed), to_pil(recon)], out / "vqvae" / f"recon-{step:06d}.png", scale=4)

    vqvae = VQVAE(cfg.vqvae)
    log.info(f"vqvae: {sum(p.numel() for p in vqvae.parameters()) / 1e6:.2f}M parameters, f{cfg.vqvae.downsample}, "
             f"{cfg.vqvae.codebook_size} codes of dim {cfg.vqvae.code_dim}, {tcfg.steps} steps")
    vqvae = fit(accelerator, "vqvae", vqvae, tcfg, get_batch, loss_fn, out / "vqvae", on_image,
                resume=cfg.train.resume, data_state=stream, mixed_precision=cfg.train.mixed_precision,
                after_step=lambda model, skipped: model.quantizer.update(skipped))
    if not accelerator.is_main_process:
        return
    vqvae.eval()
    vqvae.save_pretrained(out / "vqvae" / "model")
    cache = out / "latents"
    if train is None:
        train_idx, train = encode_stream(vqvae, cfg.data, cfg.data.train_split)
    else:
        train_idx = latents.encode_images(vqvae, train.images, desc="latent cache: train")
    val_idx = latents.encode_images(vqvae, val.images, desc="latent cache: validation")
    latents.save_split(cache, cfg.data.train_split, train_idx, train)
    latents.save_split(cache, cfg.data.val_split, val_idx, val)
    stats = latents.latent_stats(vqvae, train_idx)
    (cache / "stats.json").write_text(json.dumps(stats, indent=2))

    with torch.no_grad():  # validation metrics, from the cached indices
        recon = torch.cat([vqvae.decode_indices(val_idx[i:i + 256].long()).cpu() for i in range(0, len(val_idx), 256)])
    real = val.images.float() / 127.5 - 1
    counts = torch.bincount(val_idx.flatten().long(), minlength=cfg.vqvae.codebook_size).float()
    metrics = {"psnr": psnr(real, recon).mean().item(), **{k: v.item() for k, v in code_stats(counts).items()}}
    if cfg.data.name == "shapes":
        truth = [dict(zip(ATTRIBUTES, values)) for values in zip(*(val.columns[a] for a in ATTRIBUTES))]
        metrics["judge"] = judge_accuracy(to_pil(recon), truth)
    (out / "vqvae" / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log.info(f"vqvae: validation {json.dumps(metrics)}")


def train_dit(cfg: Config, accelerator: Accelerator, out: Path, cache: CaptionCache) -> None:
    """Stage 2: rectified flow on cached, normalised VQ latents, conditioned on cached caption embeddings."""
    tcfg = cfg.dit_train
    set_seed(cfg.train.seed)  # the same DiT initialisation with train.stage=all or dit
    vqvae = VQVAE.from_pretrained(out / "vqvae" / "model").to(accelerator.device)
    indices, meta = latents.load_split(out / "latents", cfg.data.train_split)
    stats = json.loads((out / "latents" / "stats.json").read_text())
    mean, std = (torch.tensor(stats[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        x_all = ((vqvae.quantizer.embed(indices.long()).cpu() - mean) / std).to(accelerator.device)  # (N, d, h, w)
    hidden, mask, pooled = (t.to(accelerator.device) for t in (cache.hidden, cache.mask, cache.pooled))
    null_row = int(cache.rows([""])[0])
    candidates = meta["captions"]

    check_enough_rows(len(x_all), tcfg.batch_size * accelerator.num_processes * tcfg.gradient_accumulation_steps,
                      "dit_train")

    def get_batch(step: int, shard: int, num_shards: int) -> dict:
        # Every random draw of a step comes from (seed, step) and is made for the whole global batch, of which
        # this shard takes its slice: a resumed run replays it exactly, and 2 processes of 16 (or 2 accumulated
        # micro-batches of 16) train on exactly what 1 process of 32 does.
        device, bs = accelerator.device, tcfg.batch_size
        rows = batch_indices(step, len(x_all), bs, cfg.train.seed, shard, num_shards)
        g = torch.Generator(device).manual_seed(cfg.train.seed * 1_000_003 + step * 1009)
        n, part = bs * num_shards, slice(shard * bs, (shard + 1) * bs)
        drop = torch.rand(n, generator=g, device=device)[part] < tcfg.cfg_dropout
        t = sample_t(n, tcfg.t_mean, tcfg.t_std, device=device, generator=g)[part]
        noise = torch.randn((n, *x_all.shape[1:]), generator=g, device=device)[part]
        text_rows = cache.rows([pick_caption(candidates[i], cfg.train.seed, step, i) for i in rows.tolist()])
        text_rows = torch.where(drop, null_row, text_rows.to(device))
        return {"x0": x_all[rows.to(device)], "t": t, "noise": noise,
                "hidden": hidden[text_rows].float(), "mask": mask[text_rows], "pooled": pooled[text_rows].float()}

    def loss_fn(model, b: dict):
        per_sample = flow_loss(lambda x, t: model(x, t, b["hidden"], b["mask"], b["pooled"]), b["x0"], b["t"], b["noise"])
        # Loss per quarter of t: which noise levels the model has learned.
        bins = (b["t"] * 4).long().clamp(max=3)
        sums = torch.zeros(4, device=bins.device).index_add_(0, bins, per_sample.detach())
        per_bin = sums / torch.bincount(bins, minlength=4).clamp(min=1)
        return per_sample.mean(), {f"loss_t{i}": per_bin[i] for i in range(4)}

    dit_cfg = dataclasses.replace(cfg.dit, in_channels=x_all.shape[1], input_size=x_all.shape[-1],
                                  text_dim=hidden.shape[-1])
    dit = DiT(dit_cfg)
    ema = copy.deepcopy(dit).to(accelerator.device).eval()
    info = PipelineInfo(cfg.text_encoder.name, cfg.text_encoder.max_length, stats["mean"], stats["std"],
                        cfg.sample.snap_to_codes, text_encoder_id=cache.encoder.resolved_id)
    prompts = tcfg.sample_prompts

    def on_image(step: int, model: DiT | None = None, path: Path | None = None) -> None:  # shows the EMA
        pipe = TextToImagePipeline(ema, vqvae, info)
        per_prompt = 6
        images = to_pil(pipe.generate(cache.get([p for p in prompts for _ in range(per_prompt)]), cache.get([""]),
                                      cfg.sample.steps, cfg.sample.guidance, cfg.sample.seed, cfg.sample.sampler))
        rows = [images[i * per_prompt:(i + 1) * per_prompt] for i in range(len(prompts))]
        save_grid(rows, path or out / "dit" / f"samples-{step:06d}.png", scale=2, labels=prompts)

    log.info(f"dit: {dit_cfg.mode}, {sum(p.numel() for p in dit.parameters()) / 1e6:.2f}M parameters, "
             f"{len(x_all)} latents of {tuple(x_all.shape[1:])}, {tcfg.steps} steps of {tcfg.batch_size}")
    fit(accelerator, "dit", dit, tcfg, get_batch, loss_fn, out / "dit", on_image, ema=ema, ema_decay=tcfg.ema_decay,
        resume=cfg.train.resume, mixed_precision=cfg.train.mixed_precision)
    if accelerator.is_main_process:
        TextToImagePipeline(ema, vqvae, info).save_pretrained(out)
        on_image(tcfg.steps, path=out / "samples.png")
        log.info(f"dit: exported the pipeline to {out}; samples in {out / 'samples.png'}")


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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    check_inputs(cfg)
    # One run per output directory; the job's main process holds the lock (if it stops, the launcher stops the rest).
    with RunLock(cfg.train.output_dir) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext():
        run(cfg)


def run(cfg: Config) -> None:
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
        train_vqvae(cfg, accelerator, out)
    accelerator.wait_for_everyone()
    if cfg.train.stage in ("all", "dit"):
        train_dit(cfg, accelerator, out, cache)
    accelerator.end_training()
    log.info(f"done: run directory {out}")


def cli(argv: list[str] | None = None) -> int:
    """The command line. Exit codes: 0 done; 2 and one `error: ...` line for a mistake in the config or the data
    or an output directory another run holds; 1 (one line too) for a diverged run or a full disk; 75 stopped by
    SIGTERM / SIGINT after a checkpoint, resumable by the same command."""
    stop_with_parent()
    return run_cli(main, argv, user_errors=(ConfigError, DataError, TextEncoderLoadError, CheckpointError, RunLocked),
                   failures=(TrainingDiverged, DiskFull))


if __name__ == "__main__":
    sys.exit(cli())
