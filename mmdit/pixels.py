"""Pixel conversions, in one place: how an image moves between the three forms the code uses.

- uint8 (B, 3, H, W), 0..255: what the loader decodes, what the metrics and caches hold;
- float (B, 3, H, W) in [-1, 1]: what the VQ-VAE reads and writes;
- RGB PIL images: what grids and sample files show.

    x = to_float(images)       # uint8 -> float32 in [-1, 1]
    images = to_uint8(x)       # float -> uint8: clamped to [-1, 1], rounded to the nearest level
    pils = to_pil(x)           # float -> RGB PIL images, the same bytes as to_uint8(x)
    image = from_pil(pil)      # one RGB PIL image -> uint8 (3, H, W)
    pil = to_rgb(pil)          # any PIL mode -> RGB, transparency on white
    image = prepare(pil, 32)   # any RGB PIL image -> uint8 (3, 32, 32) as training data is prepared

to_uint8(to_float(images)) == images for every uint8 value: each level k maps to k / 127.5 - 1 and back.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [-1, 1], on the same device."""
    return images.float() / 127.5 - 1


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float (B, 3, H, W), nominally in [-1, 1] -> uint8 on the same device: clamped first, then rounded
    (half to even, torch.round) rather than truncated, so a round trip through to_float is exact."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Float (B, 3, H, W) in [-1, 1] -> RGB PIL images, converted as to_uint8 converts."""
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in to_uint8(images)]


def from_pil(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> uint8 (3, H, W) (a channels-first view of a copy of its pixels, as torchvision's
    pil_to_tensor returns it; numpy here keeps torchvision out of the pipeline's imports)."""
    if image.mode != "RGB":
        raise ValueError(f"from_pil takes an RGB image, got mode {image.mode!r}; convert('RGB') it first")
    return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparent pixels become white (the usual background of icon datasets)."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit gray: scale to 8 bits, PIL would clip
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB")


def fit(image: Image.Image, resolution: int, resample=Image.Resampling.BICUBIC) -> Image.Image:
    """Short side resized to `resolution` (long side truncated as torchvision computes it), then the centre square:
    how training images are prepared, and the images and masks given to the pipeline for editing. PIL's
    resampling widens its kernel when it shrinks, so downscaling is antialiased."""
    r = resolution
    if image.size == (r, r):
        return image
    w, h = image.size
    size = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)
    image = image.resize(size, resample)
    left, top = int(round((size[0] - r) / 2.0)), int(round((size[1] - r) / 2.0))
    return image.crop((left, top, left + r, top + r))


def prepare(image: Image.Image, resolution: int) -> torch.Tensor:
    """Any PIL image -> uint8 (3, R, R): RGB (transparency on white), then `fit`."""
    return from_pil(fit(to_rgb(image), resolution))
