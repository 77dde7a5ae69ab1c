import re

import pytest
import yaml

from mmdit.cli import check_writable
from mmdit.config import Config, ConfigError, load_config


def test_defaults_and_yaml(tmp_path):
    assert load_config().data.resolution == 32
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  resolution: 64\n  holdout: [yellow triangle]\ntrain:\n  seed: 3\n")
    cfg = load_config(path)
    assert (cfg.data.resolution, cfg.data.holdout, cfg.train.seed) == (64, ["yellow triangle"], 3)
    assert cfg.text_encoder.max_length == Config().text_encoder.max_length


def test_overrides_are_typed():
    cfg = load_config(None, ["data.resolution=48", "data.streaming=true", "text_encoder.name=t5-small",
                             "data.holdout=[large cyan, red]", "text_encoder.name=null", "data.path=123",
                             "dit_train.lr=1e-3"])
    assert cfg.dit_train.lr == 0.001
    assert cfg.data.resolution == 48 and cfg.data.streaming is True
    assert cfg.data.holdout == ["large cyan", "red"]
    assert cfg.text_encoder.name is None
    assert cfg.data.path == "123"  # a string field takes a number as its text


def test_yaml_1_1_words_are_text_for_str_fields_and_booleans_for_bool_fields(tmp_path):
    """YAML 1.1 reads no/yes/on/off as booleans: `mixed_precision: no` used to arrive as False and be refused."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\ndata:\n  name: off\n  holdout: [yes, On]\n  streaming: on\n"
                    "text_encoder:\n  trust_remote_code: No\n")
    cfg = load_config(path)
    assert (cfg.train.mixed_precision, cfg.data.name, cfg.data.holdout) == ("no", "off", ["yes", "On"])
    assert cfg.data.streaming is True and cfg.text_encoder.trust_remote_code is False
    cfg = load_config(None, ["train.mixed_precision=no", "dit_train.sample_prompts=[yes, no]", "data.streaming=yes",
                             "text_encoder.trust_remote_code=off", "data.train_split=on"])
    assert (cfg.train.mixed_precision, cfg.dit_train.sample_prompts, cfg.data.train_split) == ("no", ["yes", "no"], "on")
    assert cfg.data.streaming is True and cfg.text_encoder.trust_remote_code is False
    assert load_config(None, ["data.streaming=FALSE"]).data.streaming is False
    cfg.save(tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


def test_shipped_configs_load():
    cfg = load_config("configs/shapes.yaml")
    assert cfg.data.name == "shapes"


@pytest.mark.parametrize("overrides, expected", [
    (["data.resolutoin=64"], ["data.resolutoin", "valid keys", "resolution"]),
    (["dta.resolution=64"], ["dta", "valid keys", "data", "text_encoder"]),
    (["data.resolution=big"], ["data.resolution", "expected int", "'big'"]),
    (["data.resolution=1.5"], ["data.resolution", "expected int"]),
    (["data.streaming=3"], ["data.streaming", "expected bool"]),
    (["data.streaming=nope"], ["data.streaming", "expected bool, got 'nope'"]),
    (["train.mixed_precision=off"], ["train.mixed_precision='off'; accepted: auto, no, bf16, fp16"]),
    (["data.name=true"], ["data.name: expected str, got True"]),
    (["data.holdout=red"], ["data.holdout", "expected list of str"]),
    (["data.resolution"], ["section.key=value"]),
    (["resolution=3"], ["section.key"]),
    (["data.resolution.x=3"], ["data.resolution", "expected int"]),
    # Values that passed the type check and failed later (NaN passes every comparison), or meant the current dir.
    (["sample.guidance=.nan"], ["sample.guidance=nan; accepted: a finite number >= 0 (1 = no guidance)"]),
    (["sample.guidance=.inf"], ["sample.guidance=inf; accepted: a finite number >= 0"]),
    (["sample.seed=18446744073709551616"], ["sample.seed=18446744073709551616; accepted: an integer from 0 to 2**64"]),
    (["sample.seed=2.5"], ["sample.seed: expected int, got 2.5"]),
    (["sample.seed='0'"], ["sample.seed: expected int, got '0'"]),
    (["data.seed=4294967296"], ["data.seed=4294967296; accepted: an integer from 0 to 2**32 - 1"]),
    (["dit.depth=0"], ["dit.depth=0; accepted: an integer >= 1"]),
    (["dit.width=-8"], ["dit.width=-8; accepted: an integer >= 1"]),
    (["dit.heads=0"], ["dit.heads=0; accepted: an integer >= 1"]),
    (["dit.mlp_ratio=.nan"], ["dit.mlp_ratio=nan; accepted: a finite number > 0"]),
    (["vqvae.codebook_size=0"], ["vqvae.codebook_size=0; accepted: an integer >= 1"]),
    (["vqvae.code_dim=0"], ["vqvae.code_dim=0; accepted: an integer >= 1"]),
    (["vqvae.channels=0"], ["vqvae.channels=0; accepted: an integer >= 1"]),
    (["vqvae.num_res_blocks=-1"], ["vqvae.num_res_blocks=-1; accepted: an integer >= 0"]),
    (["vqvae.channel_mult=[]"], ["vqvae.channel_mult=[]; accepted: a non-empty list of integers >= 1"]),
    (["vqvae.channel_mult=[1, 0]"], ["vqvae.channel_mult=[1, 0]; accepted: a non-empty list of integers >= 1"]),
    (["data.name="], ["data.name='': empty; accepted: shapes, scenes, a Hugging Face dataset name or a local dataset"]),
    (["data.path=' '"], ["data.path=' ': empty; accepted: the directory of the shapes dataset"]),
    (["train.output_dir="], ["train.output_dir='': empty; accepted: a directory path"]),
])
def test_bad_overrides_name_the_key(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    for text in expected:
        assert text in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("data:\n  colour: red\n")
    with pytest.raises(ConfigError, match=r"unknown key 'data.colour'.*valid keys: name, path"):
        load_config(unknown)


def test_check_writable_really_writes(tmp_path):
    check_writable(tmp_path / "new" / "run", "train.output_dir")  # created later: its nearest existing parent counts
    check_writable(tmp_path / "grid.png", "--out", is_file=True)
    (tmp_path / "file").write_text("")
    check_writable(tmp_path / "file", "--out", is_file=True)  # overwritten
    with pytest.raises(ConfigError, match=re.escape(f"output_dir={tmp_path}/file is a file; accepted: a directory")):
        check_writable(tmp_path / "file", "train.output_dir")
    with pytest.raises(ConfigError, match=re.escape(f"--out={tmp_path} is a directory; accepted: a file path")):
        check_writable(tmp_path, "--out", is_file=True)
    # os.access says /proc is writable to root, but nothing can be created there.
    with pytest.raises(ConfigError, match="train.output_dir=/proc/run cannot be written: /proc is not a writable"):
        check_writable("/proc/run", "train.output_dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # the probe files are gone


def test_save_round_trip(tmp_path):
    cfg = load_config(None, ["train.seed=7", "data.holdout=[a]"])
    cfg.save(tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["seed"] == 7
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("name", ["1gpu-bf16", "8gpu-ddp", "multinode-ddp", "fsdp-full-shard"])
def test_accelerate_configs_are_valid(name):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    cfg = load_config_from_file(f"configs/accelerate/{name}.yaml")  # unknown top-level keys are an error here
    assert cfg.num_processes >= cfg.num_machines >= 1 and cfg.mixed_precision in ("no", "bf16")
    launch_options = {a.dest for a in launch_command_parser()._actions}
    assert set(cfg.fsdp_config) <= launch_options  # accelerate launch silently ignores unknown FSDP keys


def test_sizes_the_data_fix_are_not_keys_and_any_dividing_patch_size_is_accepted():
    # 48 px at f4 is a 12x12 latent grid: patch 3 divides it (a DiTConfig that held a default input_size of 8
    # refused this, naming a key the user never set).
    cfg = load_config("configs/shapes.yaml", ["data.resolution=48", "dit.patch_size=3"])
    built = cfg.dit.for_data(in_channels=cfg.vqvae.code_dim, input_size=48 // cfg.vqvae.downsample, text_dim=384,
                             codebook_size=cfg.vqvae.codebook_size)
    assert (built.input_size, built.patch_size, built.width) == (12, 3, cfg.dit.width)
    for key in ("in_channels", "input_size", "text_dim", "codebook_size"):
        with pytest.raises(ConfigError, match=f"unknown key 'dit.{key}'"):
            load_config(None, [f"dit.{key}=8"])
    with pytest.raises(ValueError, match=r"latent grid is 12x12 .* not divisible by dit.patch_size=5"):
        load_config(None, ["dit.patch_size=5"]).dit.for_data(in_channels=8, input_size=12, text_dim=384,
                                                                    codebook_size=64)


def test_sample_section_is_the_sampling_options():
    from mmdit.sampling import SampleOptions

    cfg = load_config(None, ["sample.steps=7", "sample.sampler=heun"])
    assert cfg.sample == SampleOptions(steps=7, sampler="heun")
    assert cfg.sample.override(steps=None, seed=3) == SampleOptions(steps=7, sampler="heun", seed=3)
    with pytest.raises(ConfigError, match=r"sample.sampler='rk4'; accepted: euler, heun, maskgit"):
        load_config(None, ["sample.sampler=rk4"])
