"""The training loop both stages share: AdamW with warmup + cosine, grad clipping, gradient accumulation,
mixed precision, tensorboard scalars, a progress bar, periodic image grids, atomic checkpoints, exact
resume, a guard against non-finite steps, and a clean stop on SIGTERM / SIGINT.

A stage supplies only what differs: the model, a `loss_fn(model, batch) -> (loss, logs)`, a
`get_batch(step, slot, num_slots)` that is a pure function of its arguments (so a resumed run sees
exactly the batches it would have seen; `slot` numbers this process's accumulation micro-batch among all
of the step's, `num_slots` = processes x accumulation steps), and optionally `on_image(step, model)` (on the main
process, with the model's whole weights) / an EMA model / a `data_state` (a streamed dataset's position:
`state_dict()` / `load_state_dict()`, JSON-able). Under FSDP the loop gathers whole weights where it needs
them (mmdit/fsdp.py); the stage code is the same.

What makes a resumed run bitwise equal to an uninterrupted one: the checkpoint holds the model, the
optimizer, the grad scaler, every RNG (accelerate's save_state), the EMA weights and the step; the
learning rate and the data order are pure functions of the step.
"""
from __future__ import annotations

import copy
import ctypes
import dataclasses
import itertools
import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, NoReturn

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from mmdit import compat, fsdp, precision
from mmdit.checkpoints import Checkpoints
from mmdit.config import StageConfig
from mmdit.weights import atomic_write

log = get_logger("mmdit.train")
# The exit code of a run stopped by SIGTERM / SIGINT after checkpointing: not done, resumable (EX_TEMPFAIL), so
# a scheduler does not take it for a finished job.
STOPPED_RESUMABLE = 75


def lr_factor(step: int, cfg: StageConfig) -> float:
    """The learning rate of step `step` (0-based) as a fraction of the peak: linear warmup over the first
    `warmup_steps` steps, then constant or a cosine that reaches 0 just after the last step (which itself
    still learns)."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    if cfg.schedule == "constant":
        return warm
    progress = max(0, step - cfg.warmup_steps + 1) / (max(1, cfg.steps - cfg.warmup_steps) + 1)  # cosine
    return warm * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def stop_with_parent() -> None:
    """Have Linux send this process SIGTERM when its parent dies. A launcher (accelerate launch, torchrun) sent
    SIGTERM by a scheduler exits at once; without this its worker trains on, orphaned, and collides with the
    rerun. The SIGTERM then takes StopSignal's path: finish the step, checkpoint, stop."""
    if not os.uname().sysname == "Linux":
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the call took effect
        os.kill(os.getpid(), signal.SIGTERM)


