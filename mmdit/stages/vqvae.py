"""The VQ-VAE stage: train the tokenizer on the train split, export it, fill the latent cache, measure it.

Its pieces, each testable alone: `ImageBatches` (what fit trains on at a step), `ReconLoss`, `recon_grid`,
`fill_latent_cache`, `validation_metrics`."""
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
from mmdit.data import DataConfig
from mmdit.data.loader import ImageCaptions
from mmdit.data import scenes, shapes
from mmdit.data.stream import STREAM_CAPTIONS, StreamBatches, fill_stream
from mmdit.grid import save_grid
from mmdit.pixels import to_float, to_pil
from mmdit.shards import ShardStore
from mmdit.stages import check_enough_rows
from mmdit.text_encoder import CaptionCache
from mmdit.data.order import batch_indices
from mmdit.trainer import fit
from mmdit.vqvae import VQVAE, code_stats, psnr

log = get_logger("mmdit.train")


class ImageBatches:
    """fit's `get_batch` for the VQ-VAE: images in [-1, 1] on the device, from the split in memory (uint8
    (N, 3, R, R), rows a pure function of (seed, step)) or from a stream (StreamBatches: each process its own
    shards, nothing held in memory)."""

    def __init__(self, source: torch.Tensor | StreamBatches, batch_size: int, seed: int, device: torch.device):
        self.source, self.batch_size, self.seed, self.device = source, batch_size, seed, device

    def __call__(self, step: int, slot: int, num_slots: int) -> torch.Tensor:
        if isinstance(self.source, StreamBatches):
            images = self.source(step, slot, num_slots)
        else:
            images = self.source[batch_indices(step, len(self.source), self.batch_size, self.seed, slot, num_slots)]
        return to_float(images).to(self.device)


