"""Image grids people look at: reconstructions during VQ-VAE training, samples during DiT training."""
from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw


def check_image_path(path: str | Path, what: str) -> None:
    """ValueError unless PIL writes an RGB image to `path`, by its extension: tried on a 1x1 image, since some
    formats PIL knows take no RGB (XBM) or cannot be written at all (PSD)."""
    ext = Path(path).suffix.lower()
    image_format = Image.registered_extensions().get(ext)
    try:
        if image_format is None:
            raise KeyError(ext)
        Image.new("RGB", (1, 1)).save(io.BytesIO(), format=image_format)
    except (KeyError, ValueError, OSError) as e:
        problem = f"PIL writes no RGB image format named {ext!r}" if ext else "no extension names the image format"
        raise ValueError(f"{what}={path}: {problem}; accepted: .png, .jpg, .webp, .bmp, .tif or another extension "
                         "PIL writes") from e


def save_grid(rows: list[list[Image.Image]], path: str | Path, scale: int = 1,
              labels: list[str] | None = None, pad: int = 2) -> Path:
    """Rows of equally sized images -> one PNG; an optional label is written left of each row."""
    w, h = (s * scale for s in rows[0][0].size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 0 if labels is None else int(max(measure.textlength(t) for t in labels)) + 8
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (label_w + cols * (w + pad) + pad, len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, row in enumerate(rows):
        y = pad + i * (h + pad)
        if labels is not None:
            draw.text((4, y + h // 2 - 5), labels[i], fill="black")
        for j, image in enumerate(row):
            grid.paste(image.resize((w, h), Image.NEAREST), (label_w + pad + j * (w + pad), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
