"""Evaluate a trained run: generate images for a caption set and score them.

    python eval/eval.py --model runs/shapes --out DIR [--metrics fid,clip,composition,recon,edit,geneval] [--num-samples 500]
        [--split validation | --prompts FILE] [--steps 25 --guidance 4.0 --seed 0 --sampler euler (default: the run's)]
    python eval/eval.py ... --guidance 1,2,4,7    # a sweep: each scale in OUT/guidance-<g>/, their table and plot
        [--clip-model DIR|NAME] [--fid-features inception|clip] [--inception-weights FILE] [--cache-dir DIR]
    accelerate launch eval/eval.py ...    # sampling sharded across processes, the same numbers as one process

Caption set (--split): N rows of the split, in split order. When the dataset flags combinations held out of
training (shapes `--holdout`), they get an equal share, N/2 rows (all of them when there are fewer), so that
both accuracies are measured on enough samples. The real images of these rows are the FID reference set, the
CLIP-score ceiling and what the VQ-VAE reconstructs. --prompts FILE: one caption per line (.txt), or JSON
lines {"caption": ..., and for composition "shape", "color", "position", "size", optional "holdout"}, of which
the first N are sampled; the FID reference is then as many images, the first of --split, and there is no ceiling.

Metrics (mmdit/metrics.py has the protocol details):
- fid: torchmetrics FID of the samples vs the reference set, on Inception-v3 features (--inception-weights FILE
  offline) or a CLIP's image features (--fid-features clip); reference statistics cached in --cache-dir;
- clip: CLIP score (100 * max(cos, 0)) of samples and of the real images for the same captions (the ceiling);
- composition (shapes): the judge's per-attribute and all-four accuracy, for seen and held-out combinations;
- recon: VQ-VAE reconstruction PSNR of the reference images, and FID of reconstructions vs real;
- edit (shapes): recolour, reshape and negative-prompt edits of the real images, read by the judge (mmdit/edit_eval.py);
- geneval (scenes): GenEval's six tasks on N prompts of their own, seen and held out, read by the scenes judge
  (mmdit/geneval.py), with a grid per task.
A CLIP written by eval/train_clip.py is in-domain: its scores are labelled so, never standard CLIP/FID.

Sharding: image i's noise depends only on (seed, i) (mmdit.pipeline.noise_seed). Batches of --batch-size start at
multiples of it whatever the number of processes, each process samples a contiguous run of batches, and the main
process gathers them in order and computes every metric: any number of processes gives the same images and numbers.
Writes DIR/report.json (every number and the protocol), DIR/report.md and DIR/samples.png (and DIR/edit.png).
A guidance sweep (mmdit/sweep.py) writes them per scale, and DIR/report.json, report.md and guidance.png over all.
"""
from __future__ import annotations

import argparse
import functools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from PIL import Image
from tqdm.auto import tqdm

from mmdit.checks import check_int
from mmdit.cli import ArgumentParser, add_sampling_args, check_sampling_args, check_writable, multi_cpu, run_cli
from mmdit.clip import CLIPLoadError, load_clip
from mmdit.config import ConfigError, load_config
from mmdit.data.loader import DataError, dataset_source
from mmdit import edit_eval, geneval, sweep
from mmdit.data.shapes import judge_accuracy, matches_holdout, parse_holdout
from mmdit.eval_captions import CaptionSet, EvalError, caption_set
from mmdit.eval_report import markdown
from mmdit.grid import save_grid
from mmdit.editing import Edit
from mmdit.model_card import refresh_model_card
from mmdit.metrics import (FID, MetricError, clip_cosines, clip_extractor, clip_score, inception_extractor,
                           reconstruct, retrieval_top1)
from mmdit.pipeline import TextToImagePipeline
from mmdit.sampling import SampleOptions
from mmdit.pixels import to_uint8
from mmdit.text_encoder import TextEncoderLoadError
from mmdit.weights import ExportError

