"""Benchmark sampling: images/s of the whole text -> image pipeline (text encoder, 25 Euler steps with
classifier-free guidance, VQ-VAE decode), mmdit's DiT against the same loop around diffusers' transformer.

    python bench/bench_sample.py [--run RUN_DIR] [--mode cross,joint] [--num-images 8] [--steps 25]
                                 [--device cpu|cuda] [--dtype fp32|bf16] [--threads 1] [--reps 2]
                                 [--no-diffusers]

Without --run: a DiT with random weights at the speed issue's matched config (width 256, depth 6, heads 4,
8x8x8 latents, patch 1, 16 tokens of dim 384), in both modes, with the VQ-VAE of runs/shapes when it is
there (else a random one of the default config). With --run: that exported pipeline. Either way the
diffusers peer (PixArt for cross, SD3 for joint) is built at the DiT's config and driven by the very same
TextToImagePipeline.generate loop, so only the transformer differs; the two are timed interleaved.
--device cuda puts the DiT and VQ-VAE on the GPU (the text encoder stays on the CPU); --dtype bf16 runs the
calls under autocast.
"""
from __future__ import annotations

import argparse
import functools
import json
import time
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


def pipelines(run: str | None, mode: str, with_diffusers: bool) -> dict[str, TextToImagePipeline]:
    if run:
        pipe = TextToImagePipeline.from_pretrained(run)
        if pipe.dit.cfg.mode != mode:
            return {}
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
        matched = next(s for s in settings(mode) if s.name == "matched")
        pipe = TextToImagePipeline(build("mmdit", matched.cfg), vqvae, info,
                                   TextEncoder(info.text_encoder, max_length=info.max_length))
    pipe.dit.to(_common.DEVICE)
    pipe.vqvae.to(_common.DEVICE)
    out = {"mmdit": pipe}
    if with_diffusers:
        torch.manual_seed(0)
        out[f"diffusers {peer(mode)}"] = TextToImagePipeline(DiffusersDiT(pipe.dit.cfg).to(_common.DEVICE), pipe.vqvae,
                                                            pipe.info,
                                                            pipe.text_encoder)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None, help="an exported run directory (default: random matched-config DiT)")
    p.add_argument("--mode", default="cross,joint", help="comma list of: cross, joint")
    p.add_argument("--num-images", type=int, default=8, help="prompts per pipeline call (one batch)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="bf16: the calls run under autocast")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    p.add_argument("--reps", type=int, default=2, help="timed calls per pipeline (median)")
    p.add_argument("--no-diffusers", action="store_true", help="time mmdit alone")
    a = p.parse_args()
    if not set(a.mode.split(",")) <= {"cross", "joint"}:
        p.error(f"--mode={a.mode!r}; accepted: a comma list of cross, joint")
    set_threads(a.threads)
    device = set_device(a.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.dtype == "bf16")
    prompts = load_config(DEFAULT_CONFIG).dit_train.sample_prompts
    prompts = [prompts[i % len(prompts)] for i in range(a.num_images)]
    rows = []
    for mode in a.mode.split(","):
        pipes = pipelines(a.run, mode, not a.no_diffusers)
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
                         "images": a.num_images, "s/call": sec, "images/s": a.num_images / sec})
        if len(seconds) == 2:
            rows[-2]["note"] = f"x{seconds[rows[-1]['impl']] / seconds['mmdit']:.2f} vs {peer(mode)}"
        print(table(rows[-len(seconds):], ["mode", "impl", "s/call", "images/s"]),
              f"({time.perf_counter() - start:.0f}s)", flush=True)
    print(f"\n# bench_sample: {machine()}; {a.dtype}; {a.steps} Euler steps, CFG {a.guidance} (batch 2 x images), "
          f"{'run ' + a.run if a.run else 'random matched-config DiT'}; median of {a.reps} interleaved calls")
    print(table(rows, ["mode", "impl", "width", "depth", "images", "s/call", "images/s", "note"]))


if __name__ == "__main__":
    main()
