"""Benchmark the shapes dataset: generation time for 20k images, and judge accuracy on them.

Judges the images as written to parquet (clean), then after a mild Gaussian blur
plus pixel noise, the kind of damage a VQ-VAE or a diffusion sampler does.

    python bench/bench_shapes.py [--num-images 20000] [--size 32] [--blur 0.8] [--noise 8]
"""

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageFilter

from mmdit.data.shapes import generate, judge_accuracy


def report(name, rows, images):
    start = time.perf_counter()
    acc = judge_accuracy(images, rows)
    seconds = time.perf_counter() - start
    cells = "  ".join(f"{a} {100 * v:.3f}%" for a, v in acc.items())
    print(f"judge {name:<14} {cells}  ({1e3 * seconds / len(rows):.2f} ms/img)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-images", type=int, default=20000)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--blur", type=float, default=0.8, help="Gaussian blur radius in pixels")
    p.add_argument("--noise", type=float, default=8.0, help="noise std on the 0-255 scale")
    a = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "shapes"
        start = time.perf_counter()
        generate(out, a.num_images, size=a.size, seed=a.seed)
        print(f"generation: {a.num_images} images at {a.size}x{a.size} "
              f"in {time.perf_counter() - start:.2f}s")
        rows = [r for split in ["train", "validation"] for r in
                pq.read_table(out / "data" / f"{split}-00000-of-00001.parquet").to_pylist()]
    images = [Image.open(io.BytesIO(r["image"]["bytes"])) for r in rows]

    report("clean", rows, images)

    rng = np.random.default_rng(0)
    damaged = [np.asarray(im.filter(ImageFilter.GaussianBlur(a.blur)), np.float32) for im in images]
    damaged = [np.clip(d + rng.normal(0, a.noise, d.shape), 0, 255).astype(np.uint8)
               for d in damaged]
    report(f"blur{a.blur}+noise{a.noise:g}", rows, damaged)


if __name__ == "__main__":
    main()
