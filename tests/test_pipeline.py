import json

import pytest
from PIL import Image

from mmdit import TextToImagePipeline
from mmdit.sample import main as sample_main
from train.train import main as train_main

from conftest import tiny_args


@pytest.fixture(scope="module")
def pipe(tiny_run):
    return TextToImagePipeline.from_pretrained(tiny_run)


def test_run_directory_is_a_complete_export(tiny_run):
    for path in ["pipeline.json", "dit/model/config.json", "dit/model/model.safetensors",
                 "vqvae/model/model.safetensors", "samples.png", "config.yaml"]:
        assert (tiny_run / path).is_file(), path
    info = json.loads((tiny_run / "pipeline.json").read_text())
    assert len(info["latent_mean"]) == len(info["latent_std"]) == 4
    assert list((tiny_run / "dit").glob("samples-*.png"))
    assert (tiny_run / "dit" / "checkpoints" / "step-00000010" / "ema.safetensors").is_file()


def test_sampling_is_deterministic_by_seed_and_batch_independent(pipe):
    prompts = ["a red circle", "a small blue square in the bottom right", ""]
    a = pipe(prompts, num_steps=3, guidance_scale=2.0, seed=1)
    b = pipe(prompts, num_steps=3, guidance_scale=2.0, seed=1, batch_size=2)  # other batching, same images
    c = pipe(prompts, num_steps=3, guidance_scale=2.0, seed=2)
    assert all(isinstance(im, Image.Image) and im.size == (32, 32) for im in a)
    assert [im.tobytes() for im in a] == [im.tobytes() for im in b]
    assert [im.tobytes() for im in a] != [im.tobytes() for im in c]


def test_heun_and_no_snap_and_non_ascii(pipe):
    images = pipe(["ein roter Kreis 🔴", "x" * 500], num_steps=2, guidance_scale=1.0, sampler="heun",
                  snap_to_codes=False)
    assert len(images) == 2


# Bad arguments and run directories: tests/test_bad_input.py.


def test_sample_cli_writes_a_grid(tiny_run, tmp_path):
    out = sample_main(["--model", str(tiny_run), "--prompt", "a red circle", "--prompt", "", "--num-images", "3",
                       "--steps", "2", "--out", str(tmp_path / "grid.png")])
    grid = Image.open(out)
    assert grid.height > 2 * 32 and grid.width > 3 * 32


def test_dit_stage_resumes(tiny_run, tmp_path, caplog):
    import shutil
    shutil.copytree(tiny_run.parent, tmp_path / "copy")
    with caplog.at_level("INFO"):
        train_main(tiny_args(tmp_path / "copy", "train.stage=dit", "dit_train.steps=15"))
    assert "dit: resumed from step 10" in caplog.text
    assert (tmp_path / "copy" / "run" / "dit" / "checkpoints" / "step-00000015").is_dir()
