"""The DiT stage: the transformer on the cached VQ codes, conditioned on the cached caption embeddings, by
either objective: rectified flow on the normalised code vectors (mmdit/flow.py) or masked-token prediction of
the code indices (mmdit/masked.py); a validation loss at log steps; exports the whole pipeline and its sample grid.

Its pieces, each testable alone: `DiTBatches` (what fit trains on at a step, and its loss), `loss_by_t` (the
loss per noise level: flow's t, or the mask ratio), `Validation` (the held-out loss at log steps), `sample_grid`."""
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
from mmdit.loss_bins import LossByT, bin_sums
from mmdit.masked import mask_tokens, masked_loss
from mmdit.model_card import write_model_card
from mmdit.pipeline import PipelineInfo, TextToImagePipeline
from mmdit.pixels import to_pil
from mmdit.sampling import SampleOptions
from mmdit.stages import check_enough_rows
from mmdit.text_encoder import CaptionCache
from mmdit.data.order import batch_indices
from mmdit.trainer import fit
from mmdit.vqvae import VQVAE

log = get_logger("mmdit.train")
T_BINS = 4  # the loss is also logged per quarter of t: which noise levels the model has learned


class DiTBatches:
    """fit's `get_batch` for the DiT, and its loss. A batch: the clean data `x0` (flow: normalised latents
    (B, d, h, w); masked: code indices (B, h, w)), captions (one of each image's candidates, or the empty caption
    with probability cfg_dropout), and the objective's draws: flow's t and noise, or masked's u (the mask ratio is
    cos(pi/2 u)) and the scores that choose the masked positions. Every random draw of a step comes from
    (seed, step) and is made for the whole global batch, of which micro-batch `slot` takes its slice: a resumed run
    replays it exactly, and 2 processes of 16 (or 2 accumulated micro-batches of 16) train on exactly what
    1 process of 32 does."""

    def __init__(self, x, captions, cache: CaptionCache, cfg: DiTTrainConfig, seed: int, device: torch.device,
                 objective: str = "flow", codebook_size: int = 0):
        # x: the clean data of each row, indexable by rows (a tensor, or a latents.Column read from the cache)
        # captions: each row's candidate captions as caption-cache rows (N, K), -1 padded (a tensor or a Column)
        self.x, self.captions, self.cache, self.cfg, self.seed, self.device = x, captions, cache, cfg, seed, device
        self.objective, self.mask_id = objective, codebook_size  # [MASK] is the id after the last code
        self.null_row = int(cache.lookup([""])[0])

    def text(self, rows: torch.Tensor) -> dict:
        """The conditioning of caption-cache rows (B,): hidden (B, L, D), mask (B, L), pooled (B, D)."""
        return {k: v.to(self.device) for k, v in self.cache.text(rows.cpu()).items()}

    def pick(self, rows: torch.Tensor, step: int) -> torch.Tensor:
        """The caption-cache row of one candidate caption per image (B,), as pick_caption picks it."""
        candidates = self.captions[rows]  # (B, K), the real ones first
        counts, picked = (candidates >= 0).sum(1), candidates[:, 0].clone()
        for j in (counts > 1).nonzero()[:, 0].tolist():  # only images with a choice draw
            picked[j] = pick_caption(candidates[j, :counts[j]].tolist(), self.seed, step, int(rows[j]))
        return picked

    def draws(self, n: int, g: torch.Generator, t: torch.Tensor | None = None) -> dict:
        """The objective's random inputs of n images: t (n,) (flow's time, or masked's u; drawn unless given)
        and noise (n, d, h, w) (flow) or scores (n, h * h) (masked)."""
        shape, device = torch.Size(self.x.shape[1:]), self.device
        if self.objective == "flow":
            t = sample_t(n, self.cfg.t_mean, self.cfg.t_std, device=device, generator=g) if t is None else t
            return {"t": t, "noise": torch.randn((n, *shape), generator=g, device=device)}
        t = torch.rand(n, generator=g, device=device) if t is None else t
        return {"t": t, "scores": torch.rand((n, shape.numel()), generator=g, device=device)}

    def __call__(self, step: int, slot: int, num_slots: int) -> dict:
        device, bs = self.device, self.cfg.batch_size
        rows = batch_indices(step, len(self.x), bs, self.seed, slot, num_slots)
        n, part = bs * num_slots, slice(slot * bs, (slot + 1) * bs)
        # The caption dropout is drawn on the CPU and picks the empty caption's cache row before the rows are
        # read: no device sync, and no pass over the states to blank them.
        seed = self.seed * 1_000_003 + step * 1009
        drop = torch.rand(n, generator=torch.Generator().manual_seed(seed))[part] < self.cfg.cfg_dropout
        text = self.text(torch.where(drop, self.null_row, self.pick(rows, step)))
        g = torch.Generator(device).manual_seed(seed)
        draws = {k: v[part] for k, v in self.draws(n, g).items()}
        return {"x0": self.x[rows].to(device), **draws, **text}

    def losses(self, model: DiT, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (the per-sample loss (B,), each sample's noise level (B,): flow's t, or the share of codes masked)."""
        text = batch["hidden"], batch["mask"], batch["pooled"]
        if self.objective == "flow":
            return flow_loss(lambda x, t: model(x, t, *text), batch["x0"], batch["t"], batch["noise"]), batch["t"]
        codes = batch["x0"].flatten(1)  # (B, N)
        inputs, masked, ratio = mask_tokens(codes, self.mask_id, batch["t"], batch["scores"])
        logits = model(inputs.view_as(batch["x0"]), ratio, *text, where=masked.view_as(batch["x0"]))  # (M, K)
        return masked_loss(logits, codes, masked, self.cfg.label_smoothing), ratio

    by_t: LossByT | None = None  # set by train_dit: the loss by noise level between log steps

    def train_loss(self, model: DiT, batch: dict) -> tuple[torch.Tensor, dict]:
        per_sample, t = self.losses(model, batch)
        if self.by_t is not None:
            self.by_t.add(per_sample, t)
        return per_sample.mean(), loss_by_t(per_sample, t)


def loss_by_t(per_sample: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """The mean loss in each of T_BINS equal ranges of t, as `loss_t0` (t near 0: fine detail, or few codes
    masked) and up."""
    sums, counts = bin_sums(per_sample, t, T_BINS)
    per_bin = sums / counts.clamp(min=1)
    return {f"loss_t{i}": per_bin[i] for i in range(T_BINS)}


class Validation:
    """The loss on held-out data (nanoGPT's estimate_loss), for fit's `validate`: up to `size` validation images
    with their first caption, t (flow's time, masked's u) spread evenly over (0, 1) so every bin is filled
    alike, the other draws from a fixed seed. The same batch at every log step: its curve shows learning, not
    the draw."""

    def __init__(self, x, captions, batches: DiTBatches, size: int = 256):
        # x, captions: as DiTBatches takes them, of the validation split
        n, device = min(size, len(x)), batches.device
        t = (torch.arange(n, dtype=torch.float32, device=device) + 0.5) / n
        draws = batches.draws(n, torch.Generator(device).manual_seed(0), t)
        rows = captions[torch.arange(n)][:, 0]  # each image's first caption
        self.batches, self.chunks = batches, []
        for i in range(0, n, batches.cfg.batch_size):
            part = slice(i, min(n, i + batches.cfg.batch_size))
            self.chunks.append({"x0": x[torch.arange(part.start, part.stop)].to(device),
                                **{k: v[part] for k, v in draws.items()}, **batches.text(rows[part])})

    def __call__(self, model: DiT) -> dict[str, torch.Tensor]:
        per_sample, t = (torch.cat(parts) for parts in zip(*(self.batches.losses(model, c) for c in self.chunks)))
        return {"loss": per_sample.mean(), **loss_by_t(per_sample, t)}


def sample_grid(pipe: TextToImagePipeline, cache: CaptionCache, prompts: list[str], options: SampleOptions,
                path: Path, per_prompt: int = 6) -> Path:
    """A row of `per_prompt` samples for each prompt, from cached embeddings (the text encoder stays unloaded)."""
    images = to_pil(pipe.generate(cache.get([p for p in prompts for _ in range(per_prompt)]), cache.get([""]),
                                  options))
    rows = [images[i * per_prompt:(i + 1) * per_prompt] for i in range(len(prompts))]
    return save_grid(rows, path, scale=2, labels=prompts)


def train_dit(cfg: Config, accelerator: Accelerator, out: Path, cache: CaptionCache) -> None:
    """Stage 2: the transformer on the cached VQ codes (as normalised vectors for flow, as indices for masked),
    conditioned on cached caption embeddings."""
    tcfg, device, objective = cfg.dit_train, accelerator.device, cfg.dit.objective
    set_seed(cfg.train.seed)  # the same DiT initialisation with train.stage=all or dit
    vqvae = VQVAE.from_pretrained(out / "vqvae" / "model").to(device)
    norm = latents.LatentNorm.load(out / "latents")
    vqvae_id, split = latents.weights_id(out / "vqvae" / "model"), {}
    for name in (cfg.data.train_split, cfg.data.val_split):  # rows read from the cache, batch by batch
        cached = latents.LatentSplit(out / "latents", name, latents.split_key(vqvae_id, cache, name, None, 0))
        x = cached.indices.map(lambda idx: idx.long())  # masked: code indices (B, h, w)
        if objective == "flow":  # normalised code vectors (B, d, h, w)
            x = cached.indices.map(latents.FlowLatents(vqvae, norm), (vqvae.cfg.code_dim, *cached.indices.shape[1:]))
        split[name] = (x, cached.captions)
    batches = DiTBatches(*split[cfg.data.train_split], cache, tcfg, cfg.train.seed, device, objective,
                         vqvae.cfg.codebook_size)
    check_enough_rows(len(batches.x), tcfg.batch_size * accelerator.num_processes * tcfg.gradient_accumulation_steps,
                      "dit_train")
    validation = Validation(*split[cfg.data.val_split], batches)

    dit_cfg = cfg.dit.for_data(in_channels=vqvae.cfg.code_dim, input_size=batches.x.shape[-1],
                               text_dim=cache.encoder.dim, codebook_size=vqvae.cfg.codebook_size)
    dit = DiT(dit_cfg)
    if objective == "masked":
        dit.init_codes(norm.normalise(vqvae.quantizer.codes().detach()[:, :, None, None])[:, :, 0, 0].cpu())
    ema = copy.deepcopy(dit).to(device).eval()
    info = PipelineInfo(cfg.text_encoder.name, cfg.text_encoder.max_length, norm.mean, norm.std,
                        text_encoder_id=cache.encoder.resolved_id, sample=cfg.sample)
    pipe = TextToImagePipeline(ema, vqvae, info)  # grids show the EMA

    def on_image(step: int, model: DiT) -> None:
        sample_grid(pipe, cache, tcfg.sample_prompts, cfg.sample, out / "dit" / f"samples-{step:06d}.png")

    log.info(f"dit: {objective}, {dit_cfg.mode}, {sum(p.numel() for p in dit.parameters()) / 1e6:.2f}M parameters, "
             f"{len(batches.x)} latents of {tuple(batches.x.shape[1:])}, {tcfg.steps} steps of {tcfg.batch_size}")
    batches.by_t = LossByT(device, axis="t" if objective == "flow" else "mask ratio")
    reduce = (lambda x: accelerator.reduce(x, "sum")) if accelerator.num_processes > 1 else None
    fit(accelerator, "dit", dit, tcfg, batches, batches.train_loss, out / "dit", on_image, ema=ema,
        ema_decay=tcfg.ema_decay, resume=cfg.train.resume, mixed_precision=cfg.train.mixed_precision,
        validate=validation, log_extra=lambda step: batches.by_t.read(step, reduce))
    if accelerator.is_main_process:
        batches.by_t.save(out / "dit", objective)  # loss_by_t.json and .png: the bins of every log step
        pipe.save_pretrained(out)
        sample_grid(pipe, cache, tcfg.sample_prompts, cfg.sample, out / "samples.png")
        write_model_card(out, accelerator)  # README.md, and training.json: the time and hardware, known only now
        log.info(f"dit: exported the pipeline to {out}; samples in {out / 'samples.png'}, model card README.md")
