"""Checkpoints of a training stage: written atomically, checksummed, resumed from the newest one that loads.

`<stage>/checkpoints/step-00001000/` holds accelerate's save_state (model as safetensors, optimizer, grad scaler
and RNG states as torch pickles, read back with weights_only=True; under FSDP the whole model and optimizer as
safetensors, see mmdit/fsdp.py), `ema.safetensors`, one `data_state_<rank>.json` per process for streamed
data, and `step.json`, written last, which marks the checkpoint complete and records the step, the mixed
precision, the stage's settings and a SHA-256 of every other file. A checkpoint is written into `.tmp-step-*`
and renamed into place when every process has finished writing, so a kill at any moment (also mid-save) leaves
the previous checkpoints intact; a full disk removes the partial one and stops in one line.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import load as load_pickled
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mmdit import fsdp
from mmdit.weights import check_shapes, cpu_state

log = get_logger("mmdit.train")
# Model settings a resumed run may change: they change how the model is computed, not what it computes.
RESUMABLE_MODEL_CHANGES = {"grad_checkpointing"}


class CheckpointError(RuntimeError):
    """Checkpoints exist but none can be loaded, or the one asked for cannot be."""


def checkpoint_stage(path: str | Path) -> str:
    """The stage ("vqvae", "dit") a checkpoint directory belongs to; ValueError if it is not one."""
    path = Path(path)
    if not (path / "step.json").is_file():
        raise ValueError(f"{path} is not a checkpoint directory (no step.json); "
                         "accepted: auto, never, or a directory like <output_dir>/dit/checkpoints/step-00000500")
    return json.loads((path / "step.json").read_text()).get("stage", path.parent.parent.name)


class DiskFull(RuntimeError):
    """No space left for a checkpoint; the partial one was removed."""


def _one_line(e: BaseException) -> str:
    if "Weights only load failed" in str(e):  # torch's text goes on to suggest unpickling anyway: never
        return f"{type(e).__name__}: not a plain-tensor file (refused: nothing beyond tensors is unpickled)"
    return f"{type(e).__name__}: {next((line.strip() for line in str(e).splitlines() if line.strip()), '')}"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_partial_saves(root: Path) -> list[Path]:
    """Delete what interrupted saves left under `root` (`.tmp-step-*`, never complete, never loaded): after a
    full disk, they are what keeps it full."""
    partial = sorted(Path(root).rglob(".tmp-step-*"))
    for path in partial:
        log.warning(f"removing {path}: an interrupted save, never completed")
        shutil.rmtree(path, ignore_errors=True)
    return partial


def settings_changes(old: dict, new: dict, prefix: str) -> list[str]:
    return [f"{prefix}{k}: {old[k]!r} -> {new.get(k)!r}" for k in old if k in new and old[k] != new[k]]


class Checkpoints:
    """A stage's checkpoints (see the module docstring). `settings` (the stage's config, JSON-able) and the
    model's `cfg` are recorded and compared on resume: stage settings may change (logged), model settings not
    (refused), except those in RESUMABLE_MODEL_CHANGES."""

    def __init__(self, directory: Path, keep: int, stage: str = "", model: torch.nn.Module | None = None,
                 ema: torch.nn.Module | None = None, data_state=None, sharded: tuple | None = None,
                 settings: dict | None = None):
        self.dir, self.keep, self.stage = Path(directory), keep, stage
        self.model, self.ema, self.data_state = model, ema, data_state  # model: unwrapped, for a shape check
        self.sharded = sharded  # under FSDP: (the prepared model, the torch optimizer), saved by mmdit.fsdp
        self.precision: str | None = None  # the stage's mixed precision: recorded with each checkpoint, read back
        self.settings = settings or {}
        cfg = getattr(model, "cfg", None)
        self.model_settings = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else {}

    def all(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("step-*") if (p / "step.json").is_file())

    def save(self, accelerator: Accelerator, step: int) -> Path:
        final = self.dir / f"step-{step:08d}"
        tmp = self.dir / f".tmp-step-{step:08d}"
        if accelerator.is_main_process:
            remove_partial_saves(self.dir)
        accelerator.wait_for_everyone()
        try:
            self._write(accelerator, step, tmp)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            self._raise_if_disk_full(e)
            raise
        if accelerator.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self.all()[:-self.keep] if self.keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    def _write(self, accelerator: Accelerator, step: int, tmp: Path) -> None:
        if self.sharded:
            fsdp.save_state(accelerator, *self.sharded, tmp)
        else:
            accelerator.save_state(str(tmp), safe_serialization=True)
        if self.data_state is not None:
            (tmp / f"data_state_{accelerator.process_index}.json").write_text(json.dumps(self.data_state.state_dict()))
        accelerator.wait_for_everyone()  # every process's files are in `tmp` before it becomes a checkpoint
        if accelerator.is_main_process:
            if self.ema is not None:
                save_file(cpu_state(self.ema), str(tmp / "ema.safetensors"))
            files = {p.name: sha256(p) for p in sorted(tmp.iterdir())}
            (tmp / "step.json").write_text(json.dumps({
                "step": step, "stage": self.stage, "mixed_precision": self.precision, "settings": self.settings,
                "model_settings": self.model_settings, "sha256": files}))

    def _raise_if_disk_full(self, e: Exception) -> None:
        """Whatever the writer says (an OSError, safetensors' or torch's zip writer's own text), a disk without
        room for another checkpoint means one thing to the user."""
        previous = self.all()
        needed = sum(f.stat().st_size for f in previous[-1].iterdir()) if previous else 0
        if self.model is not None and not previous:  # the model, two AdamW moments and an EMA
            needed = 4 * sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        free = shutil.disk_usage(self.dir if self.dir.exists() else self.dir.parent).free
        full = (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e)
        if full or free < needed:
            raise DiskFull(f"{self.stage}: no space left on the device of {self.dir}: a checkpoint needs about "
                           f"{needed / 1e6:.1f} MB, {free / 1e6:.1f} MB are free; the partial checkpoint was removed, "
                           "the earlier ones are intact. Free some space, then rerun to resume") from None

    def load(self, accelerator: Accelerator, path: Path) -> int:
        info = json.loads((path / "step.json").read_text())
        for name, digest in info.get("sha256", {}).items():  # a bit flip on disk must not become the weights
            if not (path / name).is_file() or sha256(path / name) != digest:
                raise ValueError(f"{name} does not match the checksum recorded when it was written (damaged)")
        changed = settings_changes(info.get("model_settings", {}), self.model_settings, "model.")
        refused = [c for c in changed if c.split(":")[0][len("model."):] not in RESUMABLE_MODEL_CHANGES]
        if refused:
            raise ValueError(f"written with other model settings ({'; '.join(refused)}); accepted: the "
                             "checkpoint's model settings, or train.resume=never to start this stage over")
        # accelerate skips an unreadable RNG file with an info line; exact resume needs it, so read it first.
        load_pickled(path / f"random_states_{accelerator.process_index}.pkl")
        if (path / "optimizer.json").is_file() != bool(self.sharded):  # the optimizer's two file formats
            raise ValueError(f"written {'without' if self.sharded else 'with'} FSDP; accepted: resuming it with "
                             f"the kind of launch that wrote it ({'DDP or one process' if self.sharded else 'FSDP'})")
        if self.model is not None:  # one clear line for weights of another config
            with safe_open(str(path / "model.safetensors"), "pt") as f:
                check_shapes({k: f.get_slice(k).get_shape() for k in f.keys()}, self.model.state_dict(),
                             path / "model.safetensors")
        if self.sharded:
            fsdp.load_state(accelerator, *self.sharded, path)
        else:
            accelerator.load_state(str(path))
        if self.ema is not None:
            ema = load_file(str(path / "ema.safetensors"))
            check_shapes({k: v.shape for k, v in ema.items()}, self.ema.state_dict(), path / "ema.safetensors")
            self.ema.load_state_dict(ema)
        if self.data_state is not None:
            self.data_state.load_state_dict(
                json.loads((path / f"data_state_{accelerator.process_index}.json").read_text()))
        self.precision = info.get("mixed_precision")
        for change in settings_changes(info.get("settings", {}), self.settings, f"{self.stage}."):
            log.warning(f"{self.stage}: resuming {path.name} with a changed setting: {change}")
        return info["step"]

    def _load_everywhere(self, accelerator: Accelerator, path: Path) -> tuple[int | None, str]:
        """Load on every process; a checkpoint counts only if it loaded on all of them."""
        try:
            step, error = self.load(accelerator, path), ""
        except Exception as e:  # a damaged checkpoint must not cost the older, good ones
            step, error = None, _one_line(e)
            log.warning(f"{self.stage}: checkpoint {path} failed to load ({error})", main_process_only=False)
        failed = torch.tensor([int(step is None)], device=accelerator.device)
        if accelerator.num_processes > 1:
            failed = accelerator.gather(failed)
        return (None if bool(failed.any()) else step), error

    def set_aside(self, accelerator: Accelerator, paths: list[Path], why: str) -> None:
        """Move checkpoints out of auto-resume's way, never deleting them: to `checkpoints.old-<n>/`."""
        if paths and accelerator.is_main_process:
            aside = next(self.dir.with_name(f"{self.dir.name}.old-{i}") for i in range(1, 10**6)
                         if not self.dir.with_name(f"{self.dir.name}.old-{i}").exists())
            aside.mkdir(parents=True)
            for path in paths:
                os.replace(path, aside / path.name)
            log.warning(f"{self.stage}: {why}: moved the checkpoints {[p.name for p in paths]} to {aside}")
        accelerator.wait_for_everyone()

    def resume(self, accelerator: Accelerator, how: str = "auto") -> int:
        """`how`: "auto" = the newest checkpoint that loads, "never" = start over, or a checkpoint directory
        (of this stage; other stages resume "auto"). Checkpoints this leaves behind (all with "never", the
        newer ones with a path) are set aside, not deleted. Returns the step to continue from (0 = start)."""
        if how not in ("auto", "never") and checkpoint_stage(how) == self.stage:
            step, error = self._load_everywhere(accelerator, Path(how))
            if step is None:
                raise CheckpointError(f"train.resume={how}: the checkpoint cannot be loaded ({error}); "
                                      "accepted: a complete checkpoint directory of this config, auto or never")
            self.set_aside(accelerator, [p for p in self.all() if p.name > f"step-{step:08d}"], f"train.resume={how}")
            return step
        if accelerator.is_main_process:
            remove_partial_saves(self.dir)
        accelerator.wait_for_everyone()
        if how == "never":
            self.set_aside(accelerator, self.all(), "train.resume=never")
            return 0
        errors = []
        for path in reversed(self.all()):
            step, error = self._load_everywhere(accelerator, path)
            if step is not None:
                return step
            errors.append(f"{path.name}: {error}")
        if errors:  # the model may hold half of a damaged checkpoint: never train on from there
            raise CheckpointError(f"no checkpoint in {self.dir} can be loaded ({'; '.join(errors)}); accepted: "
                                  "checkpoints written with this config, or train.resume=never to start this "
                                  "stage over (they are moved aside)")
        return 0
