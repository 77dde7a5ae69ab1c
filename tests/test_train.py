import json
import shutil

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from mmdit.config import ConfigError
from mmdit.trainer import Checkpoints, StageConfig, batch_indices, lr_factor, resolve_mixed_precision
from mmdit.vqvae import VQVAE
from train.train import main

from conftest import tiny_args


def test_batch_indices_cover_each_epoch_and_split_across_ranks():
    n, bs = 20, 4
    epoch0 = torch.cat([batch_indices(s, n, bs, seed=0) for s in range(5)])
    assert sorted(epoch0.tolist()) == list(range(n))
    epoch1 = torch.cat([batch_indices(s, n, bs, seed=0) for s in range(5, 10)])
    assert not torch.equal(epoch0, epoch1)  # reshuffled every epoch
    assert torch.equal(batch_indices(7, n, bs, seed=0), batch_indices(7, n, bs, seed=0))  # pure in step
    ranks = [batch_indices(3, n, 2, seed=0, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat(ranks), batch_indices(3, n, 4, seed=0))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        batch_indices(0, 3, 4, seed=0)


def test_lr_schedule():
    cfg = StageConfig(steps=100, warmup_steps=10)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0, abs=0.01)
    assert lr_factor(100, cfg) == pytest.approx(0.0, abs=1e-9)
    assert lr_factor(50, StageConfig(steps=100, warmup_steps=10, schedule="constant")) == 1.0
    with pytest.raises(ValueError, match="accepted: cosine, constant"):
        lr_factor(1, StageConfig(schedule="linear"))


def test_mixed_precision_choice():
    assert resolve_mixed_precision("no") == "no"
    assert resolve_mixed_precision("auto") in ("no", "bf16", "fp16")
    with pytest.raises(ValueError, match="accepted: auto, no, bf16, fp16"):
        resolve_mixed_precision("fp8")


def test_checkpoints_are_atomic_and_fall_back(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    ckpts = Checkpoints(tmp_path, keep=2)
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.fill_(step)
        ckpts.save(accelerator, step)
    assert [p.name for p in ckpts.all()] == ["step-00000002", "step-00000003"]  # keeps the last 2
    (tmp_path / ".tmp-step-00000004").mkdir()  # a save killed midway is never picked up
    (ckpts.all()[-1] / "model.safetensors").write_bytes(b"garbage")  # newest one damaged
    assert ckpts.resume(accelerator) == 2
    assert torch.all(model.weight == 2)


def test_default_pipeline_tiny_end_to_end_and_resume(tmp_path, caplog):
    main(tiny_args(tmp_path, "train.stage=vqvae"))
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file() and (tmp_path / "data" / "shapes.json").is_file()
    assert (run / "vqvae" / "recon-000020.png").is_file()
    metrics = json.loads((run / "vqvae" / "metrics.json").read_text())
    assert {"psnr", "usage", "perplexity", "judge"} <= set(metrics)
    vqvae = VQVAE.from_pretrained(run / "vqvae" / "model")
    indices = load_file(str(run / "latents" / "validation.safetensors"))["indices"]
    assert indices.shape[1:] == (8, 8) and int(indices.max()) < 32
    stats = json.loads((run / "latents" / "stats.json").read_text())
    assert len(stats["mean"]) == len(stats["std"]) == vqvae.cfg.code_dim
    captions = json.loads((run / "latents" / "train.json").read_text())
    assert len(captions["captions"]) == len(load_file(str(run / "latents" / "train.safetensors"))["indices"])
    assert not any(h for h in captions["columns"]["holdout"])  # held-out combinations never reach training

    shutil.rmtree(run / "vqvae" / "model")
    with caplog.at_level("INFO"):
        main(tiny_args(tmp_path, "train.stage=vqvae", "vqvae_train.steps=30"))  # picks up where it stopped
    assert "resumed from step 20" in caplog.text
    assert (run / "vqvae" / "checkpoints" / "step-00000030").is_dir()
    assert (run / "vqvae" / "model" / "model.safetensors").is_file()


def test_bad_stage_and_indivisible_resolution(tmp_path):
    with pytest.raises(ConfigError, match="accepted: all, data, vqvae, dit"):
        main(tiny_args(tmp_path, "train.stage=everything"))
    with pytest.raises(ConfigError, match="not divisible by the VQ-VAE downsampling factor 4"):
        main(tiny_args(tmp_path, "train.stage=vqvae", "data.resolution=30"))
