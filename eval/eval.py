"""Evaluate a trained run: generate images for a caption set and score them.

    python eval/eval.py --model runs/shapes [--metrics composition] [--num-samples 500] \\
        [--split validation | --prompts FILE] [--steps 25 --guidance 4.0 --seed 0 --sampler euler] --out DIR

Metrics:
- composition (shapes dataset): the shapes judge reads shape, colour, position and size off every generated
  image; per-attribute and all-four accuracy, separately for captions whose attribute combination was seen
  in training and for combinations held out of it (`--holdout` at generation time).

Writes DIR/report.json (every number and the protocol), DIR/report.md and DIR/samples.png.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mmdit.config import load_config  # noqa: E402
from mmdit.data.shapes import ATTRIBUTES, judge_accuracy  # noqa: E402
from mmdit.grid import save_grid  # noqa: E402
from mmdit.latents import load_split  # noqa: E402
from mmdit.pipeline import TextToImagePipeline  # noqa: E402

METRICS = ("composition",)


def caption_set(run: Path, split: str, n: int) -> tuple[list[str], list[dict]]:
    """The first caption of the first n rows of a cached split, with their attribute columns."""
    _, meta = load_split(run / "latents", split)
    columns = meta["columns"]
    n = min(n, len(meta["captions"]))
    truth = [{k: columns[k][i] for k in columns} for i in range(n)]
    return [c[0] for c in meta["captions"][:n]], truth


def composition(images, truth: list[dict]) -> dict:
    """Judge accuracy, overall and split into seen / held-out attribute combinations."""
    report = {"all_captions": judge_accuracy(images, truth), "n": len(truth)}
    for name, flag in (("seen", False), ("held_out", True)):
        keep = [i for i, t in enumerate(truth) if bool(t.get("holdout", False)) == flag]
        if keep:
            report[name] = {"n": len(keep), **judge_accuracy([images[i] for i in keep], [truth[i] for i in keep])}
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="run directory written by train/train.py")
    parser.add_argument("--metrics", default="composition", help=f"comma-separated: {', '.join(METRICS)}")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--split", default="validation")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--sampler", choices=["euler", "heun"], default="euler")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    for m in metrics:
        if m not in METRICS:
            parser.error(f"unknown metric {m!r}; accepted: {', '.join(METRICS)}")
    if args.num_samples <= 0:
        parser.error(f"--num-samples must be >= 1, got {args.num_samples}")

    run, out = Path(args.model), Path(args.out)
    cfg = load_config(run / "config.yaml")
    pipe = TextToImagePipeline.from_pretrained(run)
    prompts, truth = caption_set(run, args.split, args.num_samples)
    start = time.perf_counter()
    with torch.inference_mode():
        images = pipe(prompts, num_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                      sampler=args.sampler, batch_size=args.batch_size)
    seconds = time.perf_counter() - start

    report = {"protocol": {"model": str(run), "split": args.split, "num_samples": len(prompts),
                           "steps": args.steps, "guidance": args.guidance, "sampler": args.sampler,
                           "seed": args.seed, "dit_mode": pipe.dit.cfg.mode, "dataset": cfg.data.name,
                           "holdout": cfg.data.holdout, "sampling_seconds": round(seconds, 1)}}
    if "composition" in metrics:
        report["composition"] = composition(images, truth)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    shown = min(24, len(images))  # one captioned row per sample: every caption differs
    save_grid([[im] for im in images[:shown]], out / "samples.png", scale=2, labels=prompts[:shown])
    print(markdown(report))
    return report


def markdown(report: dict) -> str:
    p = report["protocol"]
    lines = [f"# mmdit evaluation: {p['model']}", "",
             f"{p['num_samples']} samples for `{p['split']}` captions, {p['steps']} {p['sampler']} steps, "
             f"guidance {p['guidance']}, seed {p['seed']}, DiT mode {p['dit_mode']} "
             f"({p['sampling_seconds']} s sampling)", ""]
    if "composition" in report:
        keys = [*ATTRIBUTES, "all"]
        lines += ["## Compositional accuracy (shapes judge)", "", "| captions | n | " + " | ".join(keys) + " |",
                  "|---" * (len(keys) + 2) + "|"]
        comp = report["composition"]
        for name in ("all_captions", "seen", "held_out"):
            if name in comp:
                row = comp[name]
                n = row.get("n", comp["n"])
                lines.append(f"| {name} | {n} | " + " | ".join(f"{100 * row[k]:.1f}%" for k in keys) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
