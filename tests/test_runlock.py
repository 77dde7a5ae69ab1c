"""One run per output directory (mmdit/runlock.py), and what a launcher's SIGTERM does to its worker."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmdit.runlock import RunLock, RunLocked
from train.train import cli, main

from conftest import tiny_args

REPO = Path(__file__).resolve().parent.parent


def test_a_second_run_into_a_held_directory_stops_in_one_line(tmp_path, capsys):
    with RunLock(tmp_path / "run"):
        assert f"pid {os.getpid()} on host" in (tmp_path / "run" / ".lock").read_text()
        with pytest.raises(RunLocked, match=r"train.output_dir=.*run is in use by a running training \(pid \d+"):
            main(tiny_args(tmp_path))
        assert cli(tiny_args(tmp_path)) == 2
        assert capsys.readouterr().err.count("\n") == 1
    assert (tmp_path / "run" / ".lock").read_text() == ""  # a clean end names nobody
    assert not (tmp_path / "run" / "vqvae").exists()  # the second run wrote nothing


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from mmdit.runlock import RunLock\n"
                               "with RunLock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)",
                               str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunLocked, match=f"pid {holder.pid} "):
        RunLock(tmp_path).__enter__()
    holder.kill()
    holder.wait()
    with caplog.at_level("WARNING"), RunLock(tmp_path):
        pass
    assert f"took over the lock of pid {holder.pid}" in caplog.text


def test_sigterm_to_the_launcher_stops_the_worker_with_a_checkpoint(tmp_path):
    """A scheduler signals `accelerate launch` only; the launcher exits at once. The worker must not train on,
    orphaned: it checkpoints, stops, releases the run directory, and the same command resumes."""
    args = tiny_args(tmp_path, "vqvae_train.steps=100000", "vqvae_train.checkpoint_every=5")
    launcher = subprocess.Popen([str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "1",
                                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                                 "train/train.py", *args], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "run" / "vqvae" / "checkpoints"
    deadline = time.time() + 300
    while not list(checkpoints.glob("step-*/step.json")) and time.time() < deadline and launcher.poll() is None:
        time.sleep(0.5)
    assert list(checkpoints.glob("step-*/step.json")), "training never checkpointed"
    worker = int((tmp_path / "run" / ".lock").read_text().split()[1])
    launcher.send_signal(signal.SIGTERM)
    launcher.wait(timeout=60)
    deadline = time.time() + 120
    while time.time() < deadline and Path(f"/proc/{worker}").exists():
        time.sleep(0.2)
    assert not Path(f"/proc/{worker}").exists(), "the worker kept training after its launcher was stopped"
    assert (tmp_path / "run" / ".lock").read_text() == ""  # released: a rerun can start
    stopped_at = max(int(p.parent.name.split("-")[1]) for p in checkpoints.glob("step-*/step.json"))
    with RunLock(tmp_path / "run"):  # nobody holds it any more
        pass
    assert stopped_at >= 5
