"""`save_pretrained` / `from_pretrained` for every mmdit model: `config.json` (its config dataclass) +
`model.safetensors` (never pickle). A checkpoint that does not fit its config is a clear error naming the
first tensor that differs, not a page of missing keys."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file


class WeightsMismatchError(ValueError):
    """A weights file that does not fit the model its config describes (another config's checkpoint)."""


def save_pretrained(model: torch.nn.Module, directory: str | Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(asdict(model.cfg), indent=2))
    save_file(cpu_state(model), str(directory / "model.safetensors"))


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
    model = model_cls(config_cls(**json.loads((directory / "config.json").read_text())))
    weights = directory / "model.safetensors"
    state = load_file(str(weights))
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
