"""User mistakes get one clear line naming the problem and what is accepted, never a traceback: the training
CLI, the pipeline, the sample and eval CLIs, damaged run directories and the text encoder. What is allowed (the
empty prompt, over-long prompts, non-ASCII and emoji, a tuple of prompts) works."""
import json
import math
import shutil
import warnings

import pytest
from PIL import Image

from mmdit import TextToImagePipeline
from mmdit.evaluate import cli as eval_cli
from mmdit.sample import cli as sample_cli
from mmdit.text_encoder import TextEncoder, TextEncoderLoadError
from mmdit.weights import ExportError, WeightsMismatchError
from train.train import cli as train_cli

from conftest import tiny_args


def one_error_line(capsys, rc: int, expected: str) -> None:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert expected in errors[0], errors[0]


def imagefolder(root, rows):
    """rows: (file name, image or raw bytes, metadata dict)."""
    root.mkdir(parents=True)
    for name, image, _ in rows:
        if isinstance(image, bytes):
            (root / name).write_bytes(image)
        else:
            image.save(root / name)
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, **m}) + "\n" for n, _, m in rows))
    return root


def red(i):
    return Image.new("RGB", (32, 32), (200, i, 0))


# (overrides, what the error line says); {tmp} is the test's directory. Everything here stops before training.
TRAIN_CASES = [
    (["data.resolutoin=64"], "unknown key 'data.resolutoin' in section 'data'; valid keys: name, path"),
    (["dta.resolution=64"], "unknown key 'dta' in the config; valid keys: data, text_encoder"),
    (["data.resolution=big"], "data.resolution: expected int, got 'big'"),
    (["data.streaming=maybe"], "data.streaming: expected bool, got 'maybe'"),
    (["data.resolution"], "is not of the form section.key=value"),
    (["--config", "{tmp}/nowhere.yaml"], "config file not found"),
    (["train.stage=everything"], "train.stage='everything'; accepted: all, data, vqvae, dit"),
    (["train.mixed_precision=fp8"], "train.mixed_precision='fp8'; accepted: auto, no, bf16, fp16"),
    (["train.mixed_precision=off"], "train.mixed_precision='off'; accepted: auto, no, bf16, fp16"),
    (["dit_train.steps=0"], "dit_train.steps=0; accepted: an integer >= 1"),
    (["vqvae_train.batch_size=0"], "vqvae_train.batch_size=0; accepted: an integer >= 1"),
    (["dit_train.gradient_accumulation_steps=-1"], "dit_train.gradient_accumulation_steps=-1; accepted: an integer >= 1"),
    (["dit_train.lr=0"], "dit_train.lr=0.0; accepted: a number > 0"),
    (["dit_train.cfg_dropout=1.5"], "dit_train.cfg_dropout=1.5; accepted: a probability in [0, 1]"),
    (["dit.mode=diagonal"], "dit.mode='diagonal'; accepted: cross, joint"),
    (["sample.guidance=-1"], "sample.guidance=-1.0; accepted: a finite number >= 0 (1 = no guidance)"),
    (["sample.guidance=.nan"], "sample.guidance=nan; accepted: a finite number >= 0"),
    (["sample.guidance=.inf"], "sample.guidance=inf; accepted: a finite number >= 0"),
    (["sample.steps=5000"], "sample.steps=5000; accepted: an integer from 1 to 1000"),
    (["sample.seed=18446744073709551616"], "sample.seed=18446744073709551616; accepted: an integer from 0 to 2**64 - 1"),
    (["train.seed=-1"], "train.seed=-1; accepted: an integer from 0 to 2**32 - 1"),
    (["dit.depth=0"], "dit.depth=0; accepted: an integer >= 1"),
    (["vqvae.channel_mult=[]"], "vqvae.channel_mult=[]; accepted: a non-empty list of integers >= 1"),
    (["data.name="], "data.name='': empty; accepted: shapes, scenes, a Hugging Face dataset name or a local dataset directory"),
    (["sample.sampler=ddim"], "sample.sampler='ddim'; accepted: euler, heun, maskgit"),
    (["data.resolution=30"], "data.resolution=30 is not divisible by the VQ-VAE downsampling 4 x the DiT patch "
                             "size 1 = 4; accepted: multiples of 4"),
    (["dit.patch_size=2", "data.resolution=36"], "the DiT patch size 2 = 8; accepted: multiples of 8"),
    (["train.resume={tmp}/nowhere"], "no such directory; accepted: auto, never, or a checkpoint directory"),
    (["train.resume={tmp}"], "is not a checkpoint directory (no step.json)"),
    (["train.stage=dit"], "train.stage=dit needs the VQ-VAE stage's output"),
    (["train.output_dir={tmp}/file.txt/run"], "cannot be written: {tmp}/file.txt is not a writable directory"),
    (["train.output_dir={tmp}/file.txt"], "train.output_dir={tmp}/file.txt is a file; accepted: a directory path"),
    (["train.output_dir=/proc/mmdit-run"], "train.output_dir=/proc/mmdit-run cannot be written: /proc is not a "
                                           "writable directory"),
    (["train.cache_dir=/proc/mmdit-cache"], "train.cache_dir=/proc/mmdit-cache cannot be written: /proc is not a writable directory"),  # root writes anywhere else
    (["data.name={tmp}/nowhere"], "dataset path '{tmp}/nowhere' does not exist"),
    (["data.name={tmp}/text_column", "data.val_split=train"],
     "has no caption column 'caption' (set data.caption_column); columns: image, text"),
    (["data.name={tmp}/broken", "data.val_split=train"], "split 'train' has no usable images"),
    (["data.name={tmp}/odd_captions", "data.val_split=train"], "split 'train' has no usable images (3 skipped)"),
    (["data.name={tmp}/three", "data.val_split=train"], "the train split has 3 usable images, fewer than one "
                                                        "global batch of 8"),
    (["text_encoder.name=no-such-org/no-such-model"], "Text encoder 'no-such-org/no-such-model' could not be loaded"),
    (["text_encoder.max_length=1000"], "max_length=1000 is not valid for text encoder"),
]


