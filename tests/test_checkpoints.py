"""Checkpoints (mmdit/checkpoints.py): checksums, a full disk, changed settings on resume, refused files."""
import errno
import json
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from mmdit.checkpoints import CheckpointError, Checkpoints, DiskFull


@dataclass
class ToyConfig:
    width: int = 4
    rope: bool = False
    grad_checkpointing: bool = False


class Toy(torch.nn.Linear):
    def __init__(self, cfg: ToyConfig):
        super().__init__(cfg.width, cfg.width)
        self.cfg = cfg


def prepared(accelerator: Accelerator, cfg: ToyConfig):
    """The model with an AdamW that has taken one step, so checkpoints hold optimizer state too."""
    model = Toy(cfg)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, cfg.width)).sum().backward()
    optimizer.step()
    return accelerator.prepare(model, optimizer)


def saved(directory: Path, steps=(1, 2), cfg: ToyConfig = ToyConfig(), settings=None, width: int = 4):
    """(accelerator, prepared model, Checkpoints) with a checkpoint at each of `steps`, weights = the step."""
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    model, _ = prepared(accelerator, cfg)
    ckpts = Checkpoints(directory, keep=0, stage="toy", model=accelerator.unwrap_model(model),
                        settings=settings or {"lr": 1e-3})
    for step in steps:
        with torch.no_grad():
            model.weight.fill_(step)
        ckpts.save(accelerator, step)
    return accelerator, model, ckpts


def test_a_bit_flip_is_caught_by_the_checksum_and_the_previous_checkpoint_used(tmp_path, caplog):
    accelerator, model, ckpts = saved(tmp_path)
    weights = tmp_path / "step-00000002" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10  # inside the tensor data: safetensors itself cannot notice
    weights.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        assert ckpts.resume(accelerator) == 1
    assert torch.all(model.weight == 1)
    assert "model.safetensors does not match the checksum recorded when it was written" in caplog.text


def test_changed_settings_are_logged_and_changed_model_settings_refused(tmp_path, caplog):
    saved(tmp_path, steps=(1,))
    with caplog.at_level("WARNING"):
        accelerator, _, ckpts = saved(tmp_path / "x", steps=())  # fresh objects, then point them at the run
        ckpts = Checkpoints(tmp_path, 0, "toy", ckpts.model, settings={"lr": 3e-3})
        assert ckpts.resume(accelerator) == 1
    assert "toy: resuming step-00000001 with a changed setting: toy.lr: 0.001 -> 0.003" in caplog.text

    accelerator = Accelerator(cpu=True, mixed_precision="no")
    model = accelerator.prepare(Toy(ToyConfig(grad_checkpointing=True)))  # how it computes, not what: allowed
    assert Checkpoints(tmp_path, 0, "toy", accelerator.unwrap_model(model)).resume(accelerator) == 1
    model = accelerator.prepare(Toy(ToyConfig(rope=True)))  # the same shapes, another model: refused
    with pytest.raises(CheckpointError, match=r"other model settings \(model.rope: False -> True\); accepted: the "
                                              r"checkpoint's model settings, or train.resume=never"):
        Checkpoints(tmp_path, 0, "toy", accelerator.unwrap_model(model)).resume(accelerator)


def test_a_garbage_pickle_is_refused_without_suggesting_to_unpickle_it(tmp_path, caplog):
    accelerator, _, ckpts = saved(tmp_path, steps=(1,))
    ckpt = tmp_path / "step-00000001"
    (ckpt / "optimizer.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'true'\ntR.")  # a pickle that runs a command
    info = json.loads((ckpt / "step.json").read_text())
    del info["sha256"]  # as if written without checksums: the unpickler itself must refuse it
    (ckpt / "step.json").write_text(json.dumps(info))
    with caplog.at_level("WARNING"), pytest.raises(CheckpointError, match="can be loaded"):
        ckpts.resume(accelerator)
    assert "not a plain-tensor file (refused" in caplog.text
    assert "weights_only=False" not in caplog.text


def test_a_mis_shaped_ema_is_named(tmp_path):
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    model = accelerator.prepare(Toy(ToyConfig()))
    Checkpoints(tmp_path, 0, "toy", model, ema=Toy(ToyConfig())).save(accelerator, 1)
    other = Checkpoints(tmp_path, 0, "toy", model, ema=torch.nn.Linear(4, 8))
    with pytest.raises(CheckpointError, match=r"tensor weight has shape \(4, 4\) in the checkpoint, \(8, 4\)"):
        other.resume(accelerator)


def test_a_full_disk_removes_the_partial_checkpoint_and_keeps_the_earlier_ones(tmp_path, monkeypatch):
    accelerator, model, ckpts = saved(tmp_path, steps=(1,))

    def write(accelerator, step, tmp):  # what a full disk does midway through a save
        tmp.mkdir()
        (tmp / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ckpts, "_write", write)
    with pytest.raises(DiskFull, match=r"toy: no space left on the device of .*: a checkpoint needs about .* MB, "
                                       r".* MB are free; the partial checkpoint was removed"):
        ckpts.save(accelerator, 2)
    assert not list(tmp_path.glob(".tmp-step-*"))
    monkeypatch.undo()
    assert ckpts.resume(accelerator) == 1


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs where the machine lets us mount one (root on Linux), else skipped: the simulated test
    above covers the same path."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                                                       capture_output=True).returncode != 0:
        pytest.skip("cannot mount a size-limited tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_real_full_disk_stops_in_one_line_and_resumes_once_space_is_freed(small_disk):
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    model, _ = prepared(accelerator, ToyConfig(width=180))  # ~130 kB of weights, ~400 kB a checkpoint
    ckpts = Checkpoints(small_disk / "checkpoints", keep=0, stage="toy", model=accelerator.unwrap_model(model))
    ckpts.save(accelerator, 1)
    (small_disk / "filler").write_bytes(b"\0" * (1024 * 1024 - 3 * 130_000 - shutil.disk_usage(small_disk).used))
    with pytest.raises(DiskFull, match="no space left on the device"):
        ckpts.save(accelerator, 2)
    assert [p.name for p in (small_disk / "checkpoints").iterdir()] == ["step-00000001"]
    (small_disk / "filler").unlink()  # the user frees space; the same command resumes, then saves again
    assert ckpts.resume(accelerator) == 1
    ckpts.save(accelerator, 2)
    assert [p.name for p in ckpts.all()] == ["step-00000001", "step-00000002"]
