"""The DiT stage: rectified flow on the cached, normalised VQ latents, conditioned on the cached caption
embeddings; a validation loss on the validation latents; exports the whole pipeline and its sample grid.

Its pieces, each testable alone: `FlowBatches` (what fit trains on at a step), `flow_losses` / `loss_by_t` (the
loss and its view per noise level), `FlowValidation` (the held-out loss at log steps), `sample_grid`."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed

from mmdit import latents
from mmdit.config import Config, DiTTrainConfig
from mmdit.data.loader import pick_caption
from mmdit.dit import DiT
from mmdit.flow import flow_loss, sample_t
from mmdit.grid import save_grid
from mmdit.pipeline import PipelineInfo, TextToImagePipeline
from mmdit.pixels import to_pil
from mmdit.sampling import SampleOptions
from mmdit.stages import check_enough_rows
from mmdit.text_encoder import CaptionCache
from mmdit.trainer import batch_indices, fit
from mmdit.vqvae import VQVAE

log = get_logger("mmdit.train")
T_BINS = 4  # the loss is also logged per quarter of t: which noise levels the model has learned


class FlowBatches:
    """fit's `get_batch` for the DiT: latents, captions (one of each image's candidates, or the empty caption
    with probability cfg_dropout), times and noise. Every random draw of a step comes from (seed, step) and is
    made for the whole global batch, of which micro-batch `slot` takes its slice: a resumed run replays it
    exactly, and 2 processes of 16 (or 2 accumulated micro-batches of 16) train on exactly what 1 process of 32
    does."""

    def __init__(self, x: torch.Tensor, captions: list[list[str]], cache: CaptionCache, cfg: DiTTrainConfig,
                 seed: int, device: torch.device):
        self.x = x.to(device)  # (N, d, h, w) normalised latents
        self.captions, self.cache, self.cfg, self.seed, self.device = captions, cache, cfg, seed, device
        self.hidden, self.mask, self.pooled = (t.to(device) for t in (cache.hidden, cache.mask, cache.pooled))
        self.null_row = int(cache.rows([""])[0])

    def text(self, rows: torch.Tensor) -> dict:
        """The conditioning of caption-cache rows (B,): hidden (B, L, D), mask (B, L), pooled (B, D)."""
        return {"hidden": self.hidden[rows].float(), "mask": self.mask[rows], "pooled": self.pooled[rows].float()}

    def __call__(self, step: int, slot: int, num_slots: int) -> dict:
        device, bs = self.device, self.cfg.batch_size
        rows = batch_indices(step, len(self.x), bs, self.seed, slot, num_slots)
        g = torch.Generator(device).manual_seed(self.seed * 1_000_003 + step * 1009)
        n, part = bs * num_slots, slice(slot * bs, (slot + 1) * bs)
        drop = torch.rand(n, generator=g, device=device)[part] < self.cfg.cfg_dropout
        t = sample_t(n, self.cfg.t_mean, self.cfg.t_std, device=device, generator=g)[part]
        noise = torch.randn((n, *self.x.shape[1:]), generator=g, device=device)[part]
        text_rows = self.cache.rows([pick_caption(self.captions[i], self.seed, step, i) for i in rows.tolist()])
        text_rows = torch.where(drop, self.null_row, text_rows.to(device))
        return {"x0": self.x[rows.to(device)], "t": t, "noise": noise, **self.text(text_rows)}


def flow_losses(model: DiT, batch: dict) -> torch.Tensor:
    """The per-sample rectified-flow loss (B,) of a batch of FlowBatches' form."""
    return flow_loss(lambda x, t: model(x, t, batch["hidden"], batch["mask"], batch["pooled"]),
                     batch["x0"], batch["t"], batch["noise"])


