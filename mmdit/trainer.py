"""The training loop both stages share: AdamW with warmup + cosine, grad clipping, mixed precision,
tensorboard scalars, a progress bar, periodic image grids, atomic checkpoints and resume.

A stage supplies only what differs: the model, a `loss_fn(model, batch) -> (loss, logs)`, a
`get_batch(step)` that is a pure function of the step (so a resumed run sees exactly the batches it would
have seen), and optionally `on_image(step)` / an EMA model.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from mmdit.weights import cpu_state

log = get_logger("mmdit.train")


@dataclass
class StageConfig:
    steps: int = 2000
    batch_size: int = 64  # per process
    lr: float = 2e-3
    warmup_steps: int = 100
    schedule: str = "cosine"  # "cosine" (to 0 at `steps`) | "constant"
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    grad_clip: float = 1.0
    log_every: int = 50
    image_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 2


def resolve_mixed_precision(requested: str) -> str:
    """"auto" -> bf16 where the hardware runs it fast, else fp32 ("no").

    On CPUs without AVX512-BF16/AMX, PyTorch falls back to reference bf16 kernels that are orders of
    magnitude slower than fp32 (measured on an AVX2-only EPYC: 0.3 vs 106 GFLOP/s for a 2048^2 matmul).
    """
    if requested not in ("auto", "no", "bf16", "fp16"):
        raise ValueError(f"train.mixed_precision={requested!r}; accepted: auto, no, bf16, fp16")
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "no"


def batch_indices(step: int, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """The dataset rows this process trains on at `step`: a fresh permutation per epoch, a pure function
    of (step, seed), each process taking its own slice of the global batch."""
    global_batch = batch_size * world_size
    per_epoch = n // global_batch
    if per_epoch == 0:
        raise ValueError(f"dataset has {n} rows, fewer than one global batch of {global_batch}; "
                         "lower the batch size")
    epoch, b = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    start = b * global_batch + rank * batch_size
    return perm[start:start + batch_size]


def lr_factor(step: int, cfg: StageConfig) -> float:
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    if cfg.schedule == "constant":
        return warm
    if cfg.schedule == "cosine":
        progress = max(0.0, step + 1 - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return warm * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"schedule={cfg.schedule!r}; accepted: cosine, constant")


class Checkpoints:
    """`dir/step-00001000/` folders written by accelerate's save_state (plus `ema.safetensors` when the
    stage keeps an EMA model). A checkpoint is written into a temporary folder and renamed into place when
    complete, so a kill mid-save never leaves a half one."""

    def __init__(self, directory: Path, keep: int, ema: torch.nn.Module | None = None):
        self.dir = Path(directory)
        self.keep = keep
        self.ema = ema

    def all(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("step-*") if (p / "step.json").is_file())

    def save(self, accelerator: Accelerator, step: int) -> None:
        final = self.dir / f"step-{step:08d}"
        tmp = self.dir / f".tmp-step-{step:08d}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        if accelerator.is_main_process:
            if self.ema is not None:
                save_file(cpu_state(self.ema), str(tmp / "ema.safetensors"))
            (tmp / "step.json").write_text(json.dumps({"step": step}))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self.all()[:-self.keep] if self.keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def resume(self, accelerator: Accelerator) -> int:
        """Load the newest checkpoint that loads; return its step (0 when there is none)."""
        for path in reversed(self.all()):
            try:
                accelerator.load_state(str(path))
                if self.ema is not None:
                    self.ema.load_state_dict(load_file(str(path / "ema.safetensors")))
                return json.loads((path / "step.json").read_text())["step"]
            except Exception as e:  # a damaged checkpoint must not cost the older, good ones
                log.warning(f"checkpoint {path} failed to load ({e}); trying an older one")
        return 0


def fit(
    accelerator: Accelerator,
    name: str,
    model: torch.nn.Module,
    cfg: StageConfig,
    get_batch: Callable[[int], object],
    loss_fn: Callable[[torch.nn.Module, object], tuple[torch.Tensor, dict]],
    out_dir: Path,
    on_image: Callable[[int], None] | None = None,
    ema: torch.nn.Module | None = None,
    ema_decay: float = 0.999,
) -> torch.nn.Module:
    """Train `model` for `cfg.steps` steps, resuming from `out_dir/checkpoints`; returns the unwrapped model.
    `ema`, a copy of the model, tracks an exponential moving average of its weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                  foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    accelerator.free_memory()  # forget earlier stages' objects: a checkpoint holds this stage's alone
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    checkpoints = Checkpoints(out_dir / "checkpoints", cfg.keep_checkpoints, ema)
    if ema is not None:
        ema.requires_grad_(False)
        ema_params = list(ema.parameters())
        live_params = list(accelerator.unwrap_model(model).parameters())
    start = checkpoints.resume(accelerator)
    if start:
        log.info(f"{name}: resumed from step {start}")
    model.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=name,
               disable=not accelerator.is_local_main_process, mininterval=1.0)
    tick, tick_step = time.perf_counter(), start
    for step in bar:
        with accelerator.autocast():
            loss, logs = loss_fn(model, get_batch(step))
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:  # a short warmup so early EMA weights are not mostly the random init
            torch._foreach_lerp_(ema_params, live_params, 1 - min(ema_decay, (1 + step) / (10 + step)))
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            # The only host syncs of the loop: .item() on log steps.
            now = time.perf_counter()
            scalars = {f"{name}/{k}": float(v) for k, v in logs.items()}
            scalars.update({f"{name}/loss": loss.item(), f"{name}/grad_norm": float(grad_norm),
                            f"{name}/lr": scheduler.get_last_lr()[0],
                            f"{name}/samples_per_s": (done - tick_step) * cfg.batch_size
                            * accelerator.num_processes / (now - tick)})
            accelerator.log(scalars, step=done)
            bar.set_postfix(loss=f"{scalars[f'{name}/loss']:.4f}", refresh=False)
            tick, tick_step = now, done
        if on_image is not None and accelerator.is_main_process and (done % cfg.image_every == 0 or done == cfg.steps):
            on_image(done)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            checkpoints.save(accelerator, done)
    return accelerator.unwrap_model(model)
