"""Benchmark the VQ-VAE stage: wall time to train it and its validation quality.

    python bench/bench_vqvae.py [--config configs/shapes.yaml] [section.key=value ...]

Runs `train.stage=vqvae` (training, export, latent cache, validation metrics) into a temporary run
directory, on the dataset the config names (generated first if missing), and prints one line of numbers:
training time, samples/s, validation PSNR, codebook usage and perplexity, and the shapes judge's accuracy
on reconstructions. Extra arguments are config overrides, e.g. `vqvae.channel_mult=[1,2,2]` for f8.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import train

from mmdit.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/shapes.yaml")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [*args.overrides, "train.stage=vqvae", f"train.output_dir={tmp}/run"]
        cfg = load_config(args.config, overrides)
        start = time.perf_counter()
        train(args.config, overrides)
        seconds = time.perf_counter() - start
        metrics = json.loads((Path(tmp) / "run" / "vqvae" / "metrics.json").read_text())
    t = cfg.vqvae_train
    judge = metrics.get("judge", {})
    print(f"vqvae f{cfg.vqvae.downsample} K={cfg.vqvae.codebook_size} d={cfg.vqvae.code_dim} "
          f"channels={cfg.vqvae.channels}x{cfg.vqvae.channel_mult} | {t.steps} steps x {t.batch_size}: "
          f"{seconds:.0f}s stage total ({t.steps * t.batch_size / seconds:.0f} samples/s incl. load+cache) | "
          f"val PSNR {metrics['psnr']:.2f} dB, usage {100 * metrics['usage']:.1f}%, "
          f"perplexity {metrics['perplexity']:.0f}"
          + (" | judge " + " ".join(f"{k} {100 * v:.1f}%" for k, v in judge.items()) if judge else ""))


if __name__ == "__main__":
    main()
