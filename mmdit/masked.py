"""Masked-token generation (MaskGIT, Muse): the training objective and the iterative parallel decoder.

The image is the VQ-VAE's grid of code indices. Training hides a random share r of them behind a [MASK] id,
r = cos(pi/2 * u) with u ~ U(0, 1) (most steps mask a lot: generation starts from all masked), and the model
predicts the hidden codes: cross-entropy on the masked positions only. The mask ratio plays the part flow's t
plays (1 = nothing known), and is embedded the same way.

Sampling starts with every position masked and, over T steps, predicts all of them at once, keeps the most
confident predictions and re-masks the rest: after step i, floor(N * cos(pi/2 * (i+1)/T)) positions stay masked,
none after the last. A decided token never changes. Confidence is log p(token) plus Gumbel noise scaled by
`randomness * (1 - (i+1)/T)`, so early steps explore and late steps commit.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from mmdit.sampling import edit_steps

# model(tokens (B, N) long with [MASK] = K, ratio (B,)) -> logits (B, N, K); the conditioning is bound in.
LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mask_ratio(u: torch.Tensor) -> torch.Tensor:
    """The cosine schedule: the share of tokens masked at uniform position u in [0, 1]."""
    return torch.cos(math.pi / 2 * u)


def mask_tokens(tokens: torch.Tensor, mask_id: int, u: torch.Tensor, scores: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens (B, N), u (B,) in [0, 1), scores (B, N) uniform -> (inputs with the masked positions set to mask_id,
    masked (B, N) bool, the mask ratio (B,)). Image b masks its floor(N * ratio) lowest-scored positions, at least
    one: the random draws come from the caller, so a batch is a pure function of (seed, step)."""
    n = tokens.shape[1]
    ratio = mask_ratio(u)
    count = (ratio * n).floor().clamp(1, n)  # (B,)
    rank = scores.argsort(dim=1).argsort(dim=1)  # (B, N): the rank of each position's score
    masked = rank < count[:, None]
    return torch.where(masked, mask_id, tokens), masked, count / n


