"""Exports are written atomically: an interrupted save never leaves a half-written file, and pipeline.json,
written last, marks a complete export."""
import errno

import pytest
import torch

from mmdit import weights
from mmdit.dit import DiT, DiTModelConfig
from mmdit.pipeline import PipelineInfo, TextToImagePipeline
from mmdit.vqvae import VQVAE, VQVAEConfig


def tiny_pipeline(seed: int) -> TextToImagePipeline:
    torch.manual_seed(seed)
    dit = DiT(DiTModelConfig(in_channels=4, input_size=4, width=16, depth=1, heads=2, text_dim=8))
    vqvae = VQVAE(VQVAEConfig(channels=8, channel_mult=[1], codebook_size=8, code_dim=4))
    return TextToImagePipeline(dit, vqvae, PipelineInfo(None, 4, [0.0] * 4, [1.0] * 4))


def files(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def disk_full(*args):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_interrupted_model_save_keeps_the_previous_export(tmp_path, monkeypatch):
    old, new = tiny_pipeline(0).dit, tiny_pipeline(1).dit
    old.save_pretrained(tmp_path)
    before = files(tmp_path)
    monkeypatch.setattr(weights.os, "fsync", disk_full)  # the disk fills while the first file is written
    with pytest.raises(OSError, match="No space left"):
        new.save_pretrained(tmp_path)
    assert files(tmp_path) == before  # no temp file left, nothing half-written
    loaded = DiT.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), old.state_dict().values()))


def test_interrupted_pipeline_export_is_not_a_run(tmp_path, monkeypatch):
    tiny_pipeline(0).save_pretrained(tmp_path)
    written, write = [], weights.atomic_write

    def fail_after_the_first_file(path, data):
        if written:
            disk_full()
        written.append(path)
        write(path, data)

    monkeypatch.setattr(weights, "atomic_write", fail_after_the_first_file)
    with pytest.raises(OSError):
        tiny_pipeline(1).save_pretrained(tmp_path)
    # New DiT weights beside the old config and VQ-VAE: refused as a whole, not loaded as a mix of two exports.
    assert written == [tmp_path / "dit" / "model" / "model.safetensors"]
    with pytest.raises(FileNotFoundError, match="is not an exported mmdit run: no pipeline.json"):
        TextToImagePipeline.from_pretrained(tmp_path)
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]  # no temp file left
    monkeypatch.undo()
    tiny_pipeline(1).save_pretrained(tmp_path)  # exporting again completes it
    assert TextToImagePipeline.from_pretrained(tmp_path).info.latent_std == [1.0] * 4
