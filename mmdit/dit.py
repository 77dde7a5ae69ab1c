"""Diffusion transformer over VQ-VAE latents, conditioned on frozen text-encoder states.

    model = DiT(DiTConfig(mode="joint").for_data(in_channels=8, input_size=8, text_dim=384, codebook_size=1024))
    v = model(x, t, text, text_mask, pooled)  # flow: the velocity, shaped like the latents x (B, C, H, W)
    logits = model(codes, ratio, text, text_mask, pooled)  # masked: codes (B, H, W) -> logits (B, H, W, K)

One backbone for both objectives (mmdit/flow.py, mmdit/masked.py). "flow" reads continuous code vectors and
predicts a velocity; "masked" reads code indices, [MASK] = K included, through an embedding of the codes' width
(initialised from the normalised codebook by the stage) and predicts K logits per code, with the mask ratio
where flow has t: the same patch conv, positions, blocks and adaLN, only the first and last layer differ.

One file, modelled on facebookresearch/DiT's models.py, with two ways of reading the caption:
- "cross" (PixArt-alpha): image tokens self-attend, then cross-attend to the text tokens, with
  adaLN-Zero on self-attention and MLP only (PixArt leaves cross-attention unmodulated);
- "joint" (MMDiT, SD3): text and image tokens keep separate weights but attend over the
  concatenated sequence [text; image]; in the last block text only gives keys and values (SD3's
  context_pre_only, and no text queries either), so no parameter goes without a gradient.
In both, adaLN is driven by c = timestep embedding + pooled-text embedding, every residual branch but
cross-attention starts gated shut, and the final layer starts at zero, so a new model outputs exactly 0.
Text padding (text_mask False) is masked out of every attention, so padding never changes the output.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmdit import weights
from mmdit.checks import check_int, check_number


@dataclass
class DiTConfig:
    """The architecture choices: the `dit:` config section. What the data fix (the latent grid, the text
    encoder's width) is not a choice: `for_data` adds it when the model is built."""
    patch_size: int = 1
    width: int = 256
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    mode: str = "cross"  # "cross" (PixArt-alpha) | "joint" (MMDiT / SD3)
    qk_norm: bool = True  # RMSNorm on q and k, per head
    pos_embed: str = "sincos"  # "sincos" (2D sin-cos, fixed) | "rope" (2D rotary on image tokens only)
    grad_checkpointing: bool = False
    objective: str = "flow"  # "flow" (rectified flow on code vectors) | "masked" (MaskGIT on code indices)

    def __post_init__(self):
        for key in ("patch_size", "width", "depth", "heads"):
            check_int(f"dit.{key}", getattr(self, key))
        check_number("dit.mlp_ratio", self.mlp_ratio, "a finite number > 0", lambda v: v > 0)
        if self.mode not in ("cross", "joint"):
            raise ValueError(f"dit.mode={self.mode!r}; accepted: cross, joint")
        if self.objective not in ("flow", "masked"):
            raise ValueError(f"dit.objective={self.objective!r}; accepted: flow, masked")
        if self.pos_embed not in ("sincos", "rope"):
            raise ValueError(f"dit.pos_embed={self.pos_embed!r}; accepted: sincos, rope")
        if self.width % self.heads:
            raise ValueError(f"dit.width={self.width} is not divisible by dit.heads={self.heads}; "
                             "accepted: a width that is a multiple of heads")
        # Both split channels evenly between the two axes, in pairs: sin-cos over width, RoPE over each head.
        if self.pos_embed == "sincos" and self.width % 4:
            raise ValueError(f"dit.width={self.width}: 2D sin-cos needs a multiple of 4; accepted: multiples of 4")
        if self.pos_embed == "rope" and (self.width // self.heads) % 4:
            raise ValueError(f"dit.width={self.width}, dit.heads={self.heads}: 2D RoPE needs a head size "
                             "(width / heads) that is a multiple of 4; accepted: such width and heads")

    def for_data(self, in_channels: int, input_size: int, text_dim: int, codebook_size: int) -> "DiTModelConfig":
        return DiTModelConfig(**dataclasses.asdict(self), in_channels=in_channels, input_size=input_size,
                              text_dim=text_dim, codebook_size=codebook_size)


@dataclass
class DiTModelConfig(DiTConfig):
    """What a DiT is built from, and what its export's config.json records: the choices plus the sizes the data
    fix, derived in training from the VQ-VAE and the text encoder."""
    in_channels: int = 8  # VQ-VAE latent channels d (vqvae.code_dim)
    input_size: int = 8  # latent grid side h = w (data.resolution / vqvae.downsample)
    text_dim: int = 384  # text encoder hidden size
    codebook_size: int = 1024  # VQ-VAE codes K (vqvae.codebook_size): the masked objective's vocabulary

    def __post_init__(self):
        super().__post_init__()
        for key in ("in_channels", "input_size", "text_dim", "codebook_size"):
            check_int(key, getattr(self, key))
        if self.input_size % self.patch_size:
            raise ValueError(f"the latent grid is {self.input_size}x{self.input_size} (data.resolution / "
                             f"vqvae.downsample), not divisible by dit.patch_size={self.patch_size}; accepted: a "
                             f"patch_size that divides {self.input_size}")


# --- helpers ---------------------------------------------------------------------------------------------

def mlp(d_in: int, d_hidden: int, d_out: int, act: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), act, nn.Linear(d_hidden, d_out))


def layer_norm(width: int) -> nn.LayerNorm:
    # No affine: adaLN supplies scale and shift, or a Linear follows that would absorb them.
    return nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(shift, x, 1 + scale)  # x * (1 + scale) + shift, one pass; x (B, N, W), shift/scale (B, 1, W)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) float -> (B, dim). t in [0, 1] is scaled by 1000: the frequencies were made for DiT's 1000 steps."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    args = 1000 * t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


def grid_angles(dim: int, size: int, theta: float = 10000.0) -> torch.Tensor:
    """(N, dim) position angles for the row-major size x size grid: the first dim/2 channels follow the token's
    row, the rest its column, each at dim/2 geometric frequencies."""
    freqs = 1.0 / theta ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return torch.cat([rows.flatten()[:, None] * freqs, cols.flatten()[:, None] * freqs], dim=1)


def sincos_2d(width: int, size: int) -> torch.Tensor:
    """(N, width) fixed 2D sin-cos embedding (MAE / DiT, up to a fixed permutation of channels)."""
    angles = grid_angles(width // 2, size)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def rope_2d(head_dim: int, size: int) -> torch.Tensor:
    """(2, N, head_dim) cos and sin for 2D RoPE: half of each head rotates with the row, half with the column.
    Rotate-half layout: channels i and i + head_dim/2 form one rotated pair, so they share an angle."""
    angles = grid_angles(head_dim // 2, size).repeat(1, 2)
    return torch.stack([angles.cos(), angles.sin()]).float()


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    cos, sin = rope  # x (B, N, heads, head_dim); rope (2, N, 1, head_dim)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def split_heads(x: torch.Tensor, n: int, heads: int) -> tuple[torch.Tensor, ...]:
    """(B, S, n * W) -> n views (B, S, heads, W / heads), no copy. Kept token-major, like the Linear that made
    them: QK-norm runs ~25% faster here than on the (B, heads, S, hd) permutation, and SDPA takes either."""
    b, s, _ = x.shape
    return x.view(b, s, n, heads, -1).unbind(2)


def attention(q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, Lq, heads, hd), k/v (B, Lk, heads, hd), mask (B, 1, 1, Lk) bool (True = attend) -> (B, Lq, W).
    SDPA wants heads first: transposed views in; its output keeps the query's token-major layout (CPU flash
    kernel), so the transpose back and the flatten are views, not copies."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same `weight`) with a hand-written backward on CPU, where PyTorch's RMSNorm is a chain of
    ~12 elementwise kernels (forward + backward): this one takes ~20% less time per QK-norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            # CUDA's fused kernel needs the weight in the input's dtype: under bf16 autocast, an fp32 weight
            # sends F.rms_norm down an unfused path that also saves fp32 intermediates for backward.
            return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)
        return _RMSNormCPU.apply(x, self.weight, self.eps)


class _RMSNormCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        # Statistics in fp32 even for bf16 inputs, as F.rms_norm does.
        r = torch.rsqrt(x.float().square().mean(-1, keepdim=True).add_(eps))  # (..., 1)
        x_hat = x * r
        ctx.save_for_backward(x_hat, r, weight)
        return (x_hat * weight).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        # y = x_hat * w, x_hat = x * r: dx = r * (g w - x_hat * mean(g w x_hat)), dw = sum(g x_hat)
        x_hat, r, weight = ctx.saved_tensors
        gw = grad * weight
        dot = torch.linalg.vecdot(gw, x_hat, dim=-1).unsqueeze(-1) / x_hat.shape[-1]
        dx = torch.addcmul(gw, x_hat, dot, value=-1).mul_(r).to(grad.dtype)
        dw = (grad * x_hat).flatten(0, -2).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def qk_norm(head_dim: int, enabled: bool) -> nn.Module:
    return RMSNorm(head_dim, eps=1e-6) if enabled else nn.Identity()


class AdaLN(nn.Module):
    """c (B, W) -> n modulation vectors (B, 1, W) each (shift, scale, gate, ...). Zero-initialised (adaLN-Zero)."""

    def __init__(self, width: int, n: int):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(width, n * width)

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(c))[:, None].chunk(self.n, dim=-1)


