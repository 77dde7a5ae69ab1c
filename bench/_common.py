"""What the DiT benchmarks share: the benchmarked configs, thread setup, interleaved timing, the measured
matmul peak, the matched diffusers models, and one table printer.

Timing on a shared machine: every benchmark runs its candidates in one process, interleaved
(a, b, a, b, ...), and reports medians, so load from other processes hits all of them alike and the
ratios stay meaningful even when absolute numbers move.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from mmdit import compat
from mmdit.config import load_config
from mmdit.dit import DiT, DiTConfig, DiTModelConfig

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "shapes.yaml"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GPU_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "imagefolder-256-gpu.yaml"
DEVICE = torch.device("cpu")  # set once by set_device(), from the scripts' --device


@dataclass
class Setting:
    """A DiT config plus the batch it is benchmarked at; text is `text_len` tokens of `cfg.text_dim`."""
    name: str
    cfg: DiTModelConfig
    batch: int
    text_len: int = 16


def settings(mode: str) -> list[Setting]:
    """The issue's matched config (batch 64, 8x8x8 latents, patch 1, width 256, depth 6, 16 tokens of 384),
    the project's default DiT stage (configs/shapes.yaml: same latents and text, its width/depth/batch), and
    `gpu`: the DiT-B/2 stage of configs/imagefolder-256-gpu.yaml (32x32x8 latents, 77 CLIP-L tokens of 768)."""
    data = {"in_channels": 8, "input_size": 8, "text_dim": 384, "codebook_size": 1024}
    cfg = load_config(DEFAULT_CONFIG)
    default = replace(cfg.dit, patch_size=1, mode=mode).for_data(**data)
    gpu = load_config(GPU_CONFIG)
    big = replace(gpu.dit, mode=mode).for_data(in_channels=gpu.vqvae.code_dim, input_size=32, text_dim=768,
                                               codebook_size=gpu.vqvae.codebook_size)
    matched = DiTConfig(width=256, depth=6, heads=4, patch_size=1, mode=mode).for_data(**data)
    return [Setting("matched", matched, 64),
            Setting("default", default, cfg.dit_train.batch_size, cfg.text_encoder.max_length),
            Setting("gpu", big, gpu.dit_train.batch_size, gpu.text_encoder.max_length)]


def set_threads(n: int) -> int:
    torch.set_num_threads(n)
    return torch.get_num_threads()


def set_device(name: str) -> torch.device:
    """Where models and inputs live; on CUDA, TF32 for fp32 matmuls, as accelerate's default does not."""
    global DEVICE
    DEVICE = torch.device(name)
    if DEVICE.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {name}: torch sees no CUDA device here; accepted: cpu")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return DEVICE


