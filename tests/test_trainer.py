"""Reliability of the training loop (mmdit/trainer.py): a run killed with SIGKILL and resumed ends bitwise
equal to an uninterrupted one; interrupted saves and damaged checkpoints never cost the good ones; SIGTERM
stops cleanly; non-finite steps are skipped, counted, and stop the run when they persist."""
import copy
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import load as load_pickled
from safetensors.torch import load_file

from mmdit.checkpoints import CheckpointError, Checkpoints
from mmdit.config import StageConfig
from mmdit.data.order import batch_indices
from mmdit.trainer import STOPPED_RESUMABLE, TrainingDiverged, fit
from train.train import main

from conftest import PRECISION, tiny_args, tolerance

REPO = Path(__file__).resolve().parent.parent

# Runs train.py in a subprocess that SIGKILLs itself at the start of the k-th training step of the run (both
# stages counted): no handler, no cleanup, exactly what an out-of-memory kill or a lost machine does.
KILLER = """
import os, signal, sys
import mmdit.stages.dit, mmdit.stages.vqvae
from train.train import main
kill_at, calls, real = int(sys.argv[1]), [0], mmdit.stages.dit.batch_indices
def batch_indices(*args, **kwargs):
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
mmdit.stages.dit.batch_indices = mmdit.stages.vqvae.batch_indices = batch_indices
main(sys.argv[2:])
"""


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


