"""VQ-VAE image tokenizer: images (B, 3, H, W) in [-1, 1] <-> latents (B, d, H/f, W/f) <-> code indices.

Encoder and decoder are the usual convolutional stacks (residual blocks with GroupNorm + SiLU, stride-2
downsampling, optional self-attention at the lowest resolution). Between them a vector quantizer snaps each
latent vector to the nearest of K codes, or rounds it on a fixed grid (FSQ, below):
- distances are computed in fp32 even under bf16 autocast (bf16 argmin picks wrong codes);
- the codebook is learned by exponential moving averages of the vectors assigned to each code (no codebook
  loss, no optimizer state), with an optional l2-normalised / cosine variant (ViT-VQGAN, LlamaGen);
- codes unused for `dead_code_steps` training steps are re-seeded from the current encoder outputs, which
  keeps codebook usage high;
- a training forward only accumulates what it saw; `update()` applies it once per optimizer step (so the
  EMA decay and the dead-code count mean the same with gradient accumulation), and skips it when the step
  is skipped or any encoder output was not finite (one NaN would otherwise poison the codebook for good);
- gradients pass the quantizer by the straight-through estimator, with a commitment loss (weight beta).
With `fsq_levels` the quantizer is finite scalar quantization (Mentzer et al. 2023): channel i is bounded and
rounded to one of fsq_levels[i] values, the codebook is the grid of their combinations (nothing learned, no
dead codes), and nearby codes differ in one channel by one step: a codebook with structure, for the masked
objective to predict.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from mmdit import weights
from mmdit.checks import check_int, check_number


@dataclass
class VQVAEConfig:
    patch_size: int = 1  # pixels folded into channels first (space-to-depth): cheap full-resolution stage
    channels: int = 64
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])  # one per resolution below the patch
    num_res_blocks: int = 1
    attention: bool = False  # self-attention block at the lowest resolution
    codebook_size: int = 512
    code_dim: int = 8
    beta: float = 0.25  # commitment loss weight
    ema_decay: float = 0.99
    l2_normalize: bool = False  # cosine lookup on the unit sphere
    dead_code_steps: int = 100  # re-seed a code unused for this many training steps (0 = never)
    fsq_levels: list[int] = field(default_factory=list)  # [] = the learned codebook; else FSQ with these levels
    # per channel, e.g. [8, 5, 5, 5]: then code_dim is their count and codebook_size their product

    @property
    def downsample(self) -> int:
        return self.patch_size * 2 ** (len(self.channel_mult) - 1)

    def __post_init__(self):
        for key in ("patch_size", "channels", "codebook_size", "code_dim"):
            check_int(f"vqvae.{key}", getattr(self, key))
        check_int("vqvae.num_res_blocks", self.num_res_blocks, low=0)  # 0 builds: the decoder adds one per level
        check_int("vqvae.dead_code_steps", self.dead_code_steps, low=0, accepted="0 (never) or an integer >= 1")
        check_number("vqvae.beta", self.beta, "a finite number >= 0", lambda v: v >= 0)
        check_number("vqvae.ema_decay", self.ema_decay, "a number in [0, 1)", lambda v: 0 <= v < 1)
        mult = self.channel_mult
        if not (isinstance(mult, (list, tuple)) and mult and all(type(m) is int and m >= 1 for m in mult)):
            raise ValueError(f"vqvae.channel_mult={mult!r}; accepted: a non-empty list of integers >= 1, one per "
                             "resolution, e.g. [1, 2, 2]")
        levels = self.fsq_levels
        if not (isinstance(levels, (list, tuple)) and all(type(v) is int and v >= 2 for v in levels)):
            raise ValueError(f"vqvae.fsq_levels={levels!r}; accepted: [] (a learned codebook) or a list of "
                             "integers >= 2, one per latent channel, e.g. [8, 5, 5, 5]")
        if levels and (self.code_dim, self.codebook_size) != (len(levels), prod(levels)):
            raise ValueError(f"vqvae.fsq_levels={list(levels)} makes {prod(levels)} codes of {len(levels)} "
                             f"channels, but vqvae.codebook_size={self.codebook_size}, vqvae.code_dim="
                             f"{self.code_dim}; accepted: codebook_size={prod(levels)} code_dim={len(levels)}")
        if self.downsample not in (1, 2, 4, 8, 16):
            raise ValueError(f"vqvae: patch_size {self.patch_size} x 2**(len(channel_mult) - 1) gives a "
                             f"downsampling factor of {self.downsample}; accepted: 1, 2, 4, 8, 16")


def _norm(c: int) -> nn.GroupNorm:
    # At most 32 groups of at least 4 channels, and a count that divides c (any width builds).
    groups = max(g for g in range(1, min(32, max(1, c // 4)) + 1) if c % g == 0)
    return nn.GroupNorm(groups, c, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.block = nn.Sequential(_norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
                                   _norm(c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        return self.skip(x) + self.block(x)


class AttnBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=-1)  # (B, hw, C) each
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(out.transpose(1, 2).reshape(b, c, h, w))


def _middle(c: int, attention: bool) -> list[nn.Module]:
    return [ResBlock(c, c)] + ([AttnBlock(c), ResBlock(c, c)] if attention else [])


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        layers: list[nn.Module] = [nn.PixelUnshuffle(cfg.patch_size),
                                   nn.Conv2d(3 * cfg.patch_size ** 2, widths[0], 3, padding=1)]
        c = widths[0]
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(c, width))
                c = width
            if level < len(widths) - 1:
                layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        layers += _middle(c, cfg.attention) + [_norm(c), nn.SiLU(), nn.Conv2d(c, cfg.code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        widths = [cfg.channels * m for m in reversed(cfg.channel_mult)]
        c = widths[0]
        layers: list[nn.Module] = [nn.Conv2d(cfg.code_dim, c, 3, padding=1)] + _middle(c, cfg.attention)
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResBlock(c, width))
                c = width
            if level < len(widths) - 1:
                layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
        layers += [_norm(c), nn.SiLU(), nn.Conv2d(c, 3 * cfg.patch_size ** 2, 3, padding=1),
                   nn.PixelShuffle(cfg.patch_size)]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


class VectorQuantizer(nn.Module):
    """Nearest-code lookup with an EMA-learned codebook and dead-code restart."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        codes = torch.randn(cfg.codebook_size, cfg.code_dim)
        if cfg.l2_normalize:
            codes = F.normalize(codes, dim=1)
        # The codebook is state, not a parameter: EMA updates it, the optimizer never sees it.
        self.register_buffer("codebook", codes)  # (K, d)
        self.register_buffer("ema_count", torch.ones(cfg.codebook_size))
        self.register_buffer("ema_sum", codes.clone())
        self.register_buffer("unused_steps", torch.zeros(cfg.codebook_size, dtype=torch.long))
        # What this optimizer step's micro-batches assigned, until update(): never saved (empty between steps).
        self.register_buffer("step_count", torch.zeros(cfg.codebook_size), persistent=False)
        self.register_buffer("step_sum", torch.zeros(cfg.codebook_size, cfg.code_dim), persistent=False)
        self.recent: torch.Tensor | None = None  # the last micro-batch's encoder outputs: seeds for dead codes

    def codes(self) -> torch.Tensor:
        return F.normalize(self.codebook, dim=1) if self.cfg.l2_normalize else self.codebook

    def lookup(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, d) fp32 -> (N,) index of the nearest code (the max cosine, when l2-normalised)."""
        codes = self.codes()
        if self.cfg.l2_normalize:
            return (flat @ codes.t()).argmax(dim=1)
        distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.t() + codes.pow(2).sum(1)
        return distances.argmin(dim=1)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) indices -> (B, d, h, w) quantized latents."""
        return self.codes()[indices].permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """z (B, d, h, w) -> (quantized (B, d, h, w) with straight-through gradient, indices (B, h, w),
        commitment loss, stats)."""
        b, d, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):
            flat = z.float().permute(0, 2, 3, 1).reshape(-1, d)  # (N, d), N = B*h*w
            if self.cfg.l2_normalize:
                flat = F.normalize(flat, dim=1)
            indices = self.lookup(flat)
            counts = torch.bincount(indices, minlength=self.cfg.codebook_size).float()
            if self.training:
                self.step_count += counts
                self.step_sum.index_add_(0, indices, flat.detach())
                self.recent = flat.detach()
            quantized = self.codes()[indices]
            loss = self.cfg.beta * F.mse_loss(flat, quantized.detach())
            quantized = flat + (quantized - flat).detach()
        quantized = quantized.view(b, h, w, d).permute(0, 3, 1, 2)
        return quantized, indices.view(b, h, w), loss, code_stats(counts)

    def snap(self, latents: torch.Tensor) -> torch.Tensor:
        """Any latents (B, d, h, w) -> their nearest codes."""
        return self(latents)[0]

    @torch.no_grad()
    def update(self, skip: bool | torch.Tensor = False) -> bool:
        """Apply the optimizer step's assignments to the codebook (EMA, then dead-code restart), on every process
        alike; `skip` (the step was skipped) or a non-finite encoder output anywhere leaves it unchanged.
        Returns whether it was updated."""
        counts, sums = self.step_count.clone(), self.step_sum.clone()
        self.step_count.zero_()
        self.step_sum.zero_()
        if self.recent is None:  # no training forward since the last update
            return False
        if dist.is_available() and dist.is_initialized():  # every process must keep the same codebook
            dist.all_reduce(counts)
            dist.all_reduce(sums)  # NaN anywhere -> NaN everywhere: the skip below is decided the same on all
        flat, self.recent = self.recent, None
        if bool(skip) or not bool(torch.isfinite(sums).all()):
            return False
        decay = self.cfg.ema_decay
        self.ema_count.mul_(decay).add_(counts, alpha=1 - decay)
        self.ema_sum.mul_(decay).add_(sums, alpha=1 - decay)
        # Laplace smoothing keeps a rarely used code from dividing by ~0.
        n = self.ema_count.sum()
        smoothed = (self.ema_count + 1e-5) / (n + self.cfg.codebook_size * 1e-5) * n
        self.codebook.copy_(self.ema_sum / smoothed[:, None])
        self.unused_steps.add_(1).masked_fill_(counts > 0, 0)
        if self.cfg.dead_code_steps > 0:
            self.restart_dead_codes(flat)
        return True

    @torch.no_grad()
    def restart_dead_codes(self, flat: torch.Tensor) -> int:
        """Re-seed codes unused for `dead_code_steps` steps with random current encoder outputs."""
        dead = (self.unused_steps >= self.cfg.dead_code_steps).nonzero().squeeze(1)
        if len(dead) == 0:
            return 0
        picks = torch.randint(len(flat), (len(dead),), device=flat.device)
        fresh = flat[picks] + 1e-3 * torch.randn_like(flat[picks])  # a nudge, so twins can separate
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(fresh, src=0)
        mean_count = self.ema_count.mean()
        self.codebook[dead] = fresh
        self.ema_sum[dead] = fresh * mean_count
        self.ema_count[dead] = mean_count
        self.unused_steps[dead] = 0
        return len(dead)


