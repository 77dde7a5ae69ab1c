"""Data-parallel training over 2 CPU processes (`accelerate launch --multi_gpu --num_processes 2`, gloo):
identical weights on both ranks, the same result as 1 process with the same global batch, every row of a
step's global batch trained on exactly once, and files written by the main process only. The 2-process run
also accumulates gradients (2 micro-batches) and checkpoints activations (dit.grad_checkpointing).
FSDP (accelerate's FSDP2) over the same 2 CPU processes: the same weights as 1 process, checkpoints as
safetensors, and a bitwise-exact resume."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmdit.checkpoints import CheckpointError
from mmdit.latents import LatentSplit
from mmdit.data.order import batch_indices
from train.train import main

from conftest import PRECISION, tiny_args, tolerance

REPO = Path(__file__).resolve().parent.parent

# train.py with a record, per process, of the rows it trained on, the files it wrote, and its final weights.
DRIVER = """
import json, os, sys
from train.train import cli
import mmdit.fsdp
import mmdit.stages.dit as stage
from mmdit import checkpoints
from safetensors.torch import save_file
from mmdit.weights import cpu_state

out, rank = sys.argv[1], int(os.environ["RANK"])
rows, written = [], []
real_indices, real_fit, real_grid, real_save_file = stage.batch_indices, stage.fit, stage.save_grid, checkpoints.save_file

def batch_indices(step, n, batch_size, seed, shard, num_shards):
    result = real_indices(step, n, batch_size, seed, shard, num_shards)
    rows.append([step, shard, result.tolist()])
    return result

def fit(*args, **kwargs):
    model = real_fit(*args, **kwargs)
    save_file(cpu_state(model), f"{out}/weights-{rank}.safetensors")
    return model

def save_grid(rows, path, *args, **kwargs):
    written.append(str(path))
    return real_grid(rows, path, *args, **kwargs)

def save_ema(tensors, path, *args, **kwargs):
    written.append(str(path))
    return real_save_file(tensors, path, *args, **kwargs)

stage.batch_indices, stage.fit, stage.save_grid, checkpoints.save_file = batch_indices, fit, save_grid, save_ema
code = cli(sys.argv[2:])
json.dump({"rows": rows, "written": written}, open(f"{out}/record-{rank}.json", "w"))
sys.exit(code)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: Path, *args: str) -> subprocess.CompletedProcess:
    """`accelerate launch` 2 CPU processes; asserts they exit 0."""
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
               "--dynamo_backend", "no", str(script), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def assert_same_weights(one: Path, two: Path) -> None:
    """The model and EMA of two checkpoints: the same tensors, equal up to float summation order."""
    for name in ("model", "ema"):
        a, b = load_file(one / f"{name}.safetensors"), load_file(two / f"{name}.safetensors")
        assert a.keys() == b.keys(), name
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=tolerance(1e-6, 2e-2), rtol=tolerance(1e-5, 2e-2),
                                       msg=f"{name} {key}")