class StopSignal:
    """SIGTERM / SIGINT during training: finish the current step, checkpoint, exit STOPPED_RESUMABLE. A second Ctrl-C
    aborts at once (the checkpoints on disk stay intact); a SIGTERM after a SIGINT (what a launcher sends
    to its workers) changes nothing."""

    def __init__(self, accelerator: Accelerator):
        self.received: str | None = None
        self.group = None
        if accelerator.num_processes > 1 and dist.is_initialized():
            # Processes must agree to stop after the same step. The flag goes through a gloo (CPU) group,
            # so agreeing every step costs a few microseconds of network, never a GPU sync.
            self.group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    def __enter__(self) -> "StopSignal":
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def requested(self) -> str | None:
        if self.group is None:
            return self.received
        flag = torch.tensor([self.received is not None], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return (self.received or "a signal to another process") if flag.item() else None


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class BadSteps:
    """Counts steps skipped for a non-finite loss or gradient without a host sync per step: the flags stay
    on the device and are read at log and checkpoint steps, which sync anyway."""

    def __init__(self, window: int, device: torch.device, start: int):
        self.flags = torch.zeros(window, dtype=torch.bool, device=device)  # step % window -> skipped
        self.run = torch.zeros((), dtype=torch.long, device=device)  # current streak of skipped steps
        self.longest = torch.zeros((), dtype=torch.long, device=device)  # longest streak since the last read
        self.total, self.last_read = 0, start

    def record(self, step: int, bad: torch.Tensor) -> None:
        self.flags[step % len(self.flags)] = bad
        self.run = (self.run + 1) * bad
        self.longest = torch.maximum(self.longest, self.run)

    def read(self, done: int) -> tuple[list[int], int]:
        """-> (the skipped steps since the last read, the longest streak of skipped steps in that time)."""
        flags = self.flags.tolist()
        skipped = [s for s in range(self.last_read, done) if flags[s % len(flags)]]
        longest = int(self.longest)
        self.flags.zero_()
        self.longest = self.run.clone()
        self.total += len(skipped)
        self.last_read = done
        return skipped, longest


def train_step(accelerator: Accelerator, model: torch.nn.Module, optimizer, micro_batches: Iterable, loss_fn: Callable,
               mixed_precision: str, grad_clip: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """One optimizer step: forward + backward over the micro-batches (gradients all-reduced after the last one),
    clipping, and an AdamW step that is skipped, on the device, when the loss or the gradient is not finite on
    any process. -> (the micro-batches' summed loss, the gradient norm, skipped (bool tensor), the last logs)."""
    loss_sum = torch.zeros((), device=accelerator.device)
    for batch in micro_batches:
        with accelerator.accumulate(model):  # no gradient all-reduce until the last micro-batch
            with precision.autocast(accelerator.device, mixed_precision):
                loss, logs = loss_fn(model, batch)
            accelerator.backward(loss)
        loss_sum += loss.detach().float()
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    if isinstance(grad_norm, DTensor):
        grad_norm = grad_norm.full_tensor()
    bad = ~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))
    if accelerator.num_processes > 1:  # one verdict: a step skipped by some processes only would split the weights
        bad = accelerator.reduce(bad.int(), "sum") > 0
    compat.skip_step_if(optimizer, bad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm, bad, logs


@torch.no_grad()  # else each update would extend an autograd graph through the EMA
def ema_update(ema: list[torch.Tensor], live: list[torch.Tensor], step: int, decay: float, bad: torch.Tensor) -> None:
    """ema <- lerp towards the live weights; a short warmup so early EMA weights are not mostly the random init,
    and no move at all on a skipped step."""
    weight = (1 - min(decay, (1 + step) / (10 + step))) * (~bad).float()
    torch._foreach_lerp_(ema, live, [weight] * len(ema))


def all_finite(accelerator: Accelerator, modules: list[torch.nn.Module]) -> bool:
    """Every floating-point tensor of the modules' state dicts finite, on every process (a collective). Not the
    non-persistent buffers: derived, never saved, and some legitimately infinite (attention masks)."""
    tensors = [t for m in modules for t in fsdp.local(list(m.state_dict().values())) if t.is_floating_point()]
    ok = torch.stack([torch.isfinite(t).all() for t in tensors]).all().int().to(accelerator.device)
    return int(accelerator.reduce(ok, "sum") if accelerator.num_processes > 1 else ok) == accelerator.num_processes


def choose_precision(accelerator: Accelerator, name: str, requested: str, recorded: str | None, model, loss_fn,
                     batch, out_dir: Path) -> str:
    """The stage's precision: the checkpoint's when resuming under "auto", else forced or measured (see
    mmdit/precision.py); the same on every process, and written to `out_dir/precision.json`."""
    resolved, seconds = precision.resolve(requested, accelerator.device), None
    if recorded and requested == "auto":
        resolved = recorded
    elif recorded and recorded != resolved:
        log.warning(f"{name}: the checkpoint trained in {recorded}; continuing in {resolved} "
                    f"(train.mixed_precision={requested})")
    if resolved == "measure":
        seconds = precision.measure(model, loss_fn, batch, accelerator.device)
        resolved = min(seconds, key=seconds.get)
        resolved, seconds = broadcast_object_list([resolved, seconds])  # the main process's timing decides
        log.info(f"{name}: mixed precision {resolved}, measured on the first batch: "
                 + ", ".join(f"{'fp32' if p == 'no' else p} {s * 1e3:.1f} ms/step" for p, s in seconds.items()))
    elif not recorded:
        log.info(f"{name}: mixed precision {resolved} (train.mixed_precision={requested})")
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(out_dir / "precision.json", json.dumps(
            {"mixed_precision": resolved, "requested": requested, "seconds_per_step": seconds}, indent=2).encode())
    return resolved


class Due(NamedTuple):
    """What the loop does after an optimizer step, besides training: the one place these decisions are made."""
    log: bool  # scalars to tensorboard and the bar, validation, and the bad-step check
    image: bool  # a sample grid (the stage's on_image)
    checkpoint: bool
    stop: str | None  # the signal that asked to stop, if one did


def due(done: int, cfg: StageConfig, stop: str | None, has_images: bool) -> Due:
    last = done == cfg.steps
    return Due(log=done % cfg.log_every == 0 or last, image=has_images and (done % cfg.image_every == 0 or last),
               checkpoint=done % cfg.checkpoint_every == 0 or last or stop is not None, stop=stop)


class Weights:
    """The weights of a run being trained, and where they live: the prepared (DDP / FSDP) model and its
    optimizer, a plain module with the whole weights (`plain`, what grids and the export see), the EMA, and the
    checkpoints of all of it. Under FSDP the whole weights are gathered from the shards on demand (mmdit/fsdp.py)."""

    def __init__(self, accelerator: Accelerator, name: str, model: torch.nn.Module, cfg: StageConfig, out_dir: Path,
                 ema: torch.nn.Module | None, data_state):
        self.accelerator, self.name, self.cfg, self.ema = accelerator, name, cfg, ema
        params = [p for p in model.parameters() if p.requires_grad]
        # Fused AdamW: one kernel for all parameters, and it takes `found_inf`, which skips a step on the
        # device when the gradient is not finite: the NaN guard needs no host sync.
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                      fused=True)
        accelerator.free_memory()  # forget earlier stages' objects: a checkpoint holds this stage's alone
        accelerator.gradient_accumulation_steps = cfg.gradient_accumulation_steps
        self.sharded = fsdp.is_fsdp(accelerator)
        if self.sharded:  # a plain copy, made before sharding, to hold the whole weights when they are gathered
            log.info(f"{name}: FSDP over {accelerator.num_processes} processes, "
                     f"{fsdp.set_wrap_classes(accelerator, model)}")
            whole = copy.deepcopy(model).to(accelerator.device)
        # No scheduler object: the learning rate is set from the step (exact on resume, and accelerate's
        # prepared scheduler would step once per process per optimizer step).
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.plain = whole if self.sharded else accelerator.unwrap_model(self.model)
        self.checkpoints = Checkpoints(out_dir / "checkpoints", cfg.keep_checkpoints, name, self.plain, ema,
                                       data_state, (self.model, self.optimizer.optimizer) if self.sharded else None,
                                       dataclasses.asdict(cfg))
        self.live = list(self.model.parameters())  # shards (DTensors) under FSDP

    def resume(self, resume: str) -> int:
        """Load the checkpoint `resume` names (see Checkpoints.resume) -> the step to start from. Then split the
        EMA like the parameters: after loading, so the shards hold the resumed EMA, not the initial one."""
        start = self.checkpoints.resume(self.accelerator, resume)
        if self.ema is not None:  # updated where the parameters are: whole tensors, or each process's shards
            self.ema.requires_grad_(False)
            ema = list(self.ema.parameters())
            self.ema_params = fsdp.shard_like(ema, self.live) if self.sharded else ema
            self.ema_local, self.live_local = fsdp.local(self.ema_params), fsdp.local(self.live)
        return start

    def update_ema(self, step: int, decay: float, bad: torch.Tensor) -> None:
        if self.ema is not None:
            ema_update(self.ema_local, self.live_local, step, decay, bad)

    def gather(self, with_model: bool) -> None:
        """Under FSDP, whole weights into the EMA (and `plain`) from the shards: all processes, same step."""
        if self.sharded and self.ema is not None:
            fsdp.gather_into(self.ema, self.ema_params)
        if self.sharded and with_model:
            fsdp.gather_into(self.plain, self.live, list(self.model.buffers()))

    def save(self, done: int) -> Path:
        """A checkpoint (after `gather`), unless the weights went non-finite (a finite gradient can still make them
        so, e.g. at a huge learning rate): such weights must never become what a resume picks up."""
        if not all_finite(self.accelerator, [self.model] + ([self.ema] if self.ema is not None else [])):
            last = self.checkpoints.all()[-1] if self.checkpoints.all() else None
            self.accelerator.end_training()
            raise TrainingDiverged(f"{self.name}: the weights became non-finite by step {done}; not checkpointed. The "
                                   f"last good weights are in {last or 'no checkpoint yet'}; lower {self.cfg.section}.lr "
                                   "or check the data, then rerun to resume")
        return self.checkpoints.save(self.accelerator, done)