METRICS = ("fid", "clip", "composition", "recon", "edit", "geneval")
SAMPLED = {"fid", "clip", "composition"}  # the metrics scored on samples of the caption set
MAX_SAMPLES = 50_000  # FID's customary N; every sample is held in memory until scored


USER_ERRORS = (EvalError, ConfigError, DataError, CLIPLoadError, MetricError, TextEncoderLoadError, FileNotFoundError,
               ExportError)
# The metrics only one generated dataset can score (its judge reads the images), each choosing its own images or
# prompts: (dataset, why, what it scores instead of --prompts).
DATASET_METRICS = {"edit": ("shapes", "its judge reads the edits", "edits the real images of --split"),
                   "geneval": ("scenes", "e.g. configs/scenes-64.yaml: its judge reads the images",
                               "draws its own prompts")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="run directory written by train/train.py")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--metrics", default="composition", help=f"comma-separated: {', '.join(METRICS)}")
    parser.add_argument("--num-samples", type=int, default=500, help=f"1 to {MAX_SAMPLES}")
    parser.add_argument("--split", default="validation", help="caption set and real images (default: %(default)s)")
    parser.add_argument("--prompts", help="caption file instead of the split's captions: .txt or .jsonl")
    add_sampling_args(parser, guidance_list=True)
    parser.add_argument("--batch-size", type=int, default=100, help="sampling batch: also the unit of sharding")
    parser.add_argument("--clip-model", help="CLIP for clip score / CLIP features: a train_clip.py directory or a name")
    parser.add_argument("--fid-features", choices=["inception", "clip"], default="inception")
    parser.add_argument("--inception-weights", help="local Inception-v3 weights (.pth or .safetensors), for offline")
    parser.add_argument("--cache-dir", help="FID reference statistics (default: the run's train.cache_dir/fid)")
    args = parser.parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        problem = f"unknown metric {unknown[0]!r}" if unknown else "names no metric"
        parser.error(f"--metrics={args.metrics!r}: {problem}; accepted: a comma-separated list of "
                     f"{', '.join(METRICS)}")
    args.metrics = metrics
    try:  # what would otherwise fail only after loading the run, or in the middle of sampling
        check_int("--num-samples", args.num_samples, 1, MAX_SAMPLES)
        args.guidance, args.guidance_sweep = sweep.parse_guidance(args.guidance)  # one scale, or a sweep's
        check_sampling_args(args)
        check_int("--batch-size", args.batch_size)
    except ValueError as e:
        parser.error(str(e))
    uses_fid = bool({"fid", "recon"} & set(args.metrics))
    if not args.clip_model and ("clip" in args.metrics or (args.fid_features == "clip" and uses_fid)):
        parser.error("--metrics clip and --fid-features clip need --clip-model DIR|NAME "
                     "(e.g. a directory written by eval/train_clip.py)")
    return args


def check_run(metrics: list[str], dataset: str, prompts: str | None) -> None:
    """Before any sampling: the dataset-specific metrics asked of a run of another dataset, or with --prompts."""
    for metric in (m for m in metrics if m in DATASET_METRICS):
        needs, why, own = DATASET_METRICS[metric]
        if dataset != needs:
            raise EvalError(f"--metrics {metric} needs a {needs} run ({why}); this run's data is {dataset!r}")
        if prompts:
            raise EvalError(f"--metrics {metric} {own}, so it takes no --prompts ({prompts}); accepted: --metrics "
                            f"{metric} without --prompts")


# ---------------------------------------------------------------------------------------------------
# Sampling, sharded by whole batches.