def masked_loss(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor,
                label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-sample cross-entropy (B,) over the masked positions only: logits (M, K) of the M masked positions
    in row-major order (as `x[masked]` picks them; the model computes no others), targets (B, N) long,
    masked (B, N) bool."""
    ce = F.cross_entropy(logits.float(), targets[masked].long(), reduction="none",
                         label_smoothing=label_smoothing)  # (M,)
    sums = torch.zeros(len(targets), device=ce.device).index_add_(0, masked.nonzero()[:, 0], ce)
    return sums / masked.sum(1).clamp(min=1)


def still_masked(i: int, steps: int, total: torch.Tensor, masked_now: torch.Tensor) -> torch.Tensor:
    """How many positions stay masked after step i (0-based) of `steps`, per image: the cosine schedule scaled to
    the `total` (B,) positions the decoding started with, at least 1 and at most masked_now - 1 (every step
    decides something), 0 after the last."""
    if i == steps - 1:
        return torch.zeros_like(masked_now)
    keep = (total.double() * math.cos(math.pi / 2 * (i + 1) / steps)).floor().long()
    return keep.minimum(masked_now - 1).clamp(min=1).minimum(masked_now)


def gumbel(uniform: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(uniform.clamp(1e-20, 1 - 1e-7)))


def plausibility(logits_fn: LogitsFn, tokens: torch.Tensor, mask_id: int, uniforms: torch.Tensor) -> torch.Tensor:
    """log p(token) (B, n) of each of an image's tokens under the prompt (the guided logits), read in two passes
    with complementary halves hidden (by `uniforms` (B, n)): the model predicts only hidden tokens, as trained.
    Re-masking the least plausible first is what lets an edit reach the tokens the prompt disagrees with (the
    object's, when the prompt names another colour) instead of a random share of them."""
    hide = uniforms < 0.5
    logp = torch.zeros(tokens.shape, device=tokens.device)
    for half in (hide, ~hide):
        logits = logits_fn(torch.where(half, mask_id, tokens), half.float().mean(1)).float()  # (B, n, K)
        logp = torch.where(half, logits.log_softmax(-1).gather(-1, tokens[..., None])[..., 0], logp)
    return logp


def lowest(scores: torch.Tensor, group: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The count (B,) positions of `group` (B, n) bool with the lowest scores (B, n) -> bool (B, n)."""
    rank = torch.where(group, scores, math.inf).argsort(dim=1).argsort(dim=1)
    return group & (rank < count[:, None])


@torch.no_grad()
def sample(logits_fn: LogitsFn, generators: list[torch.Generator], n: int, codebook_size: int, device,
           steps: int = 12, temperature: float = 1.0, randomness: float = 4.5, tokens: torch.Tensor | None = None,
           region: torch.Tensor | None = None, strength: float = 1.0) -> torch.Tensor:
    """MaskGIT decoding of len(generators) images of n tokens -> code indices (B, n). Image b's random draws
    come from generators[b] alone, so a picture does not depend on the batch it is decoded in.

    Editing, from the code indices `tokens` (B, n) of an image: re-mask round(strength * R) of the R positions
    of `region` (B, n) bool (None = all: image-to-image; the repainted cells: inpainting), the least plausible
    under the prompt first (`plausibility`: two more model calls), and decode them in ceil(strength * steps)
    steps, the schedule scaled to that count. The tokens kept (outside the region; in image-to-image, those not
    re-masked) are never decoded: the same share `strength` of them, chosen at random, is hidden at the start
    and revealed with their own values on the same schedule, so that the model sees a random share of the image
    masked, as in training. (Shown the rest of the image whole, it reads the hole as where the object is and
    fills it: objects come out too large and off-centre; docs/editing.md has the numbers.)"""
    b, mask_id = len(generators), codebook_size
    steps = edit_steps(steps, strength)
    # Two uniforms per image, step and position, drawn up front: one picks the token (inverse CDF), one is the
    # confidence noise (outside the region: the order of revealing). (K per position for a Gumbel-max draw
    # would be most of a step's sampling work.)
    draws = torch.stack([torch.rand(steps, n, 2, generator=g) for g in generators]).to(device)  # (B, T, n, 2)
    whole = region is None
    region = torch.ones(b, n, dtype=torch.bool, device=device) if whole else region

    def share(group: torch.Tensor) -> torch.Tensor:  # (B,): strength's share of each image's group, rounded
        return (strength * group.sum(1)).round().long()

    if tokens is None:
        known = torch.full((b, n), mask_id, dtype=torch.long, device=device)
        masked = region
    else:  # after the decoding's draws, so that strength 1 over the whole image draws as text-to-image does
        known = tokens.long()
        uniforms = torch.stack([torch.rand(n, generator=g) for g in generators]).to(device)  # (B, n)
        # the least likely under the prompt first, the uniforms breaking ties
        scores = plausibility(logits_fn, known, mask_id, uniforms) + 1e-3 * uniforms if strength < 1 else uniforms
        masked = lowest(scores, region, share(region))
        if whole:  # image-to-image: the tokens not re-masked are kept, as outside an inpainting mask
            region = masked
        masked = masked | lowest(uniforms, ~region, share(~region))
    tokens = torch.where(masked, mask_id, known)
    totals = [(masked & group).sum(1) for group in (region, ~region)]  # (B,) each: where each schedule starts
    for i in range(steps):
        probs = (logits_fn(tokens, masked.float().mean(1)).float() / temperature).softmax(-1)  # (B, n, K)
        cdf = probs.cumsum(-1)  # a token drawn from probs: the first whose cumulative share exceeds the uniform
        choice = torch.searchsorted(cdf, draws[:, i, :, :1] * cdf[..., -1:], right=True)[..., 0]
        choice = choice.clamp(max=codebook_size - 1)
        choice = torch.where(masked, torch.where(region, choice, known), tokens)  # outside: its own code
        confidence = probs.gather(-1, choice[..., None])[..., 0].clamp(min=1e-30).log()
        confidence = confidence + randomness * (1 - (i + 1) / steps) * gumbel(draws[:, i, :, 1])
        confidence = torch.where(region, confidence, draws[:, i, :, 1])
        inside, outside = (lowest(confidence, masked & group, still_masked(i, steps, total, (masked & group).sum(1)))
                           for group, total in zip((region, ~region), totals))  # the least confident stay masked
        masked = inside | outside
        tokens = torch.where(masked, mask_id, choice)
    return tokens
