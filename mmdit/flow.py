"""Rectified flow: the training objective and the samplers, in the spirit of minRF.

Straight paths between data and noise, x_t = (1 - t) x0 + t * noise, t in [0, 1]; the model predicts the
velocity v = noise - x0 (constant along a path), so sampling integrates dx/dt = v from t = 1 (pure noise)
down to t = 0. Training draws t from a logit-normal distribution (SD3), which spends the steps where the
velocity is hardest to predict: the middle of the path.
"""
from __future__ import annotations

from typing import Callable

import torch

from mmdit.sampling import edit_steps

# model(x_t (B, C, H, W), t (B,)) -> velocity (B, C, H, W); the conditioning is bound in by the caller.
VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sample_t(n: int, mean: float = 0.0, std: float = 1.0, device=None, generator=None) -> torch.Tensor:
    """(n,) times from a logit-normal distribution: sigmoid(N(mean, std^2))."""
    return torch.sigmoid(mean + std * torch.randn(n, device=device, generator=generator))


def flow_loss(velocity: VelocityFn, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE between predicted and true velocity, shape (B,) (mean it for the loss; bin it by t
    to see which noise levels are learned)."""
    t_ = t.view(-1, *([1] * (x0.dim() - 1)))
    x_t = (1 - t_) * x0 + t_ * noise
    return (velocity(x_t, t) - (noise - x0)).float().pow(2).flatten(1).mean(1)


def cfg_combine(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float, v_negative: torch.Tensor | None = None,
                negative_scale: float = 1.0) -> torch.Tensor:
    """Classifier-free guidance: v_uncond + scale * (v_cond - v_uncond); scale 1 = the conditional model. With a
    negative prompt's prediction, also - negative_scale * (v_negative - v_uncond) (composable guidance);
    negative_scale = scale - 1 is the negative prompt in place of the unconditional one."""
    guided = v_uncond + scale * (v_cond - v_uncond)
    return guided if v_negative is None else guided - negative_scale * (v_negative - v_uncond)


@torch.no_grad()
def sample(velocity: VelocityFn, noise: torch.Tensor, steps: int = 25, sampler: str = "euler",
           x0: torch.Tensor | None = None, strength: float = 1.0, known: torch.Tensor | None = None) -> torch.Tensor:
    """Integrate from t = 1 (noise) to t = 0 (data) in `steps` uniform steps. Heun (the trapezoid rule with an
    Euler predictor) costs two model calls a step and is second-order accurate.

    Editing, from the latents x0 of an image (B, C, H, W): start at t = strength on its path,
    x = (1 - t) x0 + t * noise, and integrate the rest in ceil(strength * steps) steps of the same length
    (strength 1 = text-to-image). `known` (B, 1, H, W) bool, inpainting: after every step those cells are put
    back on x0's path at the new t, with the same noise (RePaint), so they end at x0 itself."""
    if steps < 1:
        raise ValueError(f"steps={steps}; accepted: an integer >= 1")
    if sampler not in ("euler", "heun"):
        raise ValueError(f"sampler={sampler!r}; accepted: euler, heun")
    x = noise if x0 is None else (1 - strength) * x0 + strength * noise
    ts = torch.linspace(strength, 0.0, edit_steps(steps, strength) + 1, device=noise.device)
    for t, t_next in zip(ts[:-1], ts[1:]):
        v = velocity(x, t.expand(len(x)))
        x_next = x + (t_next - t) * v
        if sampler == "heun":
            v_next = velocity(x_next, t_next.expand(len(x)))
            x_next = x + (t_next - t) * (v + v_next) / 2
        x = x_next if known is None else torch.where(known, (1 - t_next) * x0 + t_next * noise, x_next)
    return x
