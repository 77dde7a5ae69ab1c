"""Tests for the diffusion transformer (mmdit/dit.py): tiny CPU configs, the whole file runs in seconds."""
import json

import pytest
import torch
import torch.nn.functional as F

from mmdit.dit import DiT, DiTModelConfig, RMSNorm, apply_rope, rope_2d

from conftest import tolerance

MODES = ["cross", "joint"]


pytestmark = pytest.mark.usefixtures("single_thread", "suite_precision")


def tiny_cfg(**overrides) -> DiTModelConfig:
    kw = {"in_channels": 4, "input_size": 4, "width": 32, "depth": 2, "heads": 2, "mlp_ratio": 2.0, "text_dim": 12}
    kw.update(overrides)
    return DiTModelConfig(**kw)


def inputs(cfg: DiTModelConfig, batch: int = 2, length: int = 5, seed: int = 0):
    """x, t, text, text_mask, pooled; caption b has length - b real tokens followed by padding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.rand(batch, generator=g)
    text = torch.randn(batch, length, cfg.text_dim, generator=g)
    mask = torch.arange(length)[None] < (length - torch.arange(batch))[:, None]
    pooled = torch.randn(batch, cfg.text_dim, generator=g)
    return x, t, text, mask, pooled


def randomise(model: DiT, seed: int = 0) -> DiT:
    """Give the zero-initialised layers (every adaLN, the final Linear) random weights, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN" in name or name.startswith("final.linear"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def built(seed: int = 0, **overrides) -> DiT:
    torch.manual_seed(seed)
    return DiT(tiny_cfg(**overrides))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("patch_size", [1, 2])
@pytest.mark.parametrize("pos_embed", ["sincos", "rope"])
def test_output_shape(mode, patch_size, pos_embed):
    cfg = tiny_cfg(mode=mode, patch_size=patch_size, pos_embed=pos_embed)
    model = randomise(DiT(cfg))
    x, t, text, mask, pooled = inputs(cfg, batch=3)
    out = model(x, t, text, mask, pooled)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("mode", MODES)
def test_new_model_outputs_exactly_zero(mode):
    model = built(mode=mode)
    out = model(*inputs(model.cfg))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("mode,pos_embed", [("cross", "sincos"), ("joint", "sincos"), ("joint", "rope")])
def test_padding_is_invisible(mode, pos_embed):
    model = randomise(built(mode=mode, pos_embed=pos_embed)).eval()
    x, t, text, mask, pooled = inputs(model.cfg, batch=3)
    ref = model(x, t, text, mask, pooled)
    g = torch.Generator().manual_seed(1)
    # Garbage in the existing padding slots, and four more padding tokens of garbage appended.
    garbage_text = torch.where(mask[..., None], text, 10 * torch.randn(text.shape, generator=g))
    longer_text = torch.cat([garbage_text, 10 * torch.randn(3, 4, model.cfg.text_dim, generator=g)], dim=1)
    longer_mask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], dim=1)
    # Under bf16 the longer key sequence changes the attention's summation order: a bf16 step at most.
    torch.testing.assert_close(model(x, t, longer_text, longer_mask, pooled), ref, atol=tolerance(1e-5, 1e-2), rtol=0)


