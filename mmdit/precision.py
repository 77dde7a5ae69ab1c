"""Mixed precision: which one a stage trains in, and the autocast that applies it.

`train.mixed_precision`: "no" (fp32), "bf16" and "fp16" force; "auto" picks
- on CUDA: bf16 where the GPU supports it, else fp16;
- on a CPU without native bf16 (no AMX / AVX512-BF16): fp32, since bf16 then runs reference kernels;
- on a CPU with native bf16: whichever of fp32 and bf16 runs the stage's own training step faster, measured
  on its first batch (a few steps of forward + backward on a copy of the model, interleaved). Neither
  always wins there: small models are faster in fp32, larger ones in bf16 (docs/speed.md).
The choice is logged with both timings and recorded with each checkpoint, so a resumed run keeps it.

bf16 and fp32 need no loss scaling: the training loop runs them under `autocast` below, with the
Accelerator itself in fp32. fp16 needs accelerate's grad scaler, so only then is the Accelerator told.
"""
from __future__ import annotations

import contextlib
import copy
import time
from typing import Callable

import torch

from mmdit import compat

CHOICES = ("auto", "no", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check(requested: str) -> str:
    if requested not in CHOICES:
        raise ValueError(f"train.mixed_precision={requested!r}; accepted: {', '.join(CHOICES)}")
    return requested


def resolve(requested: str, device: torch.device) -> str:
    """-> "no" | "bf16" | "fp16", or "measure" where only a timing can tell (a bf16-native CPU)."""
    if check(requested) != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "measure" if compat.cpu_has_native_bf16() else "no"
    return "no"


def accelerator_precision(requested: str) -> str:
    """What the Accelerator is built with: fp16 (its grad scaler) where fp16 is chosen, else "no"."""
    return "fp16" if resolve(requested, torch.device("cuda" if torch.cuda.is_available() else "cpu")) == "fp16" \
        else "no"


def autocast(device: torch.device, precision: str):
    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def measure(model: torch.nn.Module, loss_fn: Callable, batch, device: torch.device,
            candidates: tuple[str, ...] = ("no", "bf16"), warmup: int = 2, reps: int = 3) -> dict[str, float]:
    """Median seconds of one forward + backward of `loss_fn(model copy, batch)` in each precision. On a copy
    and with the RNG restored, so the run after it is exactly the run without it."""
    probe = copy.deepcopy(model).train()
    times: dict[str, list[float]] = {p: [] for p in candidates}
    with torch.random.fork_rng(devices=[]):
        for rep in range(warmup + reps):
            for p in candidates:  # interleaved: a machine that speeds up or slows down affects both alike
                start = time.perf_counter()
                with autocast(device, p):
                    loss, _ = loss_fn(probe, batch)
                loss.backward()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if rep >= warmup:
                    times[p].append(time.perf_counter() - start)
                probe.zero_grad(set_to_none=True)
    return {p: sorted(t)[len(t) // 2] for p, t in times.items()}
