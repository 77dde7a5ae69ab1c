"""The DiT stage: rectified flow on the cached, normalised VQ latents, conditioned on the cached caption
embeddings; exports the whole pipeline and its sample grid."""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed

from mmdit import latents
from mmdit.config import Config
from mmdit.data.loader import pick_caption
from mmdit.dit import DiT
from mmdit.flow import flow_loss, sample_t
from mmdit.grid import save_grid, to_pil
from mmdit.pipeline import PipelineInfo, TextToImagePipeline
from mmdit.stages import check_enough_rows
from mmdit.text_encoder import CaptionCache
from mmdit.trainer import batch_indices, fit
from mmdit.vqvae import VQVAE

log = get_logger("mmdit.train")


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

    def get_batch(step: int, slot: int, num_slots: int) -> dict:
        # Every random draw of a step comes from (seed, step) and is made for the whole global batch, of which
        # this micro-batch slot takes its slice: a resumed run replays it exactly, and 2 processes of 16 (or 2 accumulated
        # micro-batches of 16) train on exactly what 1 process of 32 does.
        device, bs = accelerator.device, tcfg.batch_size
        rows = batch_indices(step, len(x_all), bs, cfg.train.seed, slot, num_slots)
        g = torch.Generator(device).manual_seed(cfg.train.seed * 1_000_003 + step * 1009)
        n, part = bs * num_slots, slice(slot * bs, (slot + 1) * bs)
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