def test_sigkill_at_a_random_step_then_resume_is_bitwise_exact(tiny_run, tmp_path):
    reference = tiny_run.parent  # the same TINY config, never interrupted
    for d in ("data", "cache"):
        shutil.copytree(reference / d, tmp_path / d)
    # TINY: 20 VQ-VAE steps (checkpoints at 10, 20), then 10 DiT steps (at 5, 10). Step 11 on: after a checkpoint.
    kill_at = random.Random().randint(11, 30)
    killed = subprocess.run([sys.executable, "-c", KILLER, str(kill_at), *tiny_args(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]

    main(tiny_args(tmp_path))  # resume: the same command again
    for stage, last, files in (("vqvae", 20, ["model"]), ("dit", 10, ["model", "ema"])):
        a = reference / "run" / stage / "checkpoints" / f"step-{last:08d}"
        b = tmp_path / "run" / stage / "checkpoints" / f"step-{last:08d}"
        for name in files:
            assert_same_tensors(load_file(a / f"{name}.safetensors"), load_file(b / f"{name}.safetensors"),
                                f"{stage} {name} after a kill at step {kill_at}")
        opt_a, opt_b = load_pickled(a / "optimizer.bin"), load_pickled(b / "optimizer.bin")
        for i, state in opt_a["state"].items():
            assert_same_tensors(state, opt_b["state"][i], f"{stage} optimizer state after a kill at step {kill_at}")
    assert_same_tensors(load_file(tiny_run / "dit/model/model.safetensors"),
                        load_file(tmp_path / "run/dit/model/model.safetensors"), "exported DiT")


def test_interrupted_save_and_damaged_checkpoints_fall_back(tmp_path, caplog):
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    ckpts = Checkpoints(tmp_path, keep=3, stage="toy", model=accelerator.unwrap_model(model))
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.fill_(step)
        ckpts.save(accelerator, step)
    assert [p.name for p in ckpts.all()] == ["step-00000001", "step-00000002", "step-00000003"]
    shutil.copytree(ckpts.all()[-1], tmp_path / ".tmp-step-00000004")  # a save killed before its rename
    newest = ckpts.all()[-1] / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    with caplog.at_level("WARNING"):
        assert ckpts.resume(accelerator) == 2
    assert torch.all(model.weight == 2)
    assert ".tmp-step-00000004: an interrupted save" in caplog.text
    assert not (tmp_path / ".tmp-step-00000004").exists()  # removed: never complete, only taking space
    assert "step-00000003 failed to load" in caplog.text

    rng = tmp_path / "step-00000002" / "random_states_0.pkl"  # accelerate alone would skip it silently
    rng.write_bytes(rng.read_bytes()[:10])
    assert ckpts.resume(accelerator) == 1 and torch.all(model.weight == 1)

    (tmp_path / "step-00000001" / "optimizer.bin").unlink(missing_ok=True)
    (tmp_path / "step-00000001" / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no checkpoint in .* can be loaded .*train.resume=never"):
        ckpts.resume(accelerator)  # never train on from a half-loaded model

    ckpts.save(accelerator, 5)  # the next save clears what interrupted saves left behind
    assert not list(tmp_path.glob(".tmp-step-*"))


class NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def toy_fit(out: Path, steps: int, signal_at: int | None = None, nan_loss=(), nan_grad=(), noise: bool = True,
            width: int = 8, resume: str = "auto", poison=(), mixed_precision: str = PRECISION, **cfg):
    """A tiny regression through trainer.fit, with an EMA, global-RNG noise (restored exactly on resume)
    and hooks to send a signal, inject a non-finite loss / gradient, or make the weights non-finite (`poison`)
    at chosen steps."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))
    ema = copy.deepcopy(model)
    data = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))

    def get_batch(step, slot, num_slots):
        if step == signal_at and slot == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return step, data[batch_indices(step, len(data), len(data) // 8 // num_slots, 0, slot, num_slots)]

    def loss_fn(model, batch):
        step, x = batch
        x = x + 0.1 * torch.randn(x.shape) if noise else x
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        if step in nan_loss:
            loss = loss * float("nan")
        if step in poison:
            with torch.no_grad():
                next(model.parameters()).fill_(float("inf"))
        return (NanGradient.apply(loss) if step in nan_grad else loss), {}

    stage = StageConfig(steps=steps, batch_size=8, lr=1e-2, warmup_steps=2, log_every=2, image_every=100,
                        checkpoint_every=3, **cfg)
    fit(Accelerator(cpu=True, mixed_precision="no"), "toy", model, stage, get_batch, loss_fn, out, ema=ema,
        resume=resume, mixed_precision=mixed_precision)
    return model.state_dict(), ema.state_dict()


def test_sigterm_finishes_the_step_checkpoints_exits_0_and_resumes_exactly(tmp_path, caplog):
    handler = signal.getsignal(signal.SIGTERM)
    reference = toy_fit(tmp_path / "ref", steps=8, gradient_accumulation_steps=2)
    with caplog.at_level("WARNING"), pytest.raises(SystemExit) as stop:
        toy_fit(tmp_path / "run", steps=8, signal_at=4, gradient_accumulation_steps=2)
    assert stop.value.code == STOPPED_RESUMABLE  # not 0: a scheduler must not take it for a finished job
    assert "toy: stopped by SIGTERM after step 5; checkpoint" in caplog.text  # step 4 (of 0..7) was finished
    assert (tmp_path / "run" / "checkpoints" / "step-00000005" / "step.json").is_file()
    assert signal.getsignal(signal.SIGTERM) is handler
    resumed = toy_fit(tmp_path / "run", steps=8, gradient_accumulation_steps=2)
    for a, b, what in zip(reference, resumed, ("weights", "EMA")):
        assert_same_tensors(a, b, what)


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_a_non_finite_step_is_skipped_and_counted(tmp_path, caplog, where):
    good = toy_fit(tmp_path / "good", steps=3, schedule="constant")
    with caplog.at_level("WARNING"):
        bad = toy_fit(tmp_path / "bad", steps=4, schedule="constant",
                      **{"nan_loss" if where == "loss" else "nan_grad": {3}})
    for a, b, what in zip(good, bad, ("weights", "EMA")):
        assert_same_tensors(a, b, f"{what} after a non-finite {where}")
    opt_good = load_pickled(tmp_path / "good/checkpoints/step-00000003/optimizer.bin")["state"]
    opt_bad = load_pickled(tmp_path / "bad/checkpoints/step-00000004/optimizer.bin")["state"]
    for i in opt_good:
        assert_same_tensors(opt_good[i], opt_bad[i], "optimizer state")  # moments and step count untouched
    assert "toy: skipped 1 step(s) with a non-finite loss or gradient (weights unchanged): [3]; 1 so far" in caplog.text


def test_persistent_non_finite_steps_stop_the_run_with_the_last_good_checkpoint(tmp_path):
    good, _ = toy_fit(tmp_path / "good", steps=2, schedule="constant")
    # Streaks are read at log and checkpoint steps (log_every=2, checkpoint_every=3): steps 2-5 go bad, read at 6.
    with pytest.raises(TrainingDiverged, match=r"toy: 4 consecutive steps with a non-finite loss or gradient "
                                               r"\(up to step 6; stage.max_bad_steps=3\); stopped.*step-00000006"):
        toy_fit(tmp_path / "bad", steps=20, schedule="constant", max_bad_steps=3, nan_loss=set(range(2, 20)))
    assert_same_tensors(good, load_file(tmp_path / "bad/checkpoints/step-00000006/model.safetensors"), "last good")


def test_a_stage_whose_every_step_was_bad_fails_instead_of_exporting(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"toy: every step \(1 to 4\) had a non-finite loss or gradient"):
        toy_fit(tmp_path, steps=4, max_bad_steps=10, nan_loss=set(range(4)))


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    # Step 4 makes the weights infinite (a finite gradient at a huge learning rate can): the checkpoint due at
    # step 6 is refused and the run names the last good one, which a rerun then resumes.
    with pytest.raises(TrainingDiverged, match=r"toy: the weights became non-finite by step 6; not checkpointed. "
                                               r"The last good weights are in .*step-00000003"):
        toy_fit(tmp_path, steps=9, schedule="constant", poison={4})
    assert [p.name for p in Checkpoints(tmp_path / "checkpoints", 0).all()] == ["step-00000003"]
    good = load_file(tmp_path / "checkpoints" / "step-00000003" / "model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in good.values())


def test_auto_precision_is_measured_on_a_bf16_native_cpu_recorded_and_kept_on_resume(tmp_path, monkeypatch, caplog):
    from mmdit import compat, precision
    monkeypatch.setattr(compat, "cpu_has_native_bf16", lambda: True)  # as on a CPU with AMX
    assert precision.resolve("auto", torch.device("cpu")) == "measure"
    timings = {"no": 0.002, "bf16": 0.001}
    monkeypatch.setattr(precision, "measure", lambda *args, **kwargs: dict(timings))
    with caplog.at_level("INFO"):
        toy_fit(tmp_path, steps=3, mixed_precision="auto")
    assert "toy: mixed precision bf16, measured on the first batch: fp32 2.0 ms/step, bf16 1.0 ms/step" in caplog.text
    assert json.loads((tmp_path / "precision.json").read_text())["mixed_precision"] == "bf16"
    assert json.loads((tmp_path / "checkpoints/step-00000003/step.json").read_text())["mixed_precision"] == "bf16"
    timings.update(no=0.001, bf16=0.002)  # a resumed run keeps what the run chose, whatever it would measure now
    toy_fit(tmp_path, steps=6, mixed_precision="auto")
    assert json.loads((tmp_path / "checkpoints/step-00000006/step.json").read_text())["mixed_precision"] == "bf16"
    toy_fit(tmp_path / "fresh", steps=3, mixed_precision="auto")
    assert json.loads((tmp_path / "fresh/precision.json").read_text())["mixed_precision"] == "no"


def test_precision_measurement_times_both_and_leaves_no_trace():
    from mmdit import precision
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = torch.randn(16, 4)
    rng = torch.get_rng_state()

    def loss_fn(m, x):
        return m(x + torch.randn_like(x)).pow(2).mean(), {}
    seconds = precision.measure(model, loss_fn, batch, torch.device("cpu"), warmup=1, reps=2)
    assert set(seconds) == {"no", "bf16"} and all(s > 0 for s in seconds.values())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_resume_from_a_path_never_and_an_incompatible_checkpoint(tmp_path, caplog):
    run = tmp_path / "run"
    final = toy_fit(run, steps=6)
    again = toy_fit(run, steps=6, resume=str(run / "checkpoints" / "step-00000003"))  # redo steps 4-6
    assert_same_tensors(final[0], again[0], "weights resumed from an older checkpoint")
    with pytest.raises(CheckpointError, match=r"tensor 0.weight has shape \(8, 4\) in the checkpoint, \(16, 4\) "
                                              r"in the model.*train.resume=never"):
        toy_fit(run, steps=6, width=16)  # a checkpoint of another config: one line, naming the tensor
    with caplog.at_level("WARNING"):
        toy_fit(run, steps=6, width=16, resume="never")  # start over; nothing is deleted
    assert (run / "checkpoints.old-1" / "step-00000006").is_dir()  # the timeline resuming from step 3 left
    assert sorted(p.name for p in (run / "checkpoints.old-2").iterdir()) == ["step-00000003", "step-00000006"]
    assert "train.resume=never: moved the checkpoints ['step-00000003', 'step-00000006'] to" in caplog.text


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    big = toy_fit(tmp_path / "big", steps=4, noise=False)
    accumulated = toy_fit(tmp_path / "acc", steps=4, noise=False, gradient_accumulation_steps=4)
    for a, b in zip(big, accumulated):
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=tolerance(1e-6, 1e-3), rtol=tolerance(1e-5, 1e-3))


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "stage.steps=0; accepted: an integer >= 1"),
    ({"gradient_accumulation_steps": 0}, "stage.gradient_accumulation_steps=0; accepted: an integer >= 1"),
    ({"lr": 0.0}, "stage.lr=0.0; accepted: a number > 0"),
    ({"betas": [0.9]}, r"stage.betas=\[0.9\]; accepted: two numbers in \[0, 1\)"),
])
def test_stage_config_checks(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StageConfig(**kwargs)
