"""Benchmark the time a DiT training step spends outside the model: batch assembly from the latent and
caption caches, the loss's per-t statistics, EMA and loop bookkeeping, logging, and the amortised cost
of the periodic sample grids and checkpoints.

    python bench/bench_data.py [--run runs/shapes] [--steps 100] [--threads 1] [section.key=value ...]

Runs the real DiT stage (train/train.py, train.stage=dit, the embedded default config plus overrides) for
`--steps` steps in a temporary output directory holding a copy of the run's VQ-VAE and latent cache, and
times each part of trainer.fit's loop with wrappers around what fit calls: get_batch, loss_fn (and hooks
on the DiT's forward), accelerator.backward, accelerator.clip_grad_norm_, the optimizer's step,
accelerator.log, on_image and Checkpoints.save. Model = DiT forward + backward + clip + optimizer step;
everything else in a step is outside. Logs, grids and checkpoints are charged per step at the config's
log_every, image_every and checkpoint_every. The stage stops after fit: no export.
"""
from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from _common import DEFAULT_CONFIG, machine, table, train

import mmdit.stages.dit as dit_stage
from mmdit import trainer
from mmdit.checkpoints import Checkpoints
from mmdit.config import load_config

REPO = Path(__file__).resolve().parent.parent


class Timers:
    """Wall seconds per named part, per step (`mark_step` starts a new one), plus per-call lists."""

    def __init__(self):
        self.steps: list[dict[str, float]] = []
        self.calls: dict[str, list[float]] = defaultdict(list)
        self.step_starts: list[float] = []

    def mark_step(self):
        self.step_starts.append(time.perf_counter())
        self.steps.append(defaultdict(float))

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sec = time.perf_counter() - start
                self.calls[name].append(sec)
                if self.steps:
                    self.steps[-1][name] += sec
        return timed


class _Done(Exception):
    """Raised after fit to skip the stage's export: only the loop is measured."""


def instrumented_fit(timers: Timers):
    real_fit = trainer.fit

    def fit(accelerator, name, model, cfg, get_batch, loss_fn, out_dir, on_image=None, **kwargs):
        def batch(*args):
            timers.mark_step()
            return timers.wrap("batch", get_batch)(*args)

        forward_start = []
        model.register_forward_pre_hook(lambda *_: forward_start.append(time.perf_counter()))
        model.register_forward_hook(lambda *_: timers.steps[-1].__setitem__(
            "forward", timers.steps[-1]["forward"] + time.perf_counter() - forward_start.pop()))
        accelerator.backward = timers.wrap("backward", accelerator.backward)
        accelerator.clip_grad_norm_ = timers.wrap("clip", accelerator.clip_grad_norm_)
        accelerator.log = timers.wrap("log", accelerator.log)
        prepare = accelerator.prepare

        def prepare_and_wrap(*objs):
            out = prepare(*objs)
            for o in out:
                if isinstance(o, torch.optim.Optimizer):
                    o.step = timers.wrap("optimizer", o.step)
            return out
        accelerator.prepare = prepare_and_wrap
        real_fit(accelerator, name, model, cfg, batch, timers.wrap("loss_fn", loss_fn), out_dir,
                 timers.wrap("images", on_image) if on_image else None, **kwargs)
        raise _Done
    return fit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=str(REPO / "runs" / "shapes"), help="a run with vqvae/model and latents/")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="train.cpu_threads (1 on a shared machine)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of configs/shapes.yaml")
    a = p.parse_args()
    run = Path(a.run)
    for need in (run / "vqvae" / "model", run / "latents"):
        if not need.is_dir():
            p.error(f"--run {run}: {need} is missing; accepted: a run directory where the vqvae stage has run "
                    "(accelerate launch train/train.py)")
    timers = Timers()
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(run / "vqvae" / "model", Path(tmp) / "vqvae" / "model")
        shutil.copytree(run / "latents", Path(tmp) / "latents")
        overrides = [f"data.path={REPO / 'data' / 'shapes'}", f"train.cache_dir={REPO / '.cache' / 'mmdit'}",
                     *a.overrides, "train.stage=dit", f"train.output_dir={tmp}", f"dit_train.steps={a.steps}",
                     f"train.cpu_threads={a.threads}", "train.resume=never"]
        cfg = load_config(DEFAULT_CONFIG, overrides)
        dit_stage.fit = instrumented_fit(timers)
        save = Checkpoints.save
        Checkpoints.save = timers.wrap("checkpoint", save)
        try:
            train(DEFAULT_CONFIG, overrides)
        except _Done:
            pass
        finally:
            Checkpoints.save = save
        checkpoint_seconds = statistics.median(timers.calls["checkpoint"]) if timers.calls["checkpoint"] else 0.0

    # Step i runs from its get_batch to the next one; the first 2 (warm-up) and the last (final grid and
    # checkpoint, charged separately) are left out.
    tc = cfg.dit_train
    starts, steps = timers.step_starts[2:], timers.steps[2:-1]
    walls = [b - s for s, b in itertools.pairwise(starts)]
    parts = {k: statistics.mean(s.get(k, 0.0) for s in steps) for k in
             ("batch", "forward", "loss_fn", "backward", "clip", "optimizer")}
    per_call = {k: statistics.median(v) for k, v in timers.calls.items() if v}
    log_cost = per_call.get("log", 0.0) / tc.log_every
    in_loop_logs = statistics.mean(s.get("log", 0.0) for s in steps)
    rows = [
        ("model: DiT forward", parts["forward"]),
        ("model: backward", parts["backward"]),
        ("model: grad clip", parts["clip"]),
        ("model: optimizer step", parts["optimizer"]),
        ("outside: batch from caches", parts["batch"]),
        ("outside: loss + per-t stats", parts["loss_fn"] - parts["forward"]),
        ("outside: EMA, lr, bookkeeping", statistics.mean(walls) - sum(parts.values()) + parts["forward"]
         - in_loop_logs),
        (f"outside: logging (1 in {tc.log_every})", log_cost),
        (f"outside: sample grid (1 in {tc.image_every})", per_call.get("images", 0.0) / tc.image_every),
        (f"outside: checkpoint (1 in {tc.checkpoint_every})", checkpoint_seconds / tc.checkpoint_every),
    ]
    total = sum(sec for _, sec in rows)
    outside = sum(sec for name, sec in rows if name.startswith("outside"))
    print(f"\n# bench_data: {machine()}; dit stage, {cfg.dit.mode} width {cfg.dit.width} depth {cfg.dit.depth}, "
          f"batch {tc.batch_size}, mean of {len(walls)} steps (median step {1e3 * statistics.median(walls):.0f} ms)")
    print(table([{"part": n, "ms/step": 1e3 * s, "%": 100 * s / total} for n, s in rows]
                + [{"part": "outside the model, total", "ms/step": 1e3 * outside, "%": 100 * outside / total}],
                ["part", "ms/step", "%"]))


if __name__ == "__main__":
    main()
