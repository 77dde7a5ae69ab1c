"""The private corners of torch and accelerate that mmdit relies on, each in one place with the reason.
The versions the tests have run them on bound the dependencies in pyproject.toml."""
from __future__ import annotations

import torch
from accelerate import Accelerator
# Not exported by accelerate's public API: the RNG / grad-scaler half of save_state, which FSDP checkpoints
# need without accelerate's own (pickled, torch.distributed.checkpoint) model and optimizer files.
from accelerate.checkpointing import load_accelerator_state, save_accelerator_state  # noqa: F401


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: oneDNN's own check, a private op (no public torch API says it)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def restart_accumulation(accelerator: Accelerator) -> None:
    """accelerate counts micro-batches across stages and resumes; a step must always run all of its own, so the
    counter (a plain attribute, no setter) starts at 0 with each stage."""
    accelerator.step = 0


def skip_step_if(optimizer, bad: torch.Tensor) -> None:
    """Make the next step of a fused AdamW a no-op on the device where `bad` (a 0-dim bool tensor) is true:
    its `found_inf` attribute, which torch's grad scaler sets (under fp16 the scaler sets its own). No host
    sync, unlike an `if`."""
    optimizer.optimizer.found_inf = bad.float()  # the torch optimizer inside accelerate's wrapper