@torch.autocast("cpu", enabled=False)
def test_rmsnorm_matches_torch_in_value_and_gradient():
    """The hand-written CPU backward against autograd through nn.RMSNorm, on a strided view as QK-norm sees."""
    g = torch.Generator().manual_seed(0)
    ours, ref = RMSNorm(8, eps=1e-6), torch.nn.RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(8, generator=g))
    ref.load_state_dict(ours.state_dict())  # same parameter name: exported runs load either way
    base = torch.randn(3, 5, 2, 4, 8, generator=g)
    grad_out = torch.randn(3, 5, 4, 8, generator=g)
    outs = []
    for norm in (ours, ref):  # a kernel comparison at given dtypes (bf16 inputs below), never autocast
        x = base.clone().requires_grad_()
        y = norm(x[:, :, 0])  # (3, 5, 4, 8) view, not contiguous
        y.backward(grad_out)
        outs.append((y.detach(), x.grad, norm.weight.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    half = ours(base.bfloat16())
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), ref(base).detach(), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("mode", MODES)
def test_layer_norms_see_contiguous_input(mode):
    """A transposed residual stream (the conv patch embedding's output) makes every LayerNorm copy its input."""
    model = randomise(built(mode=mode))
    seen = []
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.register_forward_pre_hook(lambda _, args: seen.append(args[0].is_contiguous()))
    model(*inputs(model.cfg))
    assert seen and all(seen)


def test_rope_scores_depend_only_on_relative_position():
    rope = rope_2d(head_dim=8, size=4)  # tokens row-major: index = 4 * row + col
    g = torch.Generator().manual_seed(0)
    q, k = (apply_rope(torch.randn(8, generator=g).expand(1, 1, 16, 8), rope)[0, 0] for _ in range(2))
    torch.testing.assert_close(q[0] @ k[6], q[9] @ k[15])  # (0,0)->(1,2) and (2,1)->(3,3): same offset
    assert not torch.allclose(q[0] @ k[6], q[0] @ k[9])  # (0,0)->(2,1): another offset


@pytest.mark.parametrize("mode", MODES)
def test_all_padding_caption_stays_finite(mode):
    model = randomise(built(mode=mode))
    x, t, text, mask, pooled = inputs(model.cfg)
    assert torch.isfinite(model(x, t, text, torch.zeros_like(mask), pooled)).all()


@pytest.mark.parametrize("mode", MODES)
def test_output_depends_on_every_input(mode):
    model = randomise(built(mode=mode)).eval()
    x, t, text, mask, pooled = inputs(model.cfg)
    ref = model(x, t, text, mask, pooled)

    def moved(out):
        return (out - ref).abs().max() > 1e-4

    assert moved(model(x + 1, t, text, mask, pooled))
    assert moved(model(x, 1 - t, text, mask, pooled))
    assert moved(model(x, t, text + 1, mask, pooled))  # per-token text, pooled unchanged
    assert moved(model(x, t, text, mask, pooled + 1))


@pytest.mark.parametrize("mode", MODES)
def test_one_step_from_init_leaves_zero(mode):
    model = built(mode=mode)
    x, t, text, mask, pooled = inputs(model.cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    F.mse_loss(model(x, t, text, mask, pooled), torch.randn_like(x)).backward()
    opt.step()
    assert model(x, t, text, mask, pooled).abs().max() > 0


@pytest.mark.parametrize("mode", MODES)
def test_gradient_reaches_every_parameter(mode):
    model = randomise(built(mode=mode, pos_embed="rope" if mode == "joint" else "sincos"))
    x, t, text, mask, pooled = inputs(model.cfg)
    F.mse_loss(model(x, t, text, mask, pooled), torch.randn_like(x)).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"no gradient for {dead}"


@pytest.mark.parametrize("mode", MODES)
def test_grad_checkpointing_matches(mode):
    plain = randomise(built(mode=mode))
    ckpt = DiT(tiny_cfg(mode=mode, grad_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    calls, block_forward = [], ckpt.blocks[0].forward

    def counted(*args):  # a forward hook would not see the recomputation
        calls.append(1)
        return block_forward(*args)
    ckpt.blocks[0].forward = counted
    x, t, text, mask, pooled = inputs(plain.cfg)
    target = torch.randn_like(x)
    outs = []
    for model in (plain, ckpt):
        out = model(x, t, text, mask, pooled)
        F.mse_loss(out, target).backward()
        outs.append(out.detach())
    assert len(calls) == 2  # forward, then recomputed during backward: checkpointing really ran
    torch.testing.assert_close(outs[1], outs[0], atol=0, rtol=0)
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-7, rtol=1e-6, msg=name)


@pytest.mark.parametrize("mode", MODES)
def test_save_load_round_trip(tmp_path, mode):
    model = randomise(built(mode=mode, pos_embed="rope", patch_size=2)).eval()
    model.save_pretrained(tmp_path)
    loaded = DiT.from_pretrained(tmp_path)
    assert loaded.cfg == model.cfg
    args = inputs(model.cfg)
    assert torch.equal(loaded(*args), model(*args))


def test_from_pretrained_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        DiT.from_pretrained(tmp_path)
    built().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        DiT.from_pretrained(tmp_path)


def test_mismatching_checkpoint_names_tensor_and_shapes(tmp_path):
    built().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "text_dim": 16}))
    with pytest.raises(ValueError, match=r"pooled_embed\.0\.weight.*\(32, 12\).*\(32, 16\)"):
        DiT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "depth": 3}))
    with pytest.raises(ValueError, match=r"missing tensors \['blocks\.2\."):
        DiT.from_pretrained(tmp_path)


@pytest.mark.parametrize("overrides,field", [
    ({"mode": "sequential"}, "dit.mode"),
    ({"pos_embed": "alibi"}, "dit.pos_embed"),
    ({"width": 30, "heads": 4}, "dit.heads"),
    ({"width": 30, "heads": 5}, "dit.width"),  # 2D sin-cos needs a multiple of 4
    ({"width": 12, "heads": 2, "pos_embed": "rope"}, "dit.heads"),  # head size 6: 2D RoPE needs a multiple of 4
    ({"input_size": 5, "patch_size": 2}, r"the latent grid is 5x5 .*, not divisible by dit.patch_size=2"),
    ({"depth": 0}, r"dit.depth=0; accepted: an integer >= 1"),
    ({"width": -8}, r"dit.width=-8; accepted: an integer >= 1"),
    ({"heads": 0}, r"dit.heads=0; accepted: an integer >= 1"),  # was "width is not divisible by heads=0"
    ({"patch_size": 0}, r"dit.patch_size=0; accepted: an integer >= 1"),
    ({"in_channels": 0}, r"in_channels=0; accepted: an integer >= 1"),
    ({"depth": "2"}, r"dit.depth='2'; accepted: an integer >= 1"),  # a hand-edited config.json is not coerced
    ({"mlp_ratio": float("inf")}, r"dit.mlp_ratio=inf; accepted: a finite number > 0"),
])
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_cfg(**overrides)