def test_two_processes_match_one_process_and_write_once(tiny_run, tmp_path):
    root = tmp_path / "two"  # the tiny run's data, caption cache, VQ-VAE and latent cache; the DiT from scratch
    shutil.copytree(tiny_run.parent, root, ignore=shutil.ignore_patterns("dit", "tensorboard", "*.png"))
    (tmp_path / "driver.py").write_text(DRIVER)
    # The tiny run: 1 process, batch 8. Here: 2 processes x 2 accumulated micro-batches of 2 = the same 8.
    args = tiny_args(root, "train.stage=dit", "dit_train.batch_size=2", "dit_train.gradient_accumulation_steps=2",
                     "dit.grad_checkpointing=true")
    proc = launch(tmp_path / "driver.py", str(tmp_path), *args)

    weights = [load_file(tmp_path / f"weights-{rank}.safetensors") for rank in range(2)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # the ranks never drift apart
    one = tiny_run / "dit" / "checkpoints" / "step-00000010"
    two = root / "run" / "dit" / "checkpoints" / "step-00000010"
    assert_same_weights(one, two)  # the same global batch: equal up to float summation order
    # The loss by noise level, summed over the processes at each log step (mmdit/loss_bins.py): the 1-process bins.
    by_t = [json.loads((run / "dit" / "loss_by_t.json").read_text())["history"] for run in (tiny_run, root / "run")]
    assert [h["count"] for h in by_t[0]] == [h["count"] for h in by_t[1]] and len(by_t[0]) == 2
    for a, b in zip(by_t[0], by_t[1]):
        filled = [i for i, c in enumerate(a["count"]) if c]  # an empty bin has no mean (None)
        assert [b["mean"][i] for i in filled] == pytest.approx([a["mean"][i] for i in filled],
                                                               rel=tolerance(1e-4, 5e-2))

    records = [json.loads((tmp_path / f"record-{rank}.json").read_text()) for rank in range(2)]
    n = len(LatentSplit(root / "run" / "latents", "train"))
    for step in range(10):  # each row of the global batch trained on once, by one process
        parts = [(shard, rows) for r in records for s, shard, rows in r["rows"] if s == step]
        assert sorted(shard for shard, _ in parts) == [0, 1, 2, 3]
        assert sorted(row for _, rows in parts for row in rows) == sorted(batch_indices(step, n, 8, 0).tolist())
    assert {shard for _, shard, _ in records[1]["rows"]} == {2, 3}

    assert records[1]["written"] == []  # sample grids and the EMA weights: the main process only
    assert {Path(p).name for p in records[0]["written"]} == {"ema.safetensors", "samples-000010.png", "samples.png"}
    assert len(list((root / "run" / "tensorboard").rglob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in two.iterdir()) == ["ema.safetensors", "model.safetensors", "optimizer.bin",
                                                      "random_states_0.pkl", "random_states_1.pkl", "step.json"]
    assert proc.stderr.count("dit: exported the pipeline") == 1  # logs from the main process only


# trainer.fit on a toy regression over 2 processes; at step 2 the loss is NaN on rank 1 only, through a term with
# no gradient path (the gradients stay finite everywhere): the step must be skipped by both processes or neither.
SKIP_DRIVER = """
import json, os, sys
from pathlib import Path
import torch
from accelerate import Accelerator
from mmdit.config import StageConfig
from mmdit.data.order import batch_indices
from mmdit.trainer import fit

out, precision = Path(sys.argv[1]), sys.argv[2]
accelerator = Accelerator(cpu=True, mixed_precision="no")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
data = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))

def loss_fn(model, batch):
    step, x = batch
    loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
    if step == 2 and accelerator.process_index == 1:
        loss = loss + torch.tensor(float("nan"))
    return loss, {}

stage = StageConfig(steps=4, batch_size=4, lr=1e-2, warmup_steps=0, schedule="constant", log_every=4,
                    image_every=10, checkpoint_every=4)
model = fit(accelerator, "toy", model, stage, lambda step, shard, n: (step, data[batch_indices(step, 64, 4, 0, shard, n)]),
            loss_fn, out, mixed_precision=precision)
json.dump({k: v.tolist() for k, v in model.state_dict().items()}, open(f"{out}/weights-{accelerator.process_index}.json", "w"))
"""


def test_a_step_non_finite_on_one_process_is_skipped_by_all(tmp_path):
    (tmp_path / "driver.py").write_text(SKIP_DRIVER)
    proc = launch(tmp_path / "driver.py", str(tmp_path), PRECISION)
    weights = [json.loads((tmp_path / f"weights-{rank}.json").read_text()) for rank in range(2)]
    assert weights[0] == weights[1]  # before: rank 1 skipped step 2 alone, and the ranks drifted apart
    assert "toy: skipped 1 step(s) with a non-finite loss or gradient (weights unchanged): [2]" in proc.stderr


# accelerate only turns FSDP on for accelerators (MULTI_CPU is not an FSDP type), so this driver switches the
# 2-process CPU state to FSDP2 with the shipped config's plugin settings: accelerate's own FSDP2 code then
# shards the model over gloo, as it does over NCCL. It records which files each process writes.
FSDP_DRIVER = """
import json, os, sys, yaml
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from train.train import cli
import mmdit.fsdp
import mmdit.stages
from mmdit import checkpoints

fsdp = yaml.safe_load(open("configs/accelerate/fsdp-full-shard.yaml"))["fsdp_config"]
assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT", fsdp
real_accelerator, real_save_file, written = mmdit.stages.Accelerator, checkpoints.save_file, []

def Accelerator(*args, **kwargs):
    accelerator = real_accelerator(*args, **kwargs)
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=fsdp["fsdp_reshard_after_forward"],
        auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"].lower())
    accelerator.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return accelerator

def save_file(tensors, path, *args, **kwargs):
    written.append(path)
    return real_save_file(tensors, path, *args, **kwargs)

mmdit.stages.Accelerator, checkpoints.save_file, mmdit.fsdp.save_file = Accelerator, save_file, save_file
code = cli(sys.argv[2:])
json.dump(written, open(f"{sys.argv[1]}-{os.environ['RANK']}.json", "w"))
sys.exit(code)
"""


def test_fsdp_vqvae_matches_one_process_and_exports_its_codebook(tiny_run, tmp_path):
    root = tmp_path / "fsdp"  # the tiny run's data and caption cache; the VQ-VAE from scratch, one FSDP unit
    shutil.copytree(tiny_run.parent, root, ignore=shutil.ignore_patterns("run"))
    (tmp_path / "driver.py").write_text(FSDP_DRIVER)
    proc = launch(tmp_path / "driver.py", str(tmp_path / "written"),
                  *tiny_args(root, "train.stage=vqvae", "vqvae_train.batch_size=4"))  # 2 x 4 = the tiny run's 8
    assert "vqvae: FSDP over 2 processes, the whole model one unit" in proc.stderr
    one = load_file(tiny_run / "vqvae" / "checkpoints" / "step-00000020" / "model.safetensors")
    two = load_file(root / "run" / "vqvae" / "checkpoints" / "step-00000020" / "model.safetensors")
    exported = load_file(root / "run" / "vqvae" / "model" / "model.safetensors")
    assert one.keys() == two.keys() == exported.keys()
    for key in one:  # parameters and the codebook buffers: gathered whole into the exported model
        assert torch.equal(exported[key], two[key]), key
        if PRECISION == "bf16" and key.startswith("quantizer."):
            continue  # bf16 rounding flips near-tie code assignments, which moves codes and their counters
        torch.testing.assert_close(one[key], two[key], atol=tolerance(1e-5, 2e-2), rtol=tolerance(1e-4, 2e-2), msg=key)
    assert (root / "run" / "latents" / "stats.json").is_file()


def test_fsdp_matches_one_process_checkpoints_safetensors_and_resumes_exactly(tiny_run, tmp_path):
    root = tmp_path / "fsdp"  # the tiny run's VQ-VAE and latent cache; the DiT from scratch, sharded
    shutil.copytree(tiny_run.parent, root, ignore=shutil.ignore_patterns("dit", "tensorboard", "*.png"))
    (tmp_path / "driver.py").write_text(FSDP_DRIVER)
    # 2 processes x 2 accumulated micro-batches of 2 = the tiny run's batch of 8; activations checkpointed.
    sharding = ["train.stage=dit", "dit_train.batch_size=2", "dit_train.gradient_accumulation_steps=2",
                "dit.grad_checkpointing=true"]
    args = tiny_args(root, *sharding)
    proc = launch(tmp_path / "driver.py", str(tmp_path / "written"), *args)
    assert "dit: FSDP over 2 processes, each CrossBlock a unit" in proc.stderr
    written = [json.loads((tmp_path / f"written-{rank}.json").read_text()) for rank in range(2)]
    assert written[1] == []  # whole weights are gathered to, and written by, the main process only
    assert {Path(p).name for p in written[0]} == {"model.safetensors", "optimizer.safetensors", "ema.safetensors"}
    checkpoints = root / "run" / "dit" / "checkpoints"
    one, two = tiny_run / "dit" / "checkpoints" / "step-00000010", checkpoints / "step-00000010"
    assert_same_weights(one, two)  # sharded over 2 processes, the same weights as whole on 1
    # Whole weights and optimizer state as safetensors; the only pickles are accelerate's RNG states.
    assert sorted(p.name for p in two.iterdir()) == ["ema.safetensors", "model.safetensors", "optimizer.json",
                                                      "optimizer.safetensors", "random_states_0.pkl",
                                                      "random_states_1.pkl", "step.json"]
    optimizer = load_file(two / "optimizer.safetensors")
    assert {k.rsplit(":", 1)[1] for k in optimizer} == {"exp_avg", "exp_avg_sq", "step"}
    assert len(optimizer) == 3 * len(load_file(two / "model.safetensors"))
    exported = load_file(root / "run" / "dit" / "model" / "model.safetensors")  # the export is the whole EMA
    assert all(torch.equal(exported[k], v) for k, v in load_file(two / "ema.safetensors").items())

    # Resume from step 5 in a copy: steps 6-10 again, bitwise the same model, EMA and optimizer state.
    again = tmp_path / "again"
    shutil.copytree(root, again)
    args = tiny_args(again, *sharding, f"train.resume={again}/run/dit/checkpoints/step-00000005")
    proc = launch(tmp_path / "driver.py", str(tmp_path / "again"), *args)
    assert "resumed from step 5" in proc.stderr
    for name in ("model", "ema", "optimizer"):
        a = load_file(two / f"{name}.safetensors")
        b = load_file(again / "run" / "dit" / "checkpoints" / "step-00000010" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    # Without FSDP (1 process), an FSDP checkpoint is refused in one line, not half loaded.
    with pytest.raises(CheckpointError, match="written with FSDP; accepted: resuming it with the kind of launch"):
        main(tiny_args(again, *sharding[:2], f"train.resume={again}/run/dit/checkpoints/step-00000005"))