def check_bad_steps(weights: Weights, bad_steps: BadSteps, done: int) -> None:
    """Warn of the steps skipped since the last check; stop, checkpointed, after too many in a row."""
    name, cfg = weights.name, weights.cfg
    skipped, streak = bad_steps.read(done)
    if skipped:
        log.warning(f"{name}: skipped {len(skipped)} step(s) with a non-finite loss or gradient (weights unchanged): "
                    f"{skipped[:10]}{' ...' if len(skipped) > 10 else ''}; {bad_steps.total} so far")
    if streak >= cfg.max_bad_steps:
        weights.gather(with_model=False)
        path = weights.save(done)
        weights.accelerator.end_training()
        raise TrainingDiverged(f"{name}: {streak} consecutive steps with a non-finite loss or gradient (up to step "
                               f"{done}; {cfg.section}.max_bad_steps={cfg.max_bad_steps}); stopped. The last good "
                               f"weights are in {path}; lower {cfg.section}.lr or check the data, then rerun to resume")


@torch.no_grad()
def validation_logs(weights: Weights, validate: Callable, mixed_precision: str) -> dict:
    """The stage's validation (e.g. the loss on held-out latents) on the live weights, on every process (under
    FSDP the forward needs them all), in eval mode."""
    model = weights.model
    model.eval()
    with precision.autocast(weights.accelerator.device, mixed_precision):
        logs = validate(model)
    model.train()
    return logs