class ReconLoss:
    """fit's `loss_fn` for the VQ-VAE: weighted L1 + MSE of the reconstruction, plus the commitment loss."""

    def __init__(self, l1_weight: float, mse_weight: float):
        self.l1_weight, self.mse_weight = l1_weight, mse_weight

    def __call__(self, model: VQVAE, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        recon, commit, stats = model(x)
        recon = recon.float()
        l1, mse = (recon - x).abs().mean(), F.mse_loss(recon, x)
        loss = self.l1_weight * l1 + self.mse_weight * mse + commit
        return loss, {"l1": l1.detach(), "mse": mse.detach(), "commit": commit.detach(),
                      "psnr": psnr(x, recon.detach()).mean(), **stats}


@torch.no_grad()
def recon_grid(model: VQVAE, images: torch.Tensor, path: Path) -> Path:
    """Two rows: `images` ((B, 3, R, R) in [-1, 1]) and their reconstructions."""
    was_training = model.training
    model.eval()
    recon = model.decode(model.encode(images.to(next(model.parameters()).device))[0])
    model.train(was_training)
    return save_grid([to_pil(images), to_pil(recon)], path, scale=4)


def fill_latent_cache(vqvae: VQVAE, cfg: DataConfig, directory: Path, train: ImageCaptions | None,
                      val: ImageCaptions, cache: CaptionCache, vqvae_id: str, accelerator: Accelerator | None = None
                      ) -> torch.Tensor:
    """Encode both splits into the latent cache, every process its own shards (of a streamed train split: of its
    own part of the stream, shard by shard), skipping the shards already complete, and measure the latent
    normalisation on the train split; -> the validation code indices (N, h, w)."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    barrier = accelerator.wait_for_everyone if accelerator else (lambda: None)
    h = cfg.resolution // vqvae.cfg.downsample
    for split, data in ((cfg.train_split, train), (cfg.val_split, val)):
        width = STREAM_CAPTIONS if data is None else max(len(c) for c in data.captions)
        key = latents.split_key(vqvae_id, cache, split, None if data is None else len(data), width)
        if rank == 0:  # a cache of another VQ-VAE, text encoder or dataset size is replaced
            store = ShardStore(directory / split, key, latents.split_columns(h, width), reset=True)
            if data is None and "caption_base" not in store.meta:  # a stream's captions: rows of their own
                store.set_meta(caption_base=cache.end())
        barrier()
        store = ShardStore(directory / split, key)
        if data is None:
            fill_stream(vqvae, cfg, split, store, cache, rank, world, caption_base=store.meta["caption_base"])
        else:
            latents.fill_split(vqvae, data, store, cache, rank, world)
        barrier()
        if rank == 0:  # complete now: its row count (a stream's, with gaps between processes' parts, known only now)
            store.set_meta(rows=len(data) if data is not None else len(store.reader()))
    barrier()
    if rank == 0:
        latents.LatentNorm.measure(vqvae, latents.LatentSplit(directory, cfg.train_split).indices).save(directory)
    return latents.LatentSplit(directory, cfg.val_split).indices[:]


@torch.no_grad()
def validation_metrics(vqvae: VQVAE, val: ImageCaptions, val_idx: torch.Tensor, dataset: str) -> dict:
    """Reconstruction PSNR, codebook usage and perplexity on the validation split, from its cached code indices;
    on the generated `dataset`s (shapes, scenes), the share of reconstructions their judge reads as drawn."""
    recon = torch.cat([vqvae.decode_indices(val_idx[i:i + 256].long()).cpu() for i in range(0, len(val_idx), 256)])
    real = to_float(val.images)
    counts = torch.bincount(val_idx.flatten().long(), minlength=vqvae.cfg.codebook_size).float()
    metrics = {"psnr": psnr(real, recon).mean().item(), **{k: v.item() for k, v in code_stats(counts).items()}}
    if dataset == "shapes":
        truth = [dict(zip(shapes.ATTRIBUTES, values)) for values in zip(*(val.columns[a] for a in shapes.ATTRIBUTES))]
        metrics["judge"] = shapes.judge_accuracy(to_pil(recon), truth)
    elif dataset == "scenes":  # every object found where it was drawn, and GenEval's verdict on each row's spec
        metrics["judge"] = scenes.judge_accuracy(to_pil(recon), scenes.truth_rows(val.columns))
    return metrics


def train_vqvae(cfg: Config, accelerator: Accelerator, out: Path, cache: CaptionCache) -> None:
    """Stage 1: train the tokenizer on the train split, export it, then fill the latent cache."""
    tcfg = cfg.vqvae_train
    set_seed(cfg.train.seed)  # a stage's result must not depend on what ran before it in this process
    val = ImageCaptions.from_split(cfg.data, cfg.data.val_split, progress=accelerator.is_main_process)
    train, stream = None, None
    if cfg.data.streaming:  # each process streams its own shards, one per accumulation micro-batch
        accum, first = tcfg.gradient_accumulation_steps, accelerator.process_index * tcfg.gradient_accumulation_steps
        stream = StreamBatches(cfg.data, cfg.data.train_split, range(first, first + accum),
                               accelerator.num_processes * accum, tcfg.batch_size)
    else:
        train = ImageCaptions.from_split(cfg.data, cfg.data.train_split, progress=accelerator.is_main_process)
        check_enough_rows(len(train.images), tcfg.batch_size * accelerator.num_processes * tcfg.gradient_accumulation_steps,
                          "vqvae_train")
    batches = ImageBatches(stream if stream is not None else train.images, tcfg.batch_size, cfg.train.seed, accelerator.device)
    fixed = to_float(val.images[:8])

    vqvae = VQVAE(cfg.vqvae)
    log.info(f"vqvae: {sum(p.numel() for p in vqvae.parameters()) / 1e6:.2f}M parameters, f{cfg.vqvae.downsample}, "
             f"{cfg.vqvae.codebook_size} codes of dim {cfg.vqvae.code_dim}, {tcfg.steps} steps")
    vqvae = fit(accelerator, "vqvae", vqvae, tcfg, batches, ReconLoss(tcfg.l1_weight, tcfg.mse_weight), out / "vqvae",
                lambda step, model: recon_grid(model, fixed, out / "vqvae" / f"recon-{step:06d}.png"),
                resume=cfg.train.resume, data_state=stream, mixed_precision=cfg.train.mixed_precision,
                after_step=lambda model, skipped: model.quantizer.update(skipped))
    vqvae.eval()
    if accelerator.is_main_process:
        vqvae.save_pretrained(out / "vqvae" / "model")
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:  # every process encodes with exactly the exported weights (FSDP too)
        vqvae = VQVAE.from_pretrained(out / "vqvae" / "model").to(accelerator.device)
    vqvae_id = latents.weights_id(out / "vqvae" / "model")
    val_idx = fill_latent_cache(vqvae, cfg.data, out / "latents", train, val, cache, vqvae_id, accelerator)
    if not accelerator.is_main_process:
        return
    metrics = validation_metrics(vqvae, val, val_idx, cfg.data.name)
    (out / "vqvae" / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log.info(f"vqvae: validation {json.dumps(metrics)}")