def loss_by_t(per_sample: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """The mean loss in each of T_BINS equal ranges of t, as `loss_t0` (t near 0, fine detail) and up."""
    bins = (t * T_BINS).long().clamp(max=T_BINS - 1)
    sums = torch.zeros(T_BINS, device=bins.device).index_add_(0, bins, per_sample.detach().float())
    per_bin = sums / torch.bincount(bins, minlength=T_BINS).clamp(min=1)
    return {f"loss_t{i}": per_bin[i] for i in range(T_BINS)}


def train_loss(model: DiT, batch: dict) -> tuple[torch.Tensor, dict]:
    per_sample = flow_losses(model, batch)
    return per_sample.mean(), loss_by_t(per_sample, batch["t"])


class FlowValidation:
    """The loss on held-out latents (nanoGPT's estimate_loss), for fit's `validate`: up to `size` validation
    images with their first caption, times spread evenly over (0, 1) so every bin of t is filled alike, noise
    from a fixed seed. The same batch at every log step: its curve shows learning, not the draw."""

    def __init__(self, x: torch.Tensor, captions: list[list[str]], batches: FlowBatches, size: int = 256):
        n = min(size, len(x))
        device = batches.device
        noise = torch.randn((n, *x.shape[1:]), generator=torch.Generator().manual_seed(0))
        rows = batches.cache.rows([c[0] for c in captions[:n]]).to(device)
        self.chunks = []
        for i in range(0, n, batches.cfg.batch_size):
            part = slice(i, min(n, i + batches.cfg.batch_size))
            t = (torch.arange(part.start, part.stop, dtype=torch.float32) + 0.5) / n
            self.chunks.append({"x0": x[part].to(device), "t": t.to(device), "noise": noise[part].to(device),
                                **batches.text(rows[part])})

    def __call__(self, model: DiT) -> dict[str, torch.Tensor]:
        per_sample = torch.cat([flow_losses(model, chunk) for chunk in self.chunks])
        return {"loss": per_sample.mean(), **loss_by_t(per_sample, torch.cat([c["t"] for c in self.chunks]))}


def sample_grid(pipe: TextToImagePipeline, cache: CaptionCache, prompts: list[str], options: SampleOptions,
                path: Path, per_prompt: int = 6) -> Path:
    """A row of `per_prompt` samples for each prompt, from cached embeddings (the text encoder stays unloaded)."""
    images = to_pil(pipe.generate(cache.get([p for p in prompts for _ in range(per_prompt)]), cache.get([""]),
                                  options))
    rows = [images[i * per_prompt:(i + 1) * per_prompt] for i in range(len(prompts))]
    return save_grid(rows, path, scale=2, labels=prompts)


def train_dit(cfg: Config, accelerator: Accelerator, out: Path, cache: CaptionCache) -> None:
    """Stage 2: rectified flow on cached, normalised VQ latents, conditioned on cached caption embeddings."""
    tcfg, device = cfg.dit_train, accelerator.device
    set_seed(cfg.train.seed)  # the same DiT initialisation with train.stage=all or dit
    vqvae = VQVAE.from_pretrained(out / "vqvae" / "model").to(device)
    norm = latents.LatentNorm.load(out / "latents")
    split = {}
    for name in (cfg.data.train_split, cfg.data.val_split):
        indices, meta = latents.load_split(out / "latents", name)
        split[name] = (latents.diffusion_latents(vqvae, indices, norm), meta["captions"])  # (N, d, h, w), captions
    batches = FlowBatches(*split[cfg.data.train_split], cache, tcfg, cfg.train.seed, device)
    check_enough_rows(len(batches.x), tcfg.batch_size * accelerator.num_processes * tcfg.gradient_accumulation_steps,
                      "dit_train")
    validation = FlowValidation(*split[cfg.data.val_split], batches)

    dit_cfg = cfg.dit.for_data(in_channels=batches.x.shape[1], input_size=batches.x.shape[-1],
                               text_dim=batches.hidden.shape[-1])
    dit = DiT(dit_cfg)
    ema = copy.deepcopy(dit).to(device).eval()
    info = PipelineInfo(cfg.text_encoder.name, cfg.text_encoder.max_length, norm.mean, norm.std,
                        text_encoder_id=cache.encoder.resolved_id, sample=cfg.sample)
    pipe = TextToImagePipeline(ema, vqvae, info)  # grids show the EMA

    def on_image(step: int, model: DiT) -> None:
        sample_grid(pipe, cache, tcfg.sample_prompts, cfg.sample, out / "dit" / f"samples-{step:06d}.png")

    log.info(f"dit: {dit_cfg.mode}, {sum(p.numel() for p in dit.parameters()) / 1e6:.2f}M parameters, "
             f"{len(batches.x)} latents of {tuple(batches.x.shape[1:])}, {tcfg.steps} steps of {tcfg.batch_size}")
    fit(accelerator, "dit", dit, tcfg, batches, train_loss, out / "dit", on_image, ema=ema, ema_decay=tcfg.ema_decay,
        resume=cfg.train.resume, mixed_precision=cfg.train.mixed_precision, validate=validation)
    if accelerator.is_main_process:
        pipe.save_pretrained(out)
        sample_grid(pipe, cache, tcfg.sample_prompts, cfg.sample, out / "samples.png")
        log.info(f"dit: exported the pipeline to {out}; samples in {out / 'samples.png'}")