class StepLog:
    """A log step's scalars, under `<name>/` in tensorboard and on the bar: what the loop measured, the samples
    per second since the previous log step, the stage's validation (`val_*`) and its extras (`log_extra`)."""

    def __init__(self, weights: Weights, bar, samples_per_step: int, start: int, validate: Callable | None,
                 log_extra: Callable[[int], dict] | None):
        self.weights, self.bar, self.samples_per_step = weights, bar, samples_per_step
        self.validate, self.log_extra = validate, log_extra
        self.tick, self.tick_step = time.perf_counter(), start

    def __call__(self, done: int, scalars: dict, mixed_precision: str) -> None:
        seconds = time.perf_counter() - self.tick
        scalars["samples_per_s"] = (done - self.tick_step) * self.samples_per_step / seconds
        if self.validate is not None:
            logs = validation_logs(self.weights, self.validate, mixed_precision)
            scalars.update({f"val_{k}": v for k, v in logs.items()})
        scalars.update(self.log_extra(done) if self.log_extra is not None else {})
        self.weights.accelerator.log({f"{self.weights.name}/{k}": float(v) for k, v in scalars.items()}, step=done)
        self.bar.set_postfix(loss=f"{scalars['loss']:.4f}", refresh=False)
        self.tick, self.tick_step = time.perf_counter(), done  # validation's time is not the steps'


def exit_resumable(accelerator: Accelerator, why: str) -> NoReturn:
    """After a stop signal's checkpoint: end, with the exit code that says 'not done, run again to resume'."""
    log.warning(f"{why}. Run the same command again to resume (exit code {STOPPED_RESUMABLE})")
    accelerator.end_training()
    raise SystemExit(STOPPED_RESUMABLE)


