"""Benchmark the scenes dataset: generation time, and judge accuracy on the images as written (clean), blurred,
noisy and JPEG-compressed: the fraction with every object exact, and the fraction scored correct on its spec.

    python bench/bench_scenes.py [--num-images 3000] [--size 64] [--blur 0.8] [--noise 8] [--jpeg 90]
"""

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageFilter

from mmdit.data.scenes import generate, judge_accuracy


def report(name, rows, images):
    start = time.perf_counter()
    acc = judge_accuracy(images, rows)
    seconds = time.perf_counter() - start
    print(f"judge {name:<10} exact {100 * acc['exact']:.2f}%  score {100 * acc['score']:.2f}%  "
          f"({1e3 * seconds / len(rows):.2f} ms/img)")


def jpeg(image, quality):
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return Image.open(buf)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-images", type=int, default=3000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--blur", type=float, default=0.8, help="Gaussian blur radius in pixels")
    p.add_argument("--noise", type=float, default=8.0, help="noise std on the 0-255 scale")
    p.add_argument("--jpeg", type=int, default=90, help="JPEG quality")
    a = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "scenes"
        start = time.perf_counter()
        generate(out, a.num_images, size=a.size, seed=a.seed, verbose=False)
        seconds = time.perf_counter() - start
        print(f"generation: {a.num_images} images at {a.size}x{a.size} in {seconds:.2f}s "
              f"({1e3 * seconds / a.num_images:.2f} ms/img)")
        rows = [dict(r, spec=json.loads(r["spec"]), objects=json.loads(r["objects"])) for split in
                ["train", "validation"] for r in
                pq.read_table(out / "data" / f"{split}-00000-of-00001.parquet").to_pylist()]
    images = [Image.open(io.BytesIO(r["image"]["bytes"])) for r in rows]

    report("clean", rows, images)
    rng = np.random.default_rng(0)
    report(f"blur{a.blur}", rows, [im.filter(ImageFilter.GaussianBlur(a.blur)) for im in images])
    noisy = [np.clip(np.asarray(im, np.float32) + rng.normal(0, a.noise, (a.size, a.size, 3)), 0, 255)
             for im in images]
    report(f"noise{a.noise:g}", rows, [n.astype(np.uint8) for n in noisy])
    report(f"jpeg{a.jpeg}", rows, [jpeg(im, a.jpeg) for im in images])


if __name__ == "__main__":
    main()