def test_rope_takes_any_head_size_divisible_by_4():
    tiny_cfg(width=24, heads=3, pos_embed="rope")
    tiny_cfg(width=36, heads=3, pos_embed="rope")


def test_wrong_latent_size_is_a_clear_error():
    model = built()
    x, t, text, mask, pooled = inputs(model.cfg)
    with pytest.raises(ValueError, match="4x4"):
        model(x[..., :2, :2], t, text, mask, pooled)


@pytest.mark.parametrize("mode", MODES)
def test_overfits_four_pairs_through_the_text_tokens(mode):
    """Same latent, same t, same pooled vector: only the per-token text tells the four targets apart, so the
    loss can only fall if cross-attention (or joint attention) carries the caption into the image tokens."""
    torch.manual_seed(0)
    cfg = tiny_cfg(mode=mode)
    model = DiT(cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_channels, 4, 4, generator=g).expand(4, -1, -1, -1)
    t = torch.full((4,), 0.5)
    text = torch.randn(4, 5, cfg.text_dim, generator=g)
    mask = torch.arange(5)[None] < torch.tensor([5, 4, 3, 5])[:, None]
    pooled = torch.randn(1, cfg.text_dim, generator=g).expand(4, -1)
    target = torch.randn(4, cfg.in_channels, 4, 4, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = F.mse_loss(model(x, t, text, mask, pooled), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.02, loss.item()


# --- the masked objective: code indices in, logits out, on the same backbone -------------------------------

def masked_inputs(cfg: DiTModelConfig, batch: int = 2, seed: int = 0):
    """inputs() with code indices (some [MASK] = K) in place of latents and a mask ratio in place of t."""
    _, t, text, mask, pooled = inputs(cfg, batch, seed=seed)
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, cfg.codebook_size + 1, (batch, cfg.input_size, cfg.input_size), generator=g)
    return codes, t, text, mask, pooled


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("patch_size", [1, 2])
def test_masked_model_maps_codes_to_logits_and_starts_uniform(mode, patch_size):
    model = built(mode=mode, patch_size=patch_size, objective="masked", codebook_size=10)
    args = masked_inputs(model.cfg, batch=3)
    assert torch.equal(model(*args), torch.zeros(3, 4, 4, 10))  # zero final layer: uniform over the codes
    out = randomise(model)(*args)
    assert out.shape == (3, 4, 4, 10) and torch.isfinite(out).all()
    # Each output position reads its own code: changing one code changes the logits there.
    codes = args[0].clone()
    codes[0, 1, 2] = (codes[0, 1, 2] + 1) % 11
    assert not torch.equal(model(codes, *args[1:])[0, 1, 2], out[0, 1, 2])
    where = args[0] == 10  # the [MASK] positions: what the loss reads
    torch.testing.assert_close(model(*args, where=where), out[where], atol=tolerance(1e-6, 1e-2), rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_masked_padding_is_invisible_and_save_load_round_trips(tmp_path, mode):
    model = randomise(built(mode=mode, objective="masked", codebook_size=10)).eval()
    codes, t, text, mask, pooled = masked_inputs(model.cfg)
    padded_text = torch.cat([text, torch.randn(2, 3, text.shape[-1])], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], dim=1)
    out = model(codes, t, text, mask, pooled)
    torch.testing.assert_close(model(codes, t, padded_text, padded_mask, pooled), out,
                               atol=tolerance(1e-5, 2e-2), rtol=tolerance(1e-5, 2e-2))
    model.save_pretrained(tmp_path)
    loaded = DiT.from_pretrained(tmp_path)
    assert loaded.cfg == model.cfg and loaded.cfg.objective == "masked"
    assert torch.equal(loaded(codes, t, text, mask, pooled), out)


def test_masked_code_embeddings_start_at_the_codebook_and_mask_at_zero():
    model = built(objective="masked", codebook_size=10)
    assert torch.equal(model.token_embed.weight[10], torch.zeros(4))
    codes = torch.randn(10, 4)
    model.init_codes(codes)
    assert torch.equal(model.token_embed.weight[:10], codes) and torch.equal(model.token_embed.weight[10], torch.zeros(4))
    with pytest.raises(ValueError, match=r"dit.objective='mask'; accepted: flow, masked"):
        tiny_cfg(objective="mask")