class FiniteScalarQuantizer(nn.Module):
    """FSQ: each channel squashed by tanh into fsq_levels[i] steps and rounded (straight-through), scaled to
    [-1, 1]; code index = the mixed-radix number of the channels' steps. No state, no loss, no update."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        levels = torch.tensor(cfg.fsq_levels, dtype=torch.float32)
        self.register_buffer("levels", levels, persistent=False)  # (d,)
        self.register_buffer("radix", torch.cumprod(torch.cat([torch.ones(1), levels[:-1]]), 0), persistent=False)
        # An even count of levels has no middle one: shift by half a step so rounding gives exactly L values.
        self.register_buffer("offset", (1 - levels % 2) / 2, persistent=False)
        self.register_buffer("half_span", (levels - 1) / 2, persistent=False)

    def steps(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, d) -> (N, d) the rounded step of each channel, in 0 .. L-1, differentiable straight through."""
        bounded = torch.tanh(flat + torch.atanh(self.offset / self.half_span)) * self.half_span - self.offset
        return bounded + (bounded.round() - bounded).detach() + (self.levels // 2)

    def scale(self, steps: torch.Tensor) -> torch.Tensor:
        return (steps - self.levels // 2) / (self.levels // 2)

    def codes(self) -> torch.Tensor:
        """(K, d): every code, in index order."""
        index = torch.arange(self.cfg.codebook_size, device=self.levels.device)[:, None]
        return self.scale(torch.div(index, self.radix, rounding_mode="floor") % self.levels)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) indices -> (B, d, h, w) quantized latents."""
        return self.codes()[indices].permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """As VectorQuantizer.forward; the loss is 0 (nothing to commit to)."""
        b, d, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):
            steps = self.steps(z.float().permute(0, 2, 3, 1).reshape(-1, d))  # (N, d)
            indices = (steps.detach().round() * self.radix).sum(1).long()
            counts = torch.bincount(indices, minlength=self.cfg.codebook_size).float()
            quantized = self.scale(steps).view(b, h, w, d).permute(0, 3, 1, 2)
        return quantized, indices.view(b, h, w), z.new_zeros(()).float(), code_stats(counts)

    def snap(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents in the codes' space (B, d, h, w) (not encoder outputs) -> the nearest grid codes."""
        shape = (1, -1, 1, 1)
        half = (self.levels // 2).view(shape)
        steps = (latents.float() * half).round() + half
        return self.scale(torch.minimum(steps.clamp(min=0), self.levels.view(shape) - 1).movedim(1, -1)).movedim(-1, 1)

    def update(self, skip: bool | torch.Tensor = False) -> bool:
        return False  # a fixed grid: nothing to update


def code_stats(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Usage (fraction of codes used) and perplexity (exp of the entropy of code frequencies)."""
    p = counts / counts.sum().clamp(min=1)
    return {"usage": (counts > 0).float().mean(), "perplexity": torch.exp(-(p * torch.log(p + 1e-10)).sum())}


class VQVAE(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = FiniteScalarQuantizer(cfg) if cfg.fsq_levels else VectorQuantizer(cfg)
        self.decoder = Decoder(cfg)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) in [-1, 1] -> (quantized latents (B, d, h, w), indices (B, h, w))."""
        quantized, indices, _, _ = self.quantizer(self.encoder(images))
        return quantized, indices

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, d, h, w) -> images (B, 3, H, W), roughly in [-1, 1] (not clamped)."""
        return self.decoder(latents)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.decode(self.quantizer.embed(indices))

    def quantize(self, latents: torch.Tensor) -> torch.Tensor:
        """Snap any latents (e.g. sampled by a diffusion model) to their nearest codes."""
        return self.quantizer.snap(latents)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """-> (reconstructions, commitment loss, code stats)."""
        quantized, _, commit, stats = self.quantizer(self.encoder(images))
        return self.decoder(quantized), commit, stats

    def save_pretrained(self, directory: str | Path) -> None:
        weights.save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "VQVAE":
        return weights.from_pretrained(cls, VQVAEConfig, directory)


def psnr(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = (images.float() - reconstructions.float().clamp(-1, 1)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp(min=1e-10))
