"""Sample a labelled grid from a trained run:

    python -m mmdit.sample --model runs/shapes --prompt "a small blue square in the bottom right" \\
        [--prompt ...] --num-images 4 [--steps 25 --guidance 4.0 --seed 0 --sampler euler] --out grid.png
    python -m mmdit.sample --model RUN --prompt P [--negative-prompt N] \\
        [--image IN.png [--strength S] [--mask MASK.png]] --out OUT.png

One row per prompt, `--num-images` samples per row; `--prompt ""` samples unconditionally. The sampling flags
default to the options the run was trained with (its `sample:` section, saved in pipeline.json).
Editing (mmdit/editing.py has the rules): `--image` alone is image-to-image from noise level `--strength`
(default 0.6), with `--mask` (white = repaint) inpainting; each row then starts with the input and the mask as the
model sees them (resized and centre-cropped to its resolution). `--negative-prompt` is what guidance steps away
from for every prompt, `--negative-guidance` times (default 1), beside the empty prompt.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mmdit.checks import check_int
from mmdit.cli import ArgumentParser, add_sampling_args, check_sampling_args, check_writable, run_cli
from mmdit.config import ConfigError
from mmdit.editing import Edit, check_strength
from mmdit.grid import check_image_path, save_grid
from mmdit.pipeline import TextToImagePipeline
from mmdit.pixels import to_float, to_pil
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
    parser.add_argument("--negative-prompt", help="what to steer away from, for every prompt (default: none)")
    parser.add_argument("--image", help="an image to edit (any size and mode): image-to-image, or with --mask inpainting")
    parser.add_argument("--strength", type=float, help="with --image: the noise level the edit restarts from, "
                        "in (0, 1] (default 0.6; 1 with --mask)")
    parser.add_argument("--mask", help="with --image: white = repaint (any size of the image's aspect)")
    parser.add_argument("--no-snap", action="store_true", help="decode sampled latents without snapping to codes")
    parser.add_argument("--scale", type=int, default=2, help=f"pixel upscaling of the grid (1 to {MAX_SCALE})")
    parser.add_argument("--out", default="grid.png")
    args = parser.parse_args(argv)
    try:  # everything that would otherwise fail only after sampling
        check_int("--num-images", args.num_images, 1, MAX_IMAGES)
        check_sampling_args(args)
        check_int("--scale", args.scale, 1, MAX_SCALE)
        check_edit_args(args)
        check_writable(args.out, "--out", is_file=True)
        check_image_path(args.out, "--out")
        image, mask = (open_image(path, flag) for path, flag in ((args.image, "--image"), (args.mask, "--mask")))
    except ValueError as e:  # ConfigError included
        parser.error(str(e))
    out = Path(args.out)

    pipe = TextToImagePipeline.from_pretrained(args.model)
    try:
        shown = inputs_shown(pipe, image, mask)  # checks the mask against the image before sampling
    except ValueError as e:
        parser.error(str(e).replace("mask_image", "--mask"))
    n = args.num_images
    chosen = dict(num_steps=args.steps, guidance_scale=args.guidance, seed=args.seed, sampler=args.sampler,
                  snap_to_codes=False if args.no_snap else None, temperature=args.temperature,
                  randomness=args.randomness, negative_guidance_scale=args.negative_guidance)  # None = the run's
    print(f"sampling: {pipe.options(**chosen)}")
    edit = dict(negative_prompt=args.negative_prompt, image=image, mask_image=mask, strength=args.strength)
    images = pipe([p for p in args.prompt for _ in range(n)], **edit, **chosen)
    rows = [shown + images[i * n:(i + 1) * n] for i in range(len(args.prompt))]
    labels = [(p if p else "(unconditional)") + (f" (not: {args.negative_prompt})" if args.negative_prompt else "")
              for p in args.prompt]
    path = save_grid(rows, out, scale=args.scale, labels=labels)
    print(f"wrote {path}")
    return path


def check_edit_args(args: argparse.Namespace) -> None:
    for flag, value in (("--strength", args.strength), ("--mask", args.mask)):
        if value is not None and args.image is None:
            raise ValueError(f"{flag} was given without --image; accepted: {flag} with --image IN.png")
    if args.strength is not None:
        check_strength(args.strength)


def open_image(path: str | None, flag: str) -> Image.Image | None:
    if path is None:
        return None
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, UnidentifiedImageError) as e:  # missing, unreadable or not an image
        raise ValueError(f"{flag}={path}: not an image file PIL can read ({e.__class__.__name__}); accepted: "
                         "a .png, .jpg or other image file") from None


def inputs_shown(pipe: TextToImagePipeline, image: Image.Image | None, mask: Image.Image | None) -> list:
    """The input (and its mask, white = repainted pixels) as the model sees them, to head a row of edits."""
    if image is None:
        return []
    edit = Edit.prepare(1, pipe.resolution, image, mask)
    shown = to_pil(to_float(edit.images))
    if edit.repaint is not None:
        shown.append(Image.fromarray(edit.repaint[0].numpy()).convert("RGB"))
    return shown


def cli(argv: list[str] | None = None) -> int:
    """Exit code 2 and one `error: ...` line for a bad argument, a missing, damaged or mismatched run directory,
    or a text encoder that cannot be loaded."""
    return run_cli(main, argv, user_errors=(ConfigError, FileNotFoundError, ExportError, TextEncoderLoadError))


if __name__ == "__main__":
    sys.exit(cli())
