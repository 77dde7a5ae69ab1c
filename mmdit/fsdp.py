"""FSDP in the training loop: what changes when accelerate shards the model (FSDP2, `fully_shard`).

Under FSDP each process holds only its shard of every parameter (a DTensor), of the gradients and of the
AdamW state. The loop needs whole weights in three places, and gets them by gathering (a collective: every
process calls it, at the same step):
- images and the trained model: a plain copy of the model, refreshed from the shards when needed;
- the EMA: kept as shards laid out like the parameters (updated locally, no communication), gathered into
  the plain EMA module for grids, checkpoints and export;
- checkpoints: the whole model and optimizer state, gathered to the main process and written as
  safetensors (+ JSON for the optimizer's hyper-parameters), never torch.distributed.checkpoint's pickled
  metadata; every process reads them back and keeps its shard. RNG states and the grad scaler are
  accelerate's files, as without FSDP.
Each transformer block is its own FSDP unit: the model names its block class in `_no_split_modules` (the
transformers convention accelerate reads); a model without one (the VQ-VAE) is sharded as one unit.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
from torch.distributed.tensor import DTensor, distribute_tensor

from mmdit.compat import load_accelerator_state, save_accelerator_state


def is_fsdp(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def set_wrap_classes(accelerator: Accelerator, model: torch.nn.Module) -> str:
    """Shard this model's blocks as units, whatever the launch config named (one config serves every stage
    and DiT mode). Returns how the model is split, for the log."""
    plugin = accelerator.state.fsdp_plugin
    policy = getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy)  # a partial after the first stage
    if policy is not transformer_auto_wrap_policy:
        return f"units by {getattr(policy, '__name__', 'no auto-wrap policy')}"
    plugin.transformer_cls_names_to_wrap = list(getattr(model, "_no_split_modules", None) or [])
    return f"each {', '.join(plugin.transformer_cls_names_to_wrap)} a unit" if plugin.transformer_cls_names_to_wrap \
        else "the whole model one unit"


def local(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """This process's part of each tensor: the shard of a DTensor (a view: in-place updates reach it)."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def shard_like(whole: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
    """`whole` tensors split the way the parameters `like` are (the same on every process)."""
    return [distribute_tensor(w.detach().to(p.device), p.device_mesh, p.placements) if isinstance(p, DTensor)
            else w.detach().clone() for w, p in zip(whole, like)]


@torch.no_grad()
def gather_into(module: torch.nn.Module, params: list[torch.Tensor], buffers: list[torch.Tensor] = ()) -> None:
    """Copy whole `params` (gathered from shards: a collective) into `module`'s parameters, in order, and
    `buffers` (never sharded: the VQ-VAE's codebook) into its buffers."""
    for mine, t in zip(module.parameters(), params):
        mine.copy_(t.full_tensor() if isinstance(t, DTensor) else t)
    for mine, t in zip(module.buffers(), buffers):
        mine.copy_(t)


def save_state(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               directory: Path) -> None:
    """The whole model and optimizer state, written by the main process as safetensors; RNG and scaler states
    by every process (accelerate's files). A collective."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on the main process only
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    directory.mkdir(parents=True, exist_ok=True)
    save_accelerator_state(str(directory), [], [], [], [], accelerator.process_index, accelerator.step,
                           accelerator.scaler)
    if accelerator.is_main_process:
        save_file({k: v.contiguous() for k, v in model_state.items()}, str(directory / "model.safetensors"))
        tensors, other = {}, {}
        for name, entries in optim_state["state"].items():  # {param name: {"exp_avg": ..., "step": ...}}
            for key, value in entries.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{name}:{key}"] = value.contiguous()
                else:
                    other[f"{name}:{key}"] = value
        save_file(tensors, str(directory / "optimizer.safetensors"))
        (directory / "optimizer.json").write_text(json.dumps({"param_groups": optim_state["param_groups"],
                                                              "scalars": other}))


def load_state(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               directory: Path) -> None:
    """Read what save_state wrote; each process keeps its shard."""
    meta = json.loads((directory / "optimizer.json").read_text())
    state: dict[str, dict] = {}
    for flat, value in [*load_file(str(directory / "optimizer.safetensors")).items(), *meta["scalars"].items()]:
        name, key = flat.rsplit(":", 1)
        state.setdefault(name, {})[key] = value
    set_state_dict(model, optimizer, model_state_dict=load_file(str(directory / "model.safetensors")),
                   optim_state_dict={"state": state, "param_groups": meta["param_groups"]},
                   options=StateDictOptions(full_state_dict=True))
    load_accelerator_state(str(directory), [], [], [], [], accelerator.process_index, accelerator.scaler)
