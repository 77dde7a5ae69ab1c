"""`save_pretrained` / `from_pretrained` for every mmdit model: `config.json` (its config dataclass) +
`model.safetensors` (never pickle). Each file is written atomically, so an interrupted save leaves the old
file or the new one, never half of one. A damaged file, or a checkpoint that does not fit its config, is one
line naming the file and what is wrong (for weights: the first tensor that differs), not a traceback."""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save


class ExportError(ValueError):
    """A damaged or foreign exported model or run; the message names the file and what is wrong."""


class WeightsMismatchError(ExportError):
    """A weights file that does not fit the model its config describes (another config's checkpoint)."""


def save_pretrained(model: torch.nn.Module, directory: str | Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / "model.safetensors", save(cpu_state(model)))
    atomic_write(directory / "config.json", json.dumps(dataclasses.asdict(model.cfg), indent=2).encode())


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as contiguous CPU tensors: what safetensors writes, from any device."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def from_pretrained(model_cls, config_cls, directory: str | Path):
    """Build `model_cls(config_cls(**config.json))`, load its weights, return it in eval mode."""
    directory = Path(directory)
    what = model_cls.__name__
    for name in ("config.json", "model.safetensors"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"no {what} in {directory}: {name} is missing "
                                    "(expected config.json and model.safetensors)")
    model = model_cls(load_dataclass(config_cls, directory / "config.json"))
    weights = directory / "model.safetensors"
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:  # truncated, a huge header length, not safetensors at all
        raise ExportError(f"{weights}: not a readable safetensors file ({e}); accepted: the file save_pretrained "
                          "writes (export the model again)") from None
    check_shapes({k: v.shape for k, v in state.items()}, model.state_dict(), weights, "its config.json")
    model.load_state_dict(state)
    return model.eval()


def check_shapes(found: dict[str, Sequence[int]], expected: dict[str, torch.Tensor], path: str | Path,
                 against: str = "this config") -> None:
    """WeightsMismatchError, in one line naming the first tensor that differs, if the tensor names and shapes
    `found` in the file at `path` are not those of the model's state dict `expected`."""
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if missing or unexpected:
        raise WeightsMismatchError(f"{path} does not match {against}: missing tensors {missing[:5]}, "
                         f"unexpected tensors {unexpected[:5]}")
    for name, tensor in expected.items():
        if tuple(found[name]) != tuple(tensor.shape):
            raise WeightsMismatchError(f"{path} does not match {against}: tensor {name} has shape "
                             f"{tuple(found[name])} in the checkpoint, {tuple(tensor.shape)} in the model")


def read_json(path: Path) -> dict:
    """The JSON object in `path`, or ExportError naming the file."""
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ExportError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(values, dict):
        raise ExportError(f"{path}: expected a JSON object, got {type(values).__name__}")
    return values


def load_dataclass(cls, path: Path):
    """`cls(**<the JSON object in path>)`: ExportError naming the file for an unknown or missing key, or a
    value the dataclass's own checks (__post_init__) refuse."""
    values = read_json(path)
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    unknown = [k for k in values if k not in names]
    missing = [f.name for f in fields if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if unknown or missing:
        what = f"unknown key {unknown[0]!r}" if unknown else f"missing key {missing[0]!r}"
        raise ExportError(f"{path}: {what}; accepted keys: {', '.join(names)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ExportError(f"{path}: {e}") from None


def try_write(directory: Path) -> None:
    """OSError unless a file can really be created (and is removed again) in `directory`."""
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
        pass


def atomic_write(path: Path, data: bytes) -> None:
    # A temp file in the same dir + os.replace: readers see the old file or the full new one.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
