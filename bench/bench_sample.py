"""Benchmark sampling: images/s of the whole text -> image pipeline (text encoder, the sampler's steps with
classifier-free guidance, VQ-VAE decode): mmdit's DiT against the same loop around diffusers' transformer, and
the two objectives against each other (flow: 25 Euler steps; masked: 12 MaskGIT steps, by default).

    python bench/bench_sample.py [--run RUN_DIR[,RUN_DIR]] [--mode cross,joint] [--objective flow,masked]
                                 [--num-images 8] [--steps N] [--device cpu|cuda] [--dtype fp32|bf16]
                                 [--threads 1] [--reps 2] [--no-diffusers]

Without --run: a DiT with random weights at the matched config (width 256, depth 6, heads 4, 8x8x8 latents,
patch 1, 16 tokens of dim 384) for each mode and objective, with the VQ-VAE of runs/shapes when it is there
(else a random one of the default config); the sampling work does not depend on the weights. With --run: those
exported pipelines (e.g. a flow run and a masked run). For flow the diffusers peer (PixArt for cross, SD3 for
joint) is built at the DiT's config and driven by the very same TextToImagePipeline.generate loop, so only the
transformer differs. Everything of one mode is timed interleaved; a masked row notes its speed-up over flow.
--device cuda puts the DiT and VQ-VAE on the GPU (the text encoder stays on the CPU); --dtype bf16 runs the
calls under autocast.
"""
from __future__ import annotations

import argparse
import functools
import json
import time
from dataclasses import replace
from pathlib import Path

import _common
import torch
from _common import (
    DEFAULT_CONFIG,
    DTYPES,
    DiffusersDiT,
    build,
    interleaved,
    machine,
    peer,
    set_device,
    set_threads,
    settings,
    table,
)

from mmdit.config import load_config
from mmdit.pipeline import PipelineInfo, TextToImagePipeline
from mmdit.text_encoder import TextEncoder
from mmdit.vqvae import VQVAE

SHAPES_RUN = Path(__file__).resolve().parent.parent / "runs" / "shapes"


def pipelines(runs: list[str], mode: str, objectives: list[str], with_diffusers: bool
              ) -> dict[str, TextToImagePipeline]:
    """name -> pipeline, for this mode: the exported `runs`, or one random matched-config DiT per objective."""
    if runs:
        pipes = [TextToImagePipeline.from_pretrained(run) for run in runs]
        pipes = [pipe for pipe in pipes if pipe.dit.cfg.mode == mode]
    else:
        cfg = load_config(DEFAULT_CONFIG)
        if (SHAPES_RUN / "pipeline.json").is_file():
            vqvae = VQVAE.from_pretrained(SHAPES_RUN / "vqvae" / "model")
            info = PipelineInfo(**json.loads((SHAPES_RUN / "pipeline.json").read_text()))
        else:
            torch.manual_seed(0)
            vqvae = VQVAE(cfg.vqvae)
            info = PipelineInfo(None, cfg.text_encoder.max_length, [0.0] * cfg.vqvae.code_dim,
                                [1.0] * cfg.vqvae.code_dim)
        info = replace(info, sample=replace(info.sample, steps=None, sampler=None, guidance=None))  # each objective's defaults
        matched = next(s for s in settings(mode) if s.name == "matched")
        encoder = TextEncoder(info.text_encoder, max_length=info.max_length)
        pipes = [TextToImagePipeline(build("mmdit", replace(matched.cfg, objective=objective,
                                                            codebook_size=vqvae.cfg.codebook_size)),
                                     vqvae, info, encoder) for objective in objectives]
    out = {}
    for pipe in pipes:
        pipe.dit.to(_common.DEVICE)
        pipe.vqvae.to(_common.DEVICE)
        out[f"mmdit {pipe.dit.cfg.objective}"] = pipe
    if with_diffusers and "mmdit flow" in out:
        flow = out["mmdit flow"]
        torch.manual_seed(0)
        out[f"diffusers {peer(mode)}"] = TextToImagePipeline(DiffusersDiT(flow.dit.cfg).to(_common.DEVICE), flow.vqvae,
                                                            flow.info, flow.text_encoder)
    return out