def fit(accelerator: Accelerator, name: str, model: torch.nn.Module, cfg: StageConfig,
        get_batch: Callable[[int, int, int], object],
        loss_fn: Callable[[torch.nn.Module, object], tuple[torch.Tensor, dict]], out_dir: Path,
        on_image: Callable[[int, torch.nn.Module], None] | None = None, ema: torch.nn.Module | None = None,
        ema_decay: float = 0.999, resume: str = "auto", data_state=None, mixed_precision: str = "no",
        after_step: Callable[[torch.nn.Module, bool], None] | None = None,
        validate: Callable[[torch.nn.Module], dict] | None = None,
        log_extra: Callable[[int], dict] | None = None) -> torch.nn.Module:
    """Train `model` for `cfg.steps` optimizer steps, resuming from `out_dir/checkpoints` as `resume` says
    (see Checkpoints.resume); returns the model as a plain module with its whole weights. `ema`, a copy
    of the model, tracks an exponential moving average of its weights. `mixed_precision`: see
    mmdit/precision.py. `after_step(model, skipped)` runs after each optimizer step on every process with the
    live (unwrapped) model, e.g. for state the optimizer does not own (the VQ-VAE's codebook). `validate(model)`
    runs at log steps on every process and returns scalars to log under `<name>/val_*`; `log_extra(step)` too (it
    may be a collective), its scalars logged under `<name>/`."""
    weights = Weights(accelerator, name, model, cfg, out_dir, ema, data_state)
    model, optimizer, checkpoints = weights.model, weights.optimizer, weights.checkpoints
    start = weights.resume(resume)
    bad_steps = BadSteps(cfg.log_every, accelerator.device, start)
    compat.restart_accumulation(accelerator)
    if start:
        log.info(f"{name}: resumed from step {start}")
    model.train()
    accum = cfg.gradient_accumulation_steps
    slots = accelerator.num_processes * accum  # every micro-batch of a step, over all processes
    first_slot = accelerator.process_index * accum
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=name,
               disable=not accelerator.is_local_main_process, mininterval=1.0)
    step_log, chosen = StepLog(weights, bar, cfg.batch_size * slots, start, validate, log_extra), None
    with StopSignal(accelerator) as stop:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, cfg)
            micro_batches = (get_batch(step, first_slot + m, slots) for m in range(accum))
            if chosen is None:  # on the first batch, which the step then trains on (a stream is read once)
                first = next(micro_batches)
                chosen = choose_precision(accelerator, name, mixed_precision, checkpoints.precision, weights.plain,
                                          loss_fn, first, out_dir)
                checkpoints.precision = chosen
                micro_batches = itertools.chain([first], micro_batches)
            loss_sum, grad_norm, bad, logs = train_step(accelerator, model, optimizer, micro_batches, loss_fn, chosen,
                                                        cfg.grad_clip)
            if after_step is not None:
                after_step(accelerator.unwrap_model(model), bad)
            weights.update_ema(step, ema_decay, bad)
            bad_steps.record(step, bad)
            done = step + 1
            now = due(done, cfg, stop.requested(), on_image is not None)
            if now.log or now.checkpoint:
                check_bad_steps(weights, bad_steps, done)
            if now.log:  # the only host syncs of the loop: .item() on log and checkpoint steps
                step_log(done, {**logs, "loss": loss_sum.item() / accum, "grad_norm": grad_norm,
                                "lr": optimizer.param_groups[0]["lr"], "bad_steps": bad_steps.total}, chosen)
            if now.image or now.checkpoint:
                weights.gather(with_model=now.image)
            if now.image and accelerator.is_main_process:
                on_image(done, weights.plain)
            if now.checkpoint:
                path = weights.save(done)
            if now.stop:
                bar.close()
                exit_resumable(accelerator, f"{name}: stopped by {now.stop} after step {done}; checkpoint {path}")
    if cfg.steps > start and bad_steps.total == cfg.steps - start:  # shorter than max_bad_steps, all of it bad
        raise TrainingDiverged(f"{name}: every step ({start + 1} to {cfg.steps}) had a non-finite loss or gradient; "
                               f"nothing was learned or exported; lower {cfg.section}.lr or check the data")
    weights.gather(with_model=True)
    return weights.plain
