"""What an edit starts from: the given images and masks, prepared as training images are, and the rules that
turn them into the sampler's inputs.

    edit = Edit.prepare(num_prompts, resolution, image=photo, mask_image=mask, strength=1.0)
    canvas, mask = outpaint(photo, left=16, right=16)  # then inpaint the canvas with that mask

- `image` (one PIL image, or one per prompt; any size and mode) is resized and centre-cropped to the model's
  resolution (mmdit.pixels.prepare). With it alone: image-to-image, `strength` in (0, 1] the share of the way back
  to noise (flow: the noise level t it restarts from; masked: the share of tokens re-masked).
- `mask_image` (white = repaint; any size of the image's aspect) goes through the same resize and crop, then a
  pixel is repainted when its gray value is >= 128, and a latent cell when any of its pixels is: the decoded
  image may change a little around the mask's edge, inside those cells. Outside the mask the input's own pixels
  are pasted back (`paste`), so untouched pixels stay exactly as given.
- Outpainting is inpainting on a larger canvas: `outpaint` places the image on it and masks the border; the
  model's resolution is fixed, so the result shows the wider scene at the same size (the image zoomed out).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mmdit.checks import check_number
from mmdit.pixels import fit, prepare, to_float

ASPECT_TOLERANCE = 0.01  # a mask resized by another tool may be a pixel off


def check_strength(strength) -> float:
    return check_number("strength", strength, "a number in (0, 1] (1 = start from noise)", lambda v: 0 < v <= 1)


def per_prompt(name: str, value, n: int, accepted: str) -> list:
    """One value for every prompt, or a list of one per prompt -> a list of n."""
    if not isinstance(value, (list, tuple)):
        return [value] * n
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} items for {n} prompts; accepted: {accepted}, or a list of one "
                         "per prompt")
    return list(value)


def repaint_pixels(mask: Image.Image, image: Image.Image, resolution: int) -> torch.Tensor:
    """A mask (white = repaint) of `image`'s aspect -> bool (R, R), resized and cropped as the image is."""
    (mw, mh), (iw, ih) = mask.size, image.size
    if abs(mw * ih - mh * iw) > ASPECT_TOLERANCE * iw * ih:
        raise ValueError(f"mask_image is {mw}x{mh} but the image is {iw}x{ih}; accepted: a mask of the image's "
                         "aspect ratio (any size)")
    gray = fit(mask.convert("L").resize(image.size, Image.Resampling.BILINEAR), resolution)
    return torch.from_numpy(np.array(gray) >= 128)


@dataclass
class Edit:
    images: torch.Tensor  # uint8 (B, 3, R, R): the inputs, prepared
    strength: float = 1.0
    repaint: torch.Tensor | None = None  # (B, R, R) bool, True = repaint; None = image-to-image
    paste: bool = True  # paste the input back outside the mask

    @classmethod
    def prepare(cls, n: int, resolution: int, image=None, mask_image=None, strength: float | None = None,
                paste: bool = True) -> "Edit | None":
        """The pipeline's editing arguments for n prompts -> an Edit (None without an image). strength None =
        0.6 for image-to-image, 1 for inpainting."""
        if image is None:
            if mask_image is not None:
                raise ValueError("mask_image was given without image; accepted: mask_image with the image it masks")
            if strength is not None:
                raise ValueError("strength was given without image; accepted: strength with an image to edit")
            return None
        strength = check_strength((0.6 if mask_image is None else 1.0) if strength is None else strength)
        if not isinstance(paste, bool):
            raise ValueError(f"paste_unmasked={paste!r}; accepted: True or False")
        images = per_prompt("image", image, n, "a PIL image")
        masks = per_prompt("mask_image", mask_image, n, "a PIL image")
        for name, values in (("image", images), ("mask_image", masks if mask_image is not None else [])):
            bad = next((i for i, v in enumerate(values) if not isinstance(v, Image.Image)), None)
            if bad is not None:
                raise TypeError(f"{name}[{bad}] is a {type(values[bad]).__name__}; accepted: a PIL image")
        pixels = torch.stack([prepare(im, resolution) for im in images])
        repaint = None if mask_image is None else torch.stack(
            [repaint_pixels(m, im, resolution) for m, im in zip(masks, images)])
        return cls(pixels, strength, repaint, paste)

    def select(self, rows: slice) -> "Edit":
        return Edit(self.images[rows], self.strength, None if self.repaint is None else self.repaint[rows], self.paste)

    def cells(self, size: int) -> torch.Tensor | None:
        """(B, size, size) bool: the latent cells to repaint, those with any repainted pixel; None = all."""
        if self.repaint is None:
            return None
        return F.adaptive_max_pool2d(self.repaint[:, None].float(), size)[:, 0] > 0

    def paste_back(self, decoded: torch.Tensor) -> torch.Tensor:
        """Decoded images (B, 3, R, R) in [-1, 1] -> the input's pixels outside the repainted ones."""
        if self.repaint is None or not self.paste:
            return decoded
        inputs = to_float(self.images).to(decoded.device)
        return torch.where(self.repaint[:, None].to(decoded.device), decoded, inputs)


def outpaint(image: Image.Image, left: int = 0, top: int = 0, right: int = 0, bottom: int = 0,
             fill=(128, 128, 128)) -> tuple[Image.Image, Image.Image]:
    """-> (the image on a canvas extended by that many pixels on each side, filled with `fill`; its mask, white
    on the border): pass both to the pipeline as image and mask_image to paint the border in."""
    for name, value in (("left", left), ("top", top), ("right", right), ("bottom", bottom)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r}; accepted: a whole number of pixels >= 0")
    w, h = image.size
    canvas = Image.new("RGB", (w + left + right, h + top + bottom), fill)
    canvas.paste(image.convert("RGB"), (left, top))
    mask = Image.new("L", canvas.size, 255)
    mask.paste(0, (left, top, left + w, top + h))
    return canvas, mask
