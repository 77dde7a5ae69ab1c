"""The VQ-VAE stage: train the tokenizer on the train split, export it, fill the latent cache, measure it."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed

from mmdit import latents
from mmdit.config import Config
from mmdit.data.loader import ImageCaptions
from mmdit.data.shapes import ATTRIBUTES, judge_accuracy
from mmdit.data.stream import StreamBatches, encode_stream
from mmdit.grid import save_grid, to_pil
from mmdit.stages import check_enough_rows
from mmdit.trainer import batch_indices, fit
from mmdit.vqvae import VQVAE, code_stats, psnr

log = get_logger("mmdit.train")


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

        def get_batch(step: int, slot: int, num_slots: int) -> torch.Tensor:
            return (stream(step, slot, num_slots).float() / 127.5 - 1).to(accelerator.device)
    else:
        stream = None
        train = ImageCaptions.from_split(cfg.data, cfg.data.train_split, progress=accelerator.is_main_process)
        images = train.images  # (N, 3, R, R) uint8, kept uint8 until the batch is gathered
        check_enough_rows(len(images), global_batch, "vqvae_train")

        def get_batch(step: int, slot: int, num_slots: int) -> torch.Tensor:
            rows = batch_indices(step, len(images), tcfg.batch_size, cfg.train.seed, slot, num_slots)
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