def my_batches(n: int, batch_size: int, rank: int, world: int) -> list[int]:
    """Start indices of this process's batches: a contiguous run of the batches one process would run."""
    starts = list(range(0, n, batch_size))
    return starts[rank * len(starts) // world:(rank + 1) * len(starts) // world]


@torch.no_grad()
def generate(pipe: TextToImagePipeline, captions: list[str], options: SampleOptions, batch_size: int, rank: int = 0,
             world: int = 1, edit: Edit | None = None, negatives: list[str] | None = None) -> list:
    """This process's share: [(first index, uint8 (B, 3, H, W)), ...]; `edit`, `negatives`: one row per caption."""
    negatives = negatives or [""] * len(captions)
    out = []
    for start in tqdm(my_batches(len(captions), batch_size, rank, world), desc="sampling", disable=rank != 0):
        images = pipe.generate_rows(captions, negatives, options, slice(start, start + batch_size), edit)
        out.append((start, to_uint8(images).cpu()))
    return out


def sample(pipe: TextToImagePipeline, captions: list[str], options: SampleOptions, args, state, **edit) -> torch.Tensor:
    """Each process samples its batches (`edit`: generate's edit, negatives), then all get all the images, in order."""
    return merge(gather_object(generate(pipe, captions, options, args.batch_size, state.process_index,
                                        state.num_processes, **edit)))


def merge(parts: list) -> torch.Tensor:
    return torch.cat([images for _, images in sorted(parts, key=lambda p: p[0])])


# ---------------------------------------------------------------------------------------------------
# Scoring (main process only).

def groups(truth: list[dict] | None, n: int, holdout: list[str] = ()) -> dict[str, list[int]]:
    """Index lists: all captions, seen / held-out combinations when the captions are flagged, and each held-out
    combination of `holdout` (the dataset's phrases, e.g. "yellow triangle") alone, as "held_out: <phrase>"."""
    out = {"all_captions": list(range(n))}
    if truth and any("holdout" in t for t in truth):
        for name, flag in (("seen", False), ("held_out", True)):
            keep = [i for i, t in enumerate(truth) if bool(t.get("holdout", False)) == flag]
            if keep:
                out[name] = keep
        for phrase in holdout:
            combo = [parse_holdout(phrase)]
            keep = [i for i, t in enumerate(truth) if t.get("holdout") and matches_holdout(t, combo)]
            if keep:
                out[f"held_out: {phrase}"] = keep
    return out


def composition(images: torch.Tensor, truth: list[dict], holdout: list[str] = ()) -> dict:
    arrays = images.permute(0, 2, 3, 1).numpy()
    report = {}
    for name, keep in groups(truth, len(truth), holdout).items():
        report[name] = {"n": len(keep), **judge_accuracy([arrays[i] for i in keep], [truth[i] for i in keep])}
    return report


def clip_report(clip, images: torch.Tensor, cs: CaptionSet) -> dict:
    samples = clip_cosines(clip, images, cs.captions)
    real = clip_cosines(clip, cs.real, cs.captions) if cs.real is not None else None
    # The floor: each real image scored against the next row's caption. A score is informative only as far
    # as it sits above this (an in-domain CLIP's embeddings can all be close).
    mismatched = clip_cosines(clip, cs.real, cs.captions[1:] + cs.captions[:1]) if cs.real is not None else None
    label = ("in-domain CLIP score (a CLIP trained on this dataset by eval/train_clip.py; not comparable with "
             "published CLIP scores)" if clip.in_domain else f"CLIP score ({clip.info['name']})")
    report = {"model": clip.info["name"], "in_domain": clip.in_domain, "label": label, "resize": clip.info["resize"]}
    if clip.in_domain:
        report["clip_training"] = {k: clip.info["train_info"].get(k) for k in ("dataset", "train_pairs", "retrieval")}
    for name, keep in groups(cs.truth, len(cs.captions)).items():
        row = {"n": len(keep), "samples": clip_score(samples[keep])}
        if real is not None:
            row["real_ceiling"] = clip_score(real[keep])
            row["mismatched_floor"] = clip_score(mismatched[keep])
            row["ratio_to_ceiling"] = row["samples"]["clip_score"] / max(row["real_ceiling"]["clip_score"], 1e-9)
        report[name] = row
    return report


def setup_scorers(args, device, cache_dir: Path) -> tuple:
    """Load what the metrics need before sampling, and check where results go, so that a missing model or an
    unwritable directory fails in seconds, not after sampling."""
    check_writable(args.out, "--out")
    if {"fid", "recon"} & set(args.metrics):
        check_writable(cache_dir, "--cache-dir")  # by default the run's train.cache_dir/fid
    clip = load_clip(args.clip_model, device) if args.clip_model else None
    fid = None
    if {"fid", "recon"} & set(args.metrics):
        extractor, info = (clip_extractor(clip) if args.fid_features == "clip"
                           else inception_extractor(args.inception_weights))
        fid = FID(extractor, info)
        fid.metric.to(device)
    return clip, fid


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    # `accelerate launch --multi_gpu` on a machine without accelerators: CPU processes over gloo, as train.py.
    state = PartialState(cpu=multi_cpu())
    run = Path(args.model)
    if not (run / "config.yaml").is_file():
        raise EvalError(f"--model {run}: not a run directory (no config.yaml); accepted: a directory written by "
                        "train/train.py")
    cfg = load_config(run / "config.yaml")
    check_run(args.metrics, cfg.data.name, args.prompts)
    pipe = TextToImagePipeline.from_pretrained(run)
    pipe.dit.to(state.device)
    pipe.vqvae.to(state.device)
    cs = caption_set(cfg, args)
    cache_dir = Path(args.cache_dir or Path(cfg.train.cache_dir) / "fid")
    scorers = setup_scorers(args, state.device, cache_dir) if state.is_main_process else (None, None)
    at = functools.partial(evaluate_at, args=args, cfg=cfg, run=run, pipe=pipe, cs=cs,
                           scorers=(*scorers, cache_dir), state=state)
    if args.guidance_sweep:  # the same evaluation at each scale, then their table and plot
        return sweep.run(args.guidance_sweep, at, Path(args.out))
    return at(args.guidance, Path(args.out))


def evaluate_at(guidance: float | None, out: Path, args, cfg, run: Path, pipe: TextToImagePipeline,
                cs: CaptionSet, scorers: tuple, state) -> dict | None:
    """Sample and score at one guidance scale (None: the run's) and write `out` -> the report (main process)."""
    clip, fid, cache_dir = scorers
    options = pipe.options(args.steps, guidance, args.seed, args.sampler, temperature=args.temperature,
                           randomness=args.randomness, negative_guidance_scale=args.negative_guidance)
    start = time.perf_counter()
    s = sample_all(pipe, cfg, cs, options, args, state)
    if not state.is_main_process:
        return None

    report = {"protocol": {
        "model": str(run), "dataset": dataset_source(cfg.data), "split": args.split, "resolution": cfg.data.resolution,
        "holdout": cfg.data.holdout, "caption_set": cs.protocol, "num_samples": args.num_samples, **asdict(options),
        "noise": "image i: torch.Generator().manual_seed(mmdit.pipeline.noise_seed(seed, i)), a blake2b hash",
        "text_encoder": pipe.text_encoder.resolved_id, "batch_size": args.batch_size,
        "processes": state.num_processes, "dit_mode": pipe.dit.cfg.mode, "objective": pipe.dit.cfg.objective,
        "sampling_seconds": round(time.perf_counter() - start, 1)}}
    report.update(score(args, cfg, pipe, cs, s.images, clip, fid, cache_dir))
    if s.edits:
        report["edit"] = edit_eval.score(s.edits, s.edited, pipe.vqvae, pipe.dit.cfg.objective, s.edit_seconds)
    if s.prompts:
        report["geneval"] = geneval.score(s.prompts, s.scenes)

    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    if not args.guidance_sweep:  # RUN/README.md with these numbers (a sweep's scales would overwrite each other)
        refresh_model_card(run, out / "report.json")
    if s.images is not None:
        save_samples(s.images, cs, out / "samples.png")
    if s.edits:
        edit_eval.save_edit_grid(s.edits, s.edited, out / "edit.png")
    if s.prompts:
        geneval.save_grids(s.prompts, s.scenes, out)
    print(markdown(report))
    return report


@dataclass
class Samples:
    images: torch.Tensor | None  # uint8 (N, 3, R, R) of the caption set, when a metric scores them
    edits: list  # edit_eval.Generation, and their samples by name
    edited: dict
    edit_seconds: float
    prompts: geneval.PromptSet | None  # --metrics geneval: its prompts and their samples
    scenes: torch.Tensor | None


def sample_all(pipe: TextToImagePipeline, cfg, cs: CaptionSet, options: SampleOptions, args, state) -> Samples:
    """Every image the asked metrics score, each set sharded across the processes."""
    images = sample(pipe, cs.captions, options, args, state) if SAMPLED & set(args.metrics) else None
    start = time.perf_counter()
    edits = edit_eval.generations(cs.truth, cs.real, options.seed) if "edit" in args.metrics else []
    edited = {g.name: sample(pipe, g.prompts, options, args, state, edit=g.edit, negatives=g.negatives) for g in edits}
    edit_seconds = time.perf_counter() - start
    prompts = (geneval.prompt_set(args.num_samples, cfg.data.resolution, geneval.dataset_holdout(cfg.data))
               if "geneval" in args.metrics else None)
    scenes = sample(pipe, prompts.captions, options, args, state) if prompts else None
    return Samples(images, edits, edited, edit_seconds, prompts, scenes)


def score(args, cfg, pipe: TextToImagePipeline, cs: CaptionSet, images: torch.Tensor, clip, fid,
          cache_dir: Path) -> dict:
    """The report's sections for --metrics fid, clip, composition and recon, on uint8 (N, 3, R, R) samples."""
    report = {}
    if fid is not None:
        description = {"dataset": dataset_source(cfg.data), "split": args.split, "resolution": cfg.data.resolution,
                       "rows": cs.protocol["reference"]}
        report["fid_extractor"] = {**fid.info, "reference": fid.set_reference(cs.reference, description, cache_dir)}
    if "fid" in args.metrics:
        report["fid"] = {"label": fid.info["label"], "samples_vs_reference": fid(images)}
    if "clip" in args.metrics:
        report["clip"] = clip_report(clip, images, cs)
    if "composition" in args.metrics:
        report["composition"] = (composition(images, cs.truth, cfg.data.holdout) if cs.truth is not None
                                 else {"skipped": "the captions carry no shape attributes"})
    if "recon" in args.metrics:
        recon, psnr_db = reconstruct(pipe.vqvae, cs.reference)
        report["recon"] = {"n": len(recon), "psnr_db": psnr_db, "fid_label": fid.info["label"],
                           "fid_recon_vs_reference": fid(recon)}
        if clip is not None:  # are the reconstructions still recognisable as their captions?
            report["recon"]["clip_retrieval_top1"] = {"reference": retrieval_top1(clip, cs.reference, cs.captions),
                                                      "recon": retrieval_top1(clip, recon, cs.captions)}
    return report


def save_samples(images: torch.Tensor, cs: CaptionSet, path: Path, rows: int = 24) -> None:
    """One captioned row per caption: the sample, then the real image when there is one."""
    pil = lambda t: Image.fromarray(np.ascontiguousarray(t.permute(1, 2, 0).numpy()))  # noqa: E731
    shown = range(min(rows, len(images)))
    grid = [[pil(images[i])] + ([pil(cs.real[i])] if cs.real is not None else []) for i in shown]
    labels = [cs.captions[i] + (" [held out]" if cs.truth and cs.truth[i].get("holdout") else "") for i in shown]
    save_grid(grid, path, scale=2, labels=labels)


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv, user_errors=USER_ERRORS)

