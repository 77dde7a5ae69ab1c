import io
import json
import shutil

import datasets
import pytest
import torch
from PIL import Image

from mmdit.data import DataConfig
from mmdit.data.loader import DataError
from mmdit import compat, precision
from mmdit.config import StageConfig
from mmdit.latents import LatentSplit
from mmdit.text_encoder import CaptionCache, TextEncoder
from mmdit.trainer import lr_factor
from mmdit.vqvae import VQVAE
from mmdit.data.stream import StreamBatches
from train.train import main

from conftest import tiny_args


def test_lr_schedule():
    cfg = StageConfig(steps=100, warmup_steps=10)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0, abs=0.01)
    assert lr_factor(10, cfg) == pytest.approx(1.0, abs=1e-3)  # the first step after warmup: the peak
    assert 0 < lr_factor(99, cfg) < 1e-3  # the last step still learns
    assert lr_factor(100, cfg) == pytest.approx(0.0, abs=1e-9)
    assert lr_factor(50, StageConfig(steps=100, warmup_steps=10, schedule="constant")) == 1.0
    with pytest.raises(ValueError, match="accepted: cosine, constant"):
        lr_factor(1, StageConfig(schedule="linear"))


def test_mixed_precision_choice(monkeypatch):
    cpu = torch.device("cpu")
    assert precision.resolve("no", cpu) == "no" and precision.resolve("bf16", cpu) == "bf16"
    monkeypatch.setattr(compat, "cpu_has_native_bf16", lambda: False)
    assert precision.resolve("auto", cpu) == "no"  # bf16 would run reference kernels: never chosen
    monkeypatch.setattr(compat, "cpu_has_native_bf16", lambda: True)
    assert precision.resolve("auto", cpu) == "measure"  # only a timing of the stage's own step can tell
    assert precision.accelerator_precision("bf16") == "no"  # autocast is the loop's; accelerate only scales fp16
    with pytest.raises(ValueError, match="accepted: auto, no, bf16, fp16"):
        precision.resolve("fp8", cpu)


def test_default_pipeline_tiny_end_to_end_and_resume(tmp_path, caplog):
    main(tiny_args(tmp_path, "train.stage=vqvae"))
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file() and (tmp_path / "data" / "shapes.json").is_file()
    assert (run / "vqvae" / "recon-000020.png").is_file()
    metrics = json.loads((run / "vqvae" / "metrics.json").read_text())
    assert {"psnr", "usage", "perplexity", "judge"} <= set(metrics)
    vqvae = VQVAE.from_pretrained(run / "vqvae" / "model")
    indices = LatentSplit(run / "latents", "validation").indices[:]
    assert indices.shape[1:] == (8, 8) and int(indices.max()) < 32
    stats = json.loads((run / "latents" / "stats.json").read_text())
    assert len(stats["mean"]) == len(stats["std"]) == vqvae.cfg.code_dim
    train = LatentSplit(run / "latents", "train")
    captions, columns = train.text()
    assert len(captions) == len(train) == len(train.indices[:])
    assert not any(columns["holdout"])  # held-out combinations never reach training

    shutil.rmtree(run / "vqvae" / "model")
    with caplog.at_level("INFO"):
        main(tiny_args(tmp_path, "train.stage=vqvae", "vqvae_train.steps=30"))  # picks up where it stopped
    assert "resumed from step 20" in caplog.text
    assert (run / "vqvae" / "checkpoints" / "step-00000030").is_dir()
    assert (run / "vqvae" / "model" / "model.safetensors").is_file()


def _saved_dataset(path, n=10):
    def png(i):
        buffer = io.BytesIO()
        Image.new("RGB", (12, 12), (20 * i, 0, 0)).save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}
    ds = datasets.Dataset.from_dict({"img": [png(i) for i in range(n)], "text": [f"c{i}" for i in range(n)]})
    ds.cast_column("img", datasets.Image()).save_to_disk(str(path))
    return DataConfig(name=str(path), image_column="img", caption_column="text", resolution=12, streaming=True)


def reds(batch):
    return [int(v) // 20 for v in batch[:, 0, 0, 0]]  # the row each image came from


def test_streamed_batches_are_sharded_and_resume_where_they_stopped(tmp_path):
    cfg = _saved_dataset(tmp_path / "saved")
    shards = [StreamBatches(cfg, "train", range(r, r + 1), 2, batch_size=2) for r in range(2)]
    epoch = [reds(shards[r](step, r, 2)) for step in range(2) for r in range(2)]  # 2 steps x 2 shards x 2 = 8 of 10
    seen = [row for batch in epoch for row in batch]
    assert len(set(seen)) == len(seen)  # no row twice: sharded, not duplicated
    later = [reds(shards[0](step, 0, 2)) for step in range(2, 6)]  # across the end of shard 0's epoch
    restarted = StreamBatches(cfg, "train", range(0, 1), 2, batch_size=2)
    for step in range(2):
        restarted(step, 0, 2)
    state = json.loads(json.dumps(restarted.state_dict()))  # what a checkpoint stores, as JSON
    resumed = StreamBatches(cfg, "train", range(0, 1), 2, batch_size=2)
    resumed.load_state_dict(state)
    assert [reds(resumed(step, 0, 2)) for step in range(2, 6)] == later
    with pytest.raises(DataError, match="shard 2 of 20 of the streamed split has no usable images"):
        StreamBatches(_saved_dataset(tmp_path / "two", n=2), "train", range(2, 3), 20, batch_size=1)(0, 2, 20)


def test_streaming_vqvae_stage_end_to_end_and_resume(tmp_path, caplog):
    args = ["train.stage=vqvae", "data.streaming=true", "vqvae_train.checkpoint_every=3"]
    main(tiny_args(tmp_path, *args, "vqvae_train.steps=3"))
    run = tmp_path / "run"
    assert json.loads((run / "vqvae/checkpoints/step-00000003/data_state_0.json").read_text())["0"]["epoch"] == 0
    train = LatentSplit(run / "latents", "train")
    assert len(train.indices[:]) == len(train.text()[0]) == 114
    # The streamed split's captions were not read up front: its latent cache encoded them as it streamed.
    cache = CaptionCache(TextEncoder(None, max_length=16), tmp_path / "cache" / "captions")
    assert train.captions[:][:, 0].tolist() == cache.rows([c[0] for c in train.text()[0]]).tolist()
    with caplog.at_level("INFO"):
        main(tiny_args(tmp_path, *args, "vqvae_train.steps=5"))
    assert "vqvae: resumed from step 3" in caplog.text