@pytest.mark.parametrize("overrides, expected", TRAIN_CASES, ids=[c[1][:40] for c in TRAIN_CASES])
def test_train_cli(tmp_path, capsys, overrides, expected):
    (tmp_path / "file.txt").write_text("not a directory")
    imagefolder(tmp_path / "text_column", [(f"{i}.png", red(i), {"text": f"red {i}"}) for i in range(3)])
    imagefolder(tmp_path / "broken", [("bad.png", b"\x89PNG not really", {"caption": "broken"})])
    imagefolder(tmp_path / "odd_captions", [("0.png", red(0), {"caption": {"en": "red"}}),
                                            ("1.png", red(1), {"caption": None}), ("2.png", red(2), {"caption": []})])
    imagefolder(tmp_path / "three", [(f"{i}.png", red(i), {"caption": f"red {i}"}) for i in range(3)])
    fill = [o.replace("{tmp}", str(tmp_path)) for o in overrides]
    rc = train_cli(tiny_args(tmp_path, "data.num_images=30", *fill))
    one_error_line(capsys, rc, expected.replace("{tmp}", str(tmp_path)))


@pytest.fixture(scope="module")
def pipe(tiny_run):
    return TextToImagePipeline.from_pretrained(tiny_run)


PIPELINE_CASES = [
    ({"prompts": []}, ValueError, 'prompts is empty; accepted: a list of one or more strings ("" = unconditional)'),
    ({"prompts": "a red circle"}, TypeError, "prompts must be a list of strings, e.g. [\"a red circle\"]; got a "
                                             "single string"),
    ({"prompts": None}, TypeError, "prompts must be a list of strings, e.g. [\"a red circle\"]; got NoneType"),
    ({"prompts": (p for p in ["a"])}, TypeError, "prompts must be a list of strings, e.g. [\"a red circle\"]; got "
                                                  "generator"),
    ({"prompts": {"a red circle": 1}}, TypeError, "prompts must be a list of strings, e.g. [\"a red circle\"]; got dict"),
    ({"prompts": ["a", 3]}, TypeError, "prompts[1]=3: not a string (int); accepted: a list of strings"),
    ({"num_steps": 0}, ValueError, "num_steps=0; accepted: an integer from 1 to 1000"),
    ({"num_steps": 2.5}, ValueError, "num_steps=2.5; accepted: an integer from 1 to 1000"),
    ({"num_steps": 10 ** 6}, ValueError, "num_steps=1000000; accepted: an integer from 1 to 1000"),
    ({"guidance_scale": -1.0}, ValueError, "guidance_scale=-1.0; accepted: a finite number >= 0 (1 = no guidance)"),
    ({"guidance_scale": math.nan}, ValueError, "guidance_scale=nan; accepted: a finite number >= 0"),
    ({"guidance_scale": math.inf}, ValueError, "guidance_scale=inf; accepted: a finite number >= 0"),  # black images
    ({"guidance_scale": "4"}, ValueError, "guidance_scale='4'; accepted: a finite number >= 0"),
    ({"seed": 2 ** 64}, ValueError, "seed=18446744073709551616; accepted: an integer from 0 to 2**64 - 1"),
    ({"seed": 2.5}, ValueError, "seed=2.5; accepted: an integer from 0 to 2**64 - 1"),
    ({"seed": "0"}, ValueError, "seed='0'; accepted: an integer from 0 to 2**64 - 1"),
    ({"sampler": "ddim"}, ValueError, "sampler='ddim'; accepted: euler, heun"),
    ({"batch_size": 0}, ValueError, "batch_size=0; accepted: an integer >= 1"),
]