def sync() -> None:
    """Wait for queued GPU work, so that a timer measures it (a no-op on the CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def machine() -> str:
    if DEVICE.type == "cuda":
        return (f"{torch.cuda.get_device_name(DEVICE)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
                f"{os.cpu_count()} CPUs")
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    isa = torch.backends.cpu.get_cpu_capability()
    return (f"{model} ({os.cpu_count()} CPUs, {isa}, native bf16: {native_bf16()}), "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")


def native_bf16() -> bool:
    """AMX / AVX512-BF16 (what `mixed_precision: auto` checks); without them bf16 runs reference kernels."""
    if DEVICE.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return compat.cpu_has_native_bf16()


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each fn; calls interleaved round-robin, after `warmup` untimed rounds."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + reps):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def matmul(dtype: torch.dtype, n: int | None = None) -> tuple[Callable[[], object], float]:
    """A square F.linear (the machine's attainable GEMM rate, by the kernel nn.Linear uses: MKL for fp32,
    oneDNN for bf16, which is ~4x faster than bf16 `a @ b` without native bf16) and its FLOPs. bf16 without
    native support gets a smaller n to keep the run short; a GPU needs a large one to reach its peak."""
    n = n or (8192 if DEVICE.type == "cuda" else 2048 if dtype == torch.float32 or native_bf16() else 1024)
    a, w = (torch.randn(n, n, dtype=dtype, device=DEVICE) for _ in range(2))
    return (lambda: torch.nn.functional.linear(a, w)), 2.0 * n ** 3


def random_text(s: Setting, batch: int | None = None, seed: int = 0):
    """text (B, L, D), mask (B, L) with real captions of 6..L tokens then padding, pooled (B, D)."""
    b, g = batch or s.batch, torch.Generator().manual_seed(seed)
    text = torch.randn(b, s.text_len, s.cfg.text_dim, generator=g)
    lengths = torch.randint(6, s.text_len + 1, (b,), generator=g)
    mask = torch.arange(s.text_len)[None] < lengths[:, None]
    return text.to(DEVICE), mask.to(DEVICE), torch.randn(b, s.cfg.text_dim, generator=g).to(DEVICE)


# --- the diffusers peers ----------------------------------------------------------------------------------

class DiffusersDiT(nn.Module):
    """diffusers' PixArtTransformer2DModel (cross) or SD3Transformer2DModel (joint) built at a DiTConfig and
    called like mmdit's DiT: (x, t in [0, 1], text, text_mask, pooled) -> velocity. Random weights: only
    the speed is compared. `cfg` is kept so TextToImagePipeline can drive it like a DiT."""

    def __init__(self, cfg: DiTModelConfig):
        super().__init__()
        try:
            from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel
        except ImportError:
            raise SystemExit("the diffusers comparison needs diffusers: pip install -e '.[bench]'") from None
        self.cfg = cfg
        head_dim = cfg.width // cfg.heads
        if cfg.mode == "cross":
            # sample_size != 128 turns off PixArt's resolution/aspect-ratio conditioning (ours has none);
            # its MLP ratio is fixed at 4 (BasicTransformerBlock), as ours at the matched config.
            self.net = PixArtTransformer2DModel(
                num_attention_heads=cfg.heads, attention_head_dim=head_dim, in_channels=cfg.in_channels,
                out_channels=cfg.in_channels, num_layers=cfg.depth, cross_attention_dim=cfg.width,
                sample_size=cfg.input_size, patch_size=cfg.patch_size, caption_channels=cfg.text_dim,
                interpolation_scale=1)
        else:
            # SD3's last block is context_pre_only, as ours; it masks no text padding (ours does).
            self.net = SD3Transformer2DModel(
                sample_size=cfg.input_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
                num_layers=cfg.depth, attention_head_dim=head_dim, num_attention_heads=cfg.heads,
                joint_attention_dim=cfg.text_dim, caption_projection_dim=cfg.width,
                pooled_projection_dim=cfg.text_dim, out_channels=cfg.in_channels,
                pos_embed_max_size=cfg.input_size // cfg.patch_size, qk_norm="rms_norm" if cfg.qk_norm else None)

    def forward(self, x, t, text, text_mask, pooled):
        if self.cfg.mode == "cross":
            return self.net(x, text, timestep=1000 * t, encoder_attention_mask=text_mask,
                            added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        return self.net(x, text, pooled_projections=pooled, timestep=1000 * t, return_dict=False)[0]


def train(config: str | Path, overrides: list[str]) -> None:
    """What `train/train.py --config CONFIG OVERRIDES` runs, without its command line and run lock (a benchmark
    trains into a fresh temporary directory): mmdit.stages.run on the checked config."""
    from mmdit.stages import check_inputs, run  # accelerate and the stages: only the scripts that train need them

    cfg = load_config(config, overrides)
    check_inputs(cfg)
    run(cfg)


def build(impl: str, cfg: DiTModelConfig, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return (DiT(cfg) if impl == "mmdit" else DiffusersDiT(cfg)).to(DEVICE)


def peer(mode: str) -> str:
    return "PixArt" if mode == "cross" else "SD3"


def table(rows: list[dict], columns: list[str]) -> str:
    """Rows of dicts -> a fixed-width text table; floats get 3 significant digits."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
