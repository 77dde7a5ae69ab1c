"""mmdit.pixels: uint8 <-> float in [-1, 1] <-> PIL, exact to the bit."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from mmdit.metrics import reconstruct
from mmdit.pixels import from_pil, to_float, to_pil, to_uint8
from mmdit.vqvae import VQVAE, VQVAEConfig


def _old_detour(images: torch.Tensor) -> torch.Tensor:
    """What metrics.to_uint8 did before mmdit.pixels: float -> PIL (grid.to_pil) -> uint8 tensor."""
    arrays = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pils = [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in arrays]
    return torch.stack([pil_to_tensor(im) for im in pils])


def test_every_uint8_level_survives_the_round_trip():
    levels = torch.arange(256).to(torch.uint8).view(1, 1, 16, 16).repeat(2, 3, 1, 1)
    x = to_float(levels)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    assert torch.equal(to_uint8(x), levels)


def test_out_of_range_is_clamped_and_levels_are_rounded_not_truncated():
    x = torch.tensor([-5.0, -1.001, float("-inf"), 1.001, 7.0, float("inf")]).view(1, 1, 2, 3).repeat(1, 3, 1, 1)
    assert to_uint8(x)[0, 0].flatten().tolist() == [0, 0, 0, 255, 255, 255]
    k = torch.arange(255.0)
    assert torch.equal(to_uint8(((k + 0.6) / 127.5 - 1).view(1, 1, 1, -1)).flatten(), (k + 1).to(torch.uint8))
    assert torch.equal(to_uint8(((k + 0.4) / 127.5 - 1).view(1, 1, 1, -1)).flatten(), k.to(torch.uint8))


def test_to_pil_holds_the_bytes_of_to_uint8():
    x = torch.randn(3, 3, 5, 7, generator=torch.Generator().manual_seed(0)) * 1.5  # H != W: no transposition
    expected = to_uint8(x)
    pils = to_pil(x)
    assert len(pils) == 3 and all(p.mode == "RGB" and p.size == (7, 5) for p in pils)
    for p, e in zip(pils, expected):
        assert np.array_equal(np.asarray(p), e.permute(1, 2, 0).numpy())
        assert torch.equal(from_pil(p), e) and torch.equal(from_pil(p), pil_to_tensor(p))


def test_from_pil_takes_only_rgb():
    with pytest.raises(ValueError, match="RGB"):
        from_pil(Image.new("L", (2, 2)))


def test_direct_to_uint8_matches_the_old_pil_detour():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(8, 3, 9, 6, generator=g) * 0.8).requires_grad_()  # some of it beyond [-1, 1]
    assert torch.equal(to_uint8(x), _old_detour(x))
    near_levels = (torch.randint(0, 256, (4, 3, 8, 8), generator=g) + 0.5) / 127.5 - 1  # halfway between levels
    assert torch.equal(to_uint8(near_levels), _old_detour(near_levels))


def test_metrics_reconstructions_match_the_old_pil_detour():
    torch.manual_seed(0)
    vqvae = VQVAE(VQVAEConfig(channels=8, channel_mult=[1, 2], codebook_size=16, code_dim=4)).eval()
    images = torch.randint(0, 256, (5, 3, 8, 8), generator=torch.Generator().manual_seed(2)).to(torch.uint8)
    recons, _ = reconstruct(vqvae, images, batch_size=2)
    with torch.no_grad():
        expected = _old_detour(vqvae.decode(vqvae.encode(to_float(images))[0]))
    assert recons.dtype == torch.uint8 and torch.equal(recons, expected)