@pytest.mark.parametrize("kwargs, error, message", PIPELINE_CASES, ids=[c[2][:30] for c in PIPELINE_CASES])
def test_pipeline_arguments(pipe, kwargs, error, message):
    with pytest.raises(error) as info:
        pipe(**{"prompts": ["a red circle"], "num_steps": 1, **kwargs})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_pipeline_run_directories(tiny_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not an exported mmdit run: no pipeline.json"):
        TextToImagePipeline.from_pretrained(tmp_path / "nowhere")
    other = tmp_path / "other"
    shutil.copytree(tiny_run, other, ignore=shutil.ignore_patterns("checkpoints", "latents"))
    config = json.loads((other / "dit/model/config.json").read_text())
    (other / "dit/model/config.json").write_text(json.dumps({**config, "width": 64}))  # another config's weights
    with pytest.raises(WeightsMismatchError, match=r"does not match its config.json: tensor .* has shape \(32, "):
        TextToImagePipeline.from_pretrained(other)
    (other / "dit/model/config.json").write_text(json.dumps(config))
    info = json.loads((other / "pipeline.json").read_text())
    (other / "pipeline.json").write_text(json.dumps({**info, "text_encoder": "no-such-org/no-such-model"}))
    with pytest.raises(TextEncoderLoadError, match="'no-such-org/no-such-model' could not be loaded") as error:
        TextToImagePipeline.from_pretrained(other)(["a red circle"], num_steps=1)
    assert "\n" not in str(error.value)


def test_pipeline_accepts_empty_long_and_non_ascii_prompts(pipe):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = pipe(("", "a red circle " * 100, "ein roter Kreis 🔴", "赤い円", "a red circle " * 100),
                      num_steps=1, batch_size=2)  # a tuple is a list of prompts too
    assert len(images) == 5 and all(im.size == (32, 32) for im in images)
    assert len([w for w in caught if "truncated" in str(w.message)]) == 1  # warned once, not per prompt


SAMPLE_CASES = [
    (["--num-images", "0"], "--num-images=0; accepted: an integer from 1 to 64"),
    (["--num-images", "1000000000"], "--num-images=1000000000; accepted: an integer from 1 to 64"),
    (["--scale", "100000"], "--scale=100000; accepted: an integer from 1 to 8"),
    (["--steps", "0"], "--steps=0; accepted: an integer from 1 to 1000"),
    (["--guidance", "-1"], "--guidance=-1.0; accepted: a finite number >= 0 (1 = no guidance)"),
    (["--guidance", "nan"], "--guidance=nan; accepted: a finite number >= 0"),
    (["--guidance", "inf"], "--guidance=inf; accepted: a finite number >= 0"),
    (["--seed", "18446744073709551616"], "--seed=18446744073709551616; accepted: an integer from 0 to 2**64 - 1"),
    (["--seed", "2.5"], "argument --seed: invalid int value: '2.5'"),
    (["--sampler", "ddim"], "argument --sampler: invalid choice: 'ddim'"),
    (["--steps", "two"], "argument --steps: invalid int value: 'two'"),
    (["--model", "{tmp}/nowhere"], "nowhere is not an exported mmdit run: no pipeline.json"),
    (["--out", "{tmp}/file.txt/grid.png"], "--out={tmp}/file.txt/grid.png cannot be written"),
    (["--out", "{tmp}"], "is a directory; accepted: a file path"),
    (["--out", "{tmp}/grid.xyz"], "--out={tmp}/grid.xyz: PIL writes no RGB image format named '.xyz'; accepted: .png"),
    (["--out", "/proc/grid.png"], "--out=/proc/grid.png cannot be written: /proc is not a writable directory"),
    (["--strength", "0.5"], "--strength was given without --image; accepted: --strength with --image IN.png"),
    (["--mask", "{tmp}/in.png"], "--mask was given without --image; accepted: --mask with --image IN.png"),
    (["--image", "{tmp}/in.png", "--strength", "1.5"], "strength=1.5; accepted: a number in (0, 1]"),
    (["--image", "{tmp}/missing.png"], "--image={tmp}/missing.png: not an image file PIL can read"),
    (["--image", "{tmp}/file.txt"], "--image={tmp}/file.txt: not an image file PIL can read"),
    (["--image", "{tmp}/in.png", "--mask", "{tmp}/wide.png"], "--mask is 64x32 but the image is 32x32; accepted: a "
                                                              "mask of the image's aspect ratio"),
]


@pytest.mark.parametrize("args, expected", SAMPLE_CASES, ids=[c[1][:30] for c in SAMPLE_CASES])
def test_sample_cli(tiny_run, tmp_path, capsys, args, expected):
    (tmp_path / "file.txt").write_text("not a directory")
    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    Image.new("L", (64, 32)).save(tmp_path / "wide.png")
    argv = ["--model", str(tiny_run), "--prompt", "a red circle", "--out", str(tmp_path / "grid.png"),
            *[a.replace("{tmp}", str(tmp_path)) for a in args]]
    one_error_line(capsys, sample_cli(argv), expected.replace("{tmp}", str(tmp_path)))


# A damaged export: (file, the damage, what the line says after the file's path). Each fails in the sample and
# eval CLIs (exit code 2) and in from_pretrained (ExportError) with one line naming the file.
DAMAGED = {
    "truncated weights": ("dit/model/model.safetensors", lambda b: b[:-100],
                          "not a readable safetensors file (Error while deserializing header: incomplete metadata"),
    "huge header length": ("vqvae/model/model.safetensors", lambda b: (2 ** 62).to_bytes(8, "little") + b[8:],
                           "not a readable safetensors file (Error while deserializing header: header too large)"),
    "pipeline.json not JSON": ("pipeline.json", lambda b: b[:-5], "not readable JSON"),
    "pipeline.json wrong field": ("pipeline.json", lambda b: json.dumps({**json.loads(b), "latent_mean": "x"}).encode(),
                                  "latent_mean='x'; accepted: a list of numbers, one per latent channel"),
    "config.json unknown key": ("dit/model/config.json", lambda b: json.dumps({**json.loads(b), "widht": 8}).encode(),
                                "unknown key 'widht'; accepted keys: patch_size, width"),
}


@pytest.mark.parametrize("damage", DAMAGED)
def test_damaged_run_is_one_line(tiny_run, tmp_path, capsys, damage):
    name, corrupt, says = DAMAGED[damage]
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoints", "latents", "tensorboard"))
    (run / name).write_bytes(corrupt((run / name).read_bytes()))
    expected = f"{run / name}: {says}"
    with pytest.raises(ExportError) as error:
        TextToImagePipeline.from_pretrained(run)
    assert expected in str(error.value) and "\n" not in str(error.value)
    one_error_line(capsys, sample_cli(["--model", str(run), "--prompt", "x", "--out", str(tmp_path / "g.png")]),
                   expected)
    one_error_line(capsys, eval_cli(["--model", str(run), "--out", str(tmp_path / "eval")]), expected)


def test_sample_cli_requires_a_prompt(tiny_run, capsys):
    one_error_line(capsys, sample_cli(["--model", str(tiny_run)]), "the following arguments are required: --prompt")


def test_sample_cli_unconditional_and_emoji_prompts(tiny_run, tmp_path, capsys):
    out = tmp_path / "new" / "grid.png"
    assert sample_cli(["--model", str(tiny_run), "--prompt", "", "--prompt", "a red circle 🔴 über", "--num-images",
                       "2", "--steps", "1", "--out", str(out)]) == 0
    assert Image.open(out).height > 2 * 32


def test_text_encoder_errors_are_one_line():
    with pytest.raises(TextEncoderLoadError) as error:
        TextEncoder("no-such-org/no-such-model")
    assert "no-such-org/no-such-model" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(TextEncoderLoadError, match="max_length=0 is not valid .*accepted: 1 to 512"):
        TextEncoder(None, max_length=0)