def notes(rows: list[dict], mode: str) -> None:
    """Ratios between this mode's rows: mmdit flow vs its diffusers peer, masked vs flow (images/s)."""
    by_impl = {r["impl"]: r for r in rows if r["mode"] == mode}
    flow, masked, other = by_impl.get("mmdit flow"), by_impl.get("mmdit masked"), by_impl.get(f"diffusers {peer(mode)}")
    if flow and other:
        flow["note"] = f"x{flow['images/s'] / other['images/s']:.2f} vs {peer(mode)}"
    if flow and masked:
        masked["note"] = f"x{masked['images/s'] / flow['images/s']:.2f} vs flow"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None, help="comma list of exported run directories (default: random "
                   "matched-config DiTs)")
    p.add_argument("--mode", default="cross,joint", help="comma list of: cross, joint")
    p.add_argument("--objective", default="flow", help="without --run, comma list of: flow, masked")
    p.add_argument("--num-images", type=int, default=8, help="prompts per pipeline call (one batch)")
    p.add_argument("--steps", type=int, default=None, help="default: each run's (flow 25, masked 12)")
    p.add_argument("--guidance", type=float, default=None, help="default: each run's (flow 4, masked 2); any "
                   "value but 1 costs the same: a batch of 2 x images")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="bf16: the calls run under autocast")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    p.add_argument("--reps", type=int, default=2, help="timed calls per pipeline (median)")
    p.add_argument("--no-diffusers", action="store_true", help="time mmdit alone")
    a = p.parse_args()
    if not set(a.mode.split(",")) <= {"cross", "joint"}:
        p.error(f"--mode={a.mode!r}; accepted: a comma list of cross, joint")
    if not set(a.objective.split(",")) <= {"flow", "masked"}:
        p.error(f"--objective={a.objective!r}; accepted: a comma list of flow, masked")
    set_threads(a.threads)
    device = set_device(a.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.dtype == "bf16")
    prompts = load_config(DEFAULT_CONFIG).dit_train.sample_prompts
    prompts = [prompts[i % len(prompts)] for i in range(a.num_images)]
    rows = []
    for mode in a.mode.split(","):
        pipes = pipelines(a.run.split(",") if a.run else [], mode, a.objective.split(","), not a.no_diffusers)
        if not pipes:
            continue
        for pipe in pipes.values():  # warm-up: first-call allocations, text encoder load
            with autocast:
                pipe(prompts, num_steps=1, guidance_scale=a.guidance)

        def call(pipe):
            with autocast:
                return pipe(prompts, num_steps=a.steps, guidance_scale=a.guidance)
        calls = {name: functools.partial(call, pipe) for name, pipe in pipes.items()}
        start = time.perf_counter()
        seconds = interleaved(calls, a.reps, warmup=0)
        for name, sec in seconds.items():
            cfg = pipes[name].dit.cfg
            rows.append({"mode": mode, "impl": name, "width": cfg.width, "depth": cfg.depth,
                         "steps": pipes[name].options(num_steps=a.steps).steps, "images": a.num_images,
                         "s/call": sec, "images/s": a.num_images / sec})
        notes(rows, mode)
        print(table(rows[-len(seconds):], ["mode", "impl", "steps", "s/call", "images/s"]),
              f"({time.perf_counter() - start:.0f}s)", flush=True)
    print(f"\n# bench_sample: {machine()}; {a.dtype}; CFG {a.guidance or 'default'} (batch 2 x images), "
          f"{'runs ' + a.run if a.run else 'random matched-config DiTs'}; median of {a.reps} interleaved calls")
    print(table(rows, ["mode", "impl", "width", "depth", "steps", "images", "s/call", "images/s", "note"]))


if __name__ == "__main__":
    main()
