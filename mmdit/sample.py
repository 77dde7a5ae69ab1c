"""Sample a labelled grid from a trained run:

    python -m mmdit.sample --model runs/shapes --prompt "a small blue square in the bottom right" \\
        [--prompt ...] --num-images 4 [--steps 25 --guidance 4.0 --seed 0 --sampler euler] --out grid.png

One row per prompt, `--num-images` samples per row; `--prompt ""` samples unconditionally. The sampling flags
default to the options the run was trained with (its `sample:` section, saved in pipeline.json).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmdit.checks import check_int
from mmdit.cli import ArgumentParser, add_sampling_args, check_sampling_args, check_writable, run_cli
from mmdit.config import ConfigError
from mmdit.grid import check_image_path, save_grid
from mmdit.pipeline import TextToImagePipeline
from mmdit.text_encoder import TextEncoderLoadError
from mmdit.weights import ExportError

# One grid row per prompt: a row of 64 images at scale 8 is already ~16k pixels wide at 32x32.
MAX_IMAGES, MAX_SCALE = 64, 8


def main(argv: list[str] | None = None) -> Path:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="run directory written by train/train.py")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    parser.add_argument("--num-images", type=int, default=4, help=f"samples per prompt (1 to {MAX_IMAGES})")
    add_sampling_args(parser)
    parser.add_argument("--no-snap", action="store_true", help="decode sampled latents without snapping to codes")
    parser.add_argument("--scale", type=int, default=2, help=f"pixel upscaling of the grid (1 to {MAX_SCALE})")
    parser.add_argument("--out", default="grid.png")
    args = parser.parse_args(argv)
    try:  # everything that would otherwise fail only after sampling
        check_int("--num-images", args.num_images, 1, MAX_IMAGES)
        check_sampling_args(args)
        check_int("--scale", args.scale, 1, MAX_SCALE)
        check_writable(args.out, "--out", is_file=True)
        check_image_path(args.out, "--out")
    except ValueError as e:  # ConfigError included
        parser.error(str(e))
    out = Path(args.out)

    pipe = TextToImagePipeline.from_pretrained(args.model)
    n = args.num_images
    chosen = dict(num_steps=args.steps, guidance_scale=args.guidance, seed=args.seed, sampler=args.sampler,
                  snap_to_codes=False if args.no_snap else None, temperature=args.temperature,
                  randomness=args.randomness)  # None = the run's
    print(f"sampling: {pipe.options(**chosen)}")
    images = pipe([p for p in args.prompt for _ in range(n)], **chosen)
    rows = [images[i * n:(i + 1) * n] for i in range(len(args.prompt))]
    labels = [p if p else "(unconditional)" for p in args.prompt]
    path = save_grid(rows, out, scale=args.scale, labels=labels)
    print(f"wrote {path}")
    return path


def cli(argv: list[str] | None = None) -> int:
    """Exit code 2 and one `error: ...` line for a bad argument, a missing, damaged or mismatched run directory,
    or a text encoder that cannot be loaded."""
    return run_cli(main, argv, user_errors=(ConfigError, FileNotFoundError, ExportError, TextEncoderLoadError))


if __name__ == "__main__":
    sys.exit(cli())
