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
import copy
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed

from mmdit import latents
from mmdit.config import Config, ConfigError, load_config
from mmdit.data.shapes import ATTRIBUTES, judge_accuracy
from mmdit.data.loader import DataError, ImageCaptions, ensure_dataset, pick_caption, split_captions
from mmdit.dit import DiT
from mmdit.flow import flow_loss, sample_t
from mmdit.grid import save_grid, to_pil
from mmdit.pipeline import PipelineInfo, TextToImagePipeline
from mmdit.text_encoder import CaptionCache, TextEncoder, TextEncoderLoadError
from mmdit.trainer import batch_indices, fit, resolve_mixed_precision
from mmdit.vqvae import VQVAE, code_stats, psnr

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "shapes.yaml"
log = get_logger("mmdit.train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.seed=1")
    return parser.parse_args(argv)


def cache_captions(cfg, accelerator: Accelerator) -> CaptionCache:
    """Encode every caption of both splits (and the empty and sample prompts) once; later stages only read
    the cache. Captions already cached, by this run or an earlier one, are not encoded again."""
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
        cache.encode_all(["", *cfg.dit_train.sample_prompts])
    accelerator.wait_for_everyone()
    return cache if accelerator.is_main_process else CaptionCache(encoder, cache.dir)


def train_vqvae(cfg: Config, accelerator: Accelerator, out: Path) -> None:
    """Stage 1: train the tokenizer on the train split, export it, then fill the latent cache."""
    tcfg = cfg.vqvae_train
    f = cfg.vqvae.downsample
    if cfg.data.resolution % f:
        raise ConfigError(f"data.resolution={cfg.data.resolution} is not divisible by the VQ-VAE downsampling "
                          f"factor {f}; accepted: multiples of {f}")
    train = ImageCaptions.from_split(cfg.data, cfg.data.train_split, progress=accelerator.is_main_process)
    val = ImageCaptions.from_split(cfg.data, cfg.data.val_split, progress=accelerator.is_main_process)
    images = train.images  # (N, 3, R, R) uint8, kept uint8 until the batch is gathered
    fixed = val.images[:8].float() / 127.5 - 1

    def get_batch(step: int) -> torch.Tensor:
        rows = batch_indices(step, len(images), tcfg.batch_size, cfg.train.seed,
                             accelerator.process_index, accelerator.num_processes)
        return (images[rows].float() / 127.5 - 1).to(accelerator.device)

    def loss_fn(model, x):
        recon, commit, stats = model(x)
        recon = recon.float()
        l1, mse = (recon - x).abs().mean(), F.mse_loss(recon, x)
        loss = tcfg.l1_weight * l1 + tcfg.mse_weight * mse + commit
        return loss, {"l1": l1.detach(), "mse": mse.detach(), "commit": commit.detach(),
                      "psnr": psnr(x, recon.detach()).mean(), **stats}

    def on_image(step: int) -> None:
        model = accelerator.unwrap_model(vqvae)
        model.eval()
        with torch.no_grad():
            recon = model.decode(model.encode(fixed.to(accelerator.device))[0])
        model.train()
        save_grid([to_pil(fixed), to_pil(recon)], out / "vqvae" / f"recon-{step:06d}.png", scale=4)

    vqvae = VQVAE(cfg.vqvae)
    log.info(f"vqvae: {sum(p.numel() for p in vqvae.parameters()) / 1e6:.2f}M parameters, f{f}, "
             f"{cfg.vqvae.codebook_size} codes of dim {cfg.vqvae.code_dim}, {tcfg.steps} steps")
    vqvae = fit(accelerator, "vqvae", vqvae, tcfg, get_batch, loss_fn, out / "vqvae", on_image)
    if not accelerator.is_main_process:
        return
    vqvae.eval()
    vqvae.save_pretrained(out / "vqvae" / "model")
    cache = out / "latents"
    train_idx = latents.encode_images(vqvae, train.images, desc="latent cache: train")
    val_idx = latents.encode_images(vqvae, val.images, desc="latent cache: validation")
    latents.save_split(cache, cfg.data.train_split, train_idx, train)
    latents.save_split(cache, cfg.data.val_split, val_idx, val)
    stats = latents.latent_stats(vqvae, train_idx)
    (cache / "stats.json").write_text(json.dumps(stats, indent=2))

    with torch.no_grad():  # validation metrics, from the cached indices
        recon = torch.cat([vqvae.decode_indices(val_idx[i:i + 256].long()) for i in range(0, len(val_idx), 256)])
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
    vqvae = VQVAE.from_pretrained(out / "vqvae" / "model").to(accelerator.device)
    indices, meta = latents.load_split(out / "latents", cfg.data.train_split)
    stats = json.loads((out / "latents" / "stats.json").read_text())
    mean, std = (torch.tensor(stats[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        x_all = ((vqvae.quantizer.embed(indices.long()).cpu() - mean) / std).to(accelerator.device)  # (N, d, h, w)
    hidden, mask, pooled = (t.to(accelerator.device) for t in (cache.hidden, cache.mask, cache.pooled))
    null_row = int(cache.rows([""])[0])
    candidates = meta["captions"]

    def get_batch(step: int) -> dict:
        # Every random draw of a step comes from (seed, step, rank): a resumed run replays it exactly.
        rank = accelerator.process_index
        rows = batch_indices(step, len(x_all), tcfg.batch_size, cfg.train.seed, rank, accelerator.num_processes)
        g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step * 1009 + rank)
        text_rows = cache.rows([pick_caption(candidates[i], cfg.train.seed, step, i) for i in rows.tolist()])
        text_rows[torch.rand(len(rows), generator=g) < tcfg.cfg_dropout] = null_row
        text_rows = text_rows.to(accelerator.device)
        x0 = x_all[rows.to(accelerator.device)]
        return {"x0": x0, "t": sample_t(len(rows), tcfg.t_mean, tcfg.t_std, generator=g).to(x0.device),
                "noise": torch.randn(x0.shape, generator=g).to(x0.device),
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
                        cfg.sample.snap_to_codes)
    prompts = tcfg.sample_prompts

    def on_image(step: int, path: Path | None = None) -> None:
        pipe = TextToImagePipeline(ema, vqvae, info)
        per_prompt = 6
        images = to_pil(pipe.generate(cache.get([p for p in prompts for _ in range(per_prompt)]), cache.get([""]),
                                      cfg.sample.steps, cfg.sample.guidance, cfg.sample.seed, cfg.sample.sampler))
        rows = [images[i * per_prompt:(i + 1) * per_prompt] for i in range(len(prompts))]
        save_grid(rows, path or out / "dit" / f"samples-{step:06d}.png", scale=2, labels=prompts)

    log.info(f"dit: {dit_cfg.mode}, {sum(p.numel() for p in dit.parameters()) / 1e6:.2f}M parameters, "
             f"{len(x_all)} latents of {tuple(x_all.shape[1:])}, {tcfg.steps} steps of {tcfg.batch_size}")
    fit(accelerator, "dit", dit, tcfg, get_batch, loss_fn, out / "dit", on_image, ema=ema, ema_decay=tcfg.ema_decay)
    if accelerator.is_main_process:
        TextToImagePipeline(ema, vqvae, info).save_pretrained(out)
        on_image(tcfg.steps, out / "samples.png")
        log.info(f"dit: exported the pipeline to {out}; samples in {out / 'samples.png'}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if cfg.train.stage not in ("all", "data", "vqvae", "dit"):
        raise ConfigError(f"train.stage={cfg.train.stage!r}; accepted: all, data, vqvae, dit")
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision),
                              log_with="tensorboard", project_dir=cfg.train.output_dir)
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    if accelerator.device.type == "cpu":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        torch.set_num_threads(cfg.train.cpu_threads or max(1, len(os.sched_getaffinity(0)) // local))
    set_seed(cfg.train.seed)

    out = Path(cfg.train.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
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


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError, TextEncoderLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