# --- blocks ----------------------------------------------------------------------------------------------

class Modulation(NamedTuple):
    """One block side's adaLN vectors (B, 1, W), named as facebookresearch/DiT unpacks them: shift and scale
    of the norm before attention (msa) and before the MLP, and the gates of the two residual branches. A
    pre_only side has only the first two (the rest None)."""
    shift_msa: torch.Tensor
    scale_msa: torch.Tensor
    gate_msa: torch.Tensor | None = None
    shift_mlp: torch.Tensor | None = None
    scale_mlp: torch.Tensor | None = None
    gate_mlp: torch.Tensor | None = None


class ModalityWeights(nn.Module):
    """One modality's weights in a block: adaLN, norm + fused QKV (+ QK-norm), output projection, MLP.

    The image side of both block types, and the text side of a joint block. `pre_only` (the text side of the
    last joint block) keeps just what produces its keys and values, since nothing reads its output.
    """

    def __init__(self, cfg: DiTConfig, pre_only: bool = False):
        super().__init__()
        w = cfg.width
        self.heads = cfg.heads
        self.n = 2 if pre_only else 3  # a pre_only side is never queried: keys and values only
        self.adaLN = AdaLN(w, 2 if pre_only else 6)
        self.norm1 = layer_norm(w)
        self.qkv = nn.Linear(w, self.n * w)
        self.k_norm = qk_norm(w // cfg.heads, cfg.qk_norm)
        if not pre_only:
            self.q_norm = qk_norm(w // cfg.heads, cfg.qk_norm)
            self.proj = nn.Linear(w, w)
            self.norm2 = layer_norm(w)
            self.mlp = mlp(w, int(w * cfg.mlp_ratio), w, nn.GELU(approximate="tanh"))

    def qkv_heads(self, x, c, rope=None):
        """-> (q, k, v) each (B, S, heads, head_dim) (q None when pre_only), and the Modulation."""
        mod = Modulation(*self.adaLN(c))
        *q, k, v = split_heads(self.qkv(modulate(self.norm1(x), mod.shift_msa, mod.scale_msa)), self.n, self.heads)
        q, k = (self.q_norm(q[0]) if q else None), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return (q, k, v), mod

    def attn_residual(self, x, attn_out, mod: Modulation):  # x + gate * branch, in one pass
        return torch.addcmul(x, mod.gate_msa, self.proj(attn_out))

    def mlp_residual(self, x, mod: Modulation):
        return torch.addcmul(x, mod.gate_mlp, self.mlp(modulate(self.norm2(x), mod.shift_mlp, mod.scale_mlp)))


class CrossAttention(nn.Module):
    """Image tokens (queries) read the text tokens (keys, values); padding keys are masked."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        w = cfg.width
        self.heads = cfg.heads
        self.norm = layer_norm(w)  # not in PixArt (raw residual stream): keeps q in range without qk_norm
        self.q = nn.Linear(w, w)
        self.kv = nn.Linear(w, 2 * w)
        self.q_norm, self.k_norm = qk_norm(w // cfg.heads, cfg.qk_norm), qk_norm(w // cfg.heads, cfg.qk_norm)
        self.proj = nn.Linear(w, w)

    def forward(self, x, text, mask):
        (q,) = split_heads(self.q(self.norm(x)), 1, self.heads)
        k, v = split_heads(self.kv(text), 2, self.heads)
        return self.proj(attention(self.q_norm(q), self.k_norm(k), v, mask))


class CrossBlock(nn.Module):
    """PixArt-alpha: modulated self-attention, unmodulated cross-attention to the text, modulated MLP."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.img = ModalityWeights(cfg)
        self.cross_attn = CrossAttention(cfg)

    def forward(self, img, text, c, mask, rope):
        qkv, mod = self.img.qkv_heads(img, c, rope)
        img = self.img.attn_residual(img, attention(*qkv), mod)
        img = img + self.cross_attn(img, text, mask)
        return self.img.mlp_residual(img, mod), text


class JointBlock(nn.Module):
    """MMDiT (SD3): separate weights per modality, one attention over [text; image] (text padding masked)."""

    def __init__(self, cfg: DiTConfig, last: bool = False):
        super().__init__()
        self.txt = ModalityWeights(cfg, pre_only=last)
        self.img = ModalityWeights(cfg)
        self.last = last

    def forward(self, img, text, c, mask, rope):
        # RoPE on image tokens only: text tokens carry the encoder's own positions, as if all at position 0.
        (qi, ki, vi), mod_i = self.img.qkv_heads(img, c, rope)
        (qt, kt, vt), mod_t = self.txt.qkv_heads(text, c)
        k, v = torch.cat([kt, ki], dim=1), torch.cat([vt, vi], dim=1)  # (B, L + N, heads, head_dim)
        if self.last:  # nothing reads the text stream after this block, so only image tokens query
            out_i = attention(qi, k, v, mask)
        else:
            out = attention(torch.cat([qt, qi], dim=1), k, v, mask)  # (B, L + N, W)
            out_t, out_i = out.split([text.shape[1], img.shape[1]], dim=1)
            text = self.txt.mlp_residual(self.txt.attn_residual(text, out_t, mod_t), mod_t)
        return self.img.mlp_residual(self.img.attn_residual(img, out_i, mod_i), mod_i), text


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + Linear to each patch's outputs (velocity channels or code logits), zero-initialised
    so a new model predicts 0 (flow) or uniform logits (masked)."""

    def __init__(self, cfg: DiTModelConfig, out_channels: int):
        super().__init__()
        self.norm = layer_norm(cfg.width)
        self.adaLN = AdaLN(cfg.width, 2)
        self.linear = nn.Linear(cfg.width, cfg.patch_size ** 2 * out_channels)

    def forward(self, x, c):
        shift, scale = self.adaLN(c)
        return self.linear(modulate(self.norm(x), shift, scale))


# --- model -----------------------------------------------------------------------------------------------

class DiT(nn.Module):
    def __init__(self, cfg: DiTModelConfig):
        super().__init__()
        self.cfg = cfg
        w, p, grid = cfg.width, cfg.patch_size, cfg.input_size // cfg.patch_size
        self.masked = cfg.objective == "masked"
        if self.masked:  # code index (K = [MASK]) -> a vector of the codes' width, which the patch conv reads
            self.token_embed = nn.Embedding(cfg.codebook_size + 1, cfg.in_channels)
            # Logits score each code through its vector (a code's logit is <feature, code_head(vector)>), not
            # through a free row per code: codes never seen in a context (a yellow triangle's edges) share the
            # scores of codes near them, which is what lets held-out combinations compose.
            self.code_head = mlp(cfg.in_channels, w, w, nn.GELU(approximate="tanh"))
        self.patch_embed = nn.Conv2d(cfg.in_channels, w, kernel_size=p, stride=p)
        self.t_embed = mlp(256, w, w, nn.SiLU())
        self.pooled_embed = mlp(cfg.text_dim, w, w, nn.SiLU())
        self.text_embed = mlp(cfg.text_dim, w, w, nn.GELU(approximate="tanh"))  # PixArt's caption projection
        if cfg.mode == "cross":
            self.blocks = nn.ModuleList(CrossBlock(cfg) for _ in range(cfg.depth))
        else:
            self.blocks = nn.ModuleList(JointBlock(cfg, last=i == cfg.depth - 1) for i in range(cfg.depth))
        self.final = FinalLayer(cfg, w if self.masked else cfg.in_channels)
        self._no_split_modules = [type(self.blocks[0]).__name__]  # FSDP shards each block as a unit (accelerate)
        # Derived from the config, so not saved with the weights.
        if cfg.pos_embed == "sincos":
            self.register_buffer("pos", sincos_2d(w, grid)[None], persistent=False)  # (1, N, W)
        else:
            rope = rope_2d(w // cfg.heads, grid)[:, :, None]  # (2, N, 1, head_dim): broadcasts over heads
            self.register_buffer("rope", rope, persistent=False)
        self.init_weights()

    def init_weights(self):
        # As DiT: xavier-uniform Linears (the patch conv as the Linear it is), zero biases, N(0, 0.02) for the
        # conditioning embedders (DiT's t_embedder, PixArt's caption projection), then zero every adaLN and the
        # final Linear, so the model's output starts at 0 and each block as the identity, except for the cross
        # block's cross-attention: its output projection stays xavier (PixArt zeroes it; that trained to a lower
        # compositional accuracy here, docs/models.md), so the text reaches the image tokens from step 0.
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
                nn.init.zeros_(m.bias)
        for embed in (self.t_embed, self.pooled_embed, self.text_embed):
            for layer in (embed[0], embed[2]):
                nn.init.normal_(layer.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, AdaLN):
                nn.init.zeros_(m.linear.weight)
                nn.init.zeros_(m.linear.bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)
        if self.masked:  # N(0, 1) like unit-variance latents until init_codes; [MASK] is the zero vector
            nn.init.normal_(self.token_embed.weight)
            nn.init.zeros_(self.token_embed.weight[-1])

    @torch.no_grad()
    def init_codes(self, codes: torch.Tensor) -> None:
        """Masked: start the code embeddings at `codes` (K, in_channels), the normalised codebook vectors, so
        the model reads at step 0 what flow reads: the codes' geometry, not K unrelated random vectors."""
        self.token_embed.weight[:-1].copy_(codes)

    def forward(self, x, t, text, text_mask, pooled, where: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W) noisy latents and t (B,) in [0, 1] (flow), or x (B, H, W) code indices with [MASK] = K
        and t (B,) the mask ratio (masked); text (B, L, text_dim), text_mask (B, L) bool (True = real token),
        pooled (B, text_dim) -> velocity (B, C, H, W) (flow) or logits (B, H, W, K) (masked). Masked, `where`
        (B, H, W) bool: the logits (M, K) of those M positions alone, as `logits[where]` but without computing
        the others (the loss reads only the masked ones; K logits a code are most of a large codebook's cost)."""
        cfg = self.cfg
        b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
        if (h, w) != (cfg.input_size, cfg.input_size):
            raise ValueError(f"DiT built for {cfg.input_size}x{cfg.input_size} latents, got {h}x{w}")
        if self.masked:
            x = self.token_embed(x).permute(0, 3, 1, 2)  # (B, H, W) -> (B, C, H, W)
        # contiguous: the transposed conv output would otherwise set the memory layout of every residual-stream
        # op after it (TensorIterator keeps its operands' layout), and LayerNorm and Linear copy such input.
        img = self.patch_embed(x).flatten(2).transpose(1, 2).contiguous()  # (B, N, W)
        if cfg.pos_embed == "sincos":
            img = img + self.pos
        rope = self.rope if cfg.pos_embed == "rope" else None
        c = self.t_embed(timestep_embedding(t)) + self.pooled_embed(pooled)  # (B, W)
        text = self.text_embed(text)  # (B, L, W)

        if cfg.mode == "cross":
            # A caption of nothing but padding (impossible with real tokenizers, which emit CLS/EOS) would mask
            # every key, which gives NaN rows on some SDPA backends: such a caption attends to all its tokens.
            mask = text_mask | ~text_mask.any(dim=1, keepdim=True)
        else:  # keys are [text; image]: image keys are never masked, so no row is ever empty
            mask = torch.cat([text_mask, text_mask.new_ones(b, img.shape[1])], dim=1)
        mask = mask[:, None, None, :]  # (B, 1, 1, Lk)

        for block in self.blocks:
            if cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
                img, text = checkpoint(block, img, text, c, mask, rope, use_reentrant=False)
            else:
                img, text = block(img, text, c, mask, rope)
        out = self.unpatchify(self.final(img, c))  # (B, C, H, W) (flow) or (B, H, W, W) features (masked)
        if not self.masked:
            return out
        out = out if where is None else out[where]  # (B, H, W, W) or (M, W)
        return out @ self.code_head(self.token_embed.weight[:-1]).T.to(out.dtype)  # (..., K)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p * p * C) -> (B, C, H, W) (flow), or (B, H, W, C) (masked: each code's features last, as
        its logits are then read)."""
        p, g = self.cfg.patch_size, self.cfg.input_size // self.cfg.patch_size
        x = x.view(x.shape[0], g, g, p, p, -1)
        ch = x.shape[-1]
        if self.masked:
            return x.permute(0, 1, 3, 2, 4, 5).reshape(x.shape[0], g * p, g * p, ch)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], ch, g * p, g * p)

    def save_pretrained(self, directory: str | Path) -> None:
        weights.save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> DiT:
        return weights.from_pretrained(cls, DiTModelConfig, directory)
