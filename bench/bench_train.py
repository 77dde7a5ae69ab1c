"""Benchmark one DiT training step: forward + backward + grad clip + AdamW (fused) + EMA (foreach lerp), through
mmdit.trainer.train_step and ema_update, the functions fit runs, on random inputs.

    python bench/bench_train.py [--setting matched,default,gpu] [--mode cross,joint] [--dtype fp32,bf16]
                                [--device cpu|cuda] [--threads 1] [--reps 3] [--compare-diffusers] [--compile]

Settings: `matched` = the speed issue's config (batch 64, 8x8x8 latents, patch 1, width 256, depth 6,
heads 4, 16 text tokens of dim 384); `default` = the DiT stage of configs/shapes.yaml; `gpu` = the DiT-B/2
stage of configs/imagefolder-256-gpu.yaml (32x32x8 latents, 77 tokens of 768, batch 64). Per row: ms/step,
samples/s, FLOPs of a step (torch FlopCounterMode: matmuls, convolutions, attention), the GFLOP/s achieved
and its fraction of a square matmul of the same dtype timed interleaved with the steps (this machine's
attainable GEMM rate, under the same load), the activations saved for backward (saved_tensors_hooks,
unique storages, parameters excluded) and weights + grads + AdamW moments + EMA. `--compare-diffusers`
adds diffusers' PixArtTransformer2DModel (cross) / SD3Transformer2DModel (joint) at the same config,
interleaved, the ratio mmdit/diffusers in samples/s, and the ratio's bound: diffusers' step time over
mmdit's FLOPs at the matmul peak (no implementation of the same model can beat it). `--compile` adds
torch.compile'd mmdit with its compile time (fp32, and bf16 where the device runs it natively).
bf16 = autocast, as accelerate's mixed_precision=bf16; on a CPU without native bf16 (AMX / AVX512-BF16)
it runs at `--bf16-batch` (default 2): a full step would take minutes. `--device cuda`: every timed call
ends with a synchronize, fp32 matmuls use TF32, the peak is an 8192^2 product of the same dtype, and
gpu_peak_MB is the allocator's peak over one step.
"""
from __future__ import annotations

import argparse
import resource
import time

import _common
import torch
from accelerate import Accelerator
from _common import (
    DTYPES,
    Setting,
    build,
    interleaved,
    machine,
    matmul,
    native_bf16,
    peer,
    random_text,
    set_device,
    set_threads,
    settings,
    table,
)
from torch.utils import flop_counter

from mmdit import trainer
from mmdit.flow import flow_loss, sample_t

# FlopCounterMode knows the CUDA attention kernels only; count the CPU flash kernel with the same formulas.
aten = torch.ops.aten
flop_counter.flop_registry.setdefault(aten._scaled_dot_product_flash_attention_for_cpu,
                                      flop_counter.flop_registry[aten._scaled_dot_product_flash_attention])
flop_counter.flop_registry.setdefault(aten._scaled_dot_product_flash_attention_for_cpu_backward,
                                      flop_counter.flop_registry[aten._scaled_dot_product_flash_attention_backward])


def inputs(s: Setting, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c = s.cfg
    x0 = torch.randn(batch, c.in_channels, c.input_size, c.input_size, generator=g)
    x0, t, noise = (v.to(_common.DEVICE) for v in (x0, sample_t(batch, generator=g), torch.randn(x0.shape, generator=g)))
    return (x0, t, noise, *random_text(s, batch, seed))


def loss_of(model, batch_inputs) -> torch.Tensor:
    x0, t, noise, text, mask, pooled = batch_inputs
    return flow_loss(lambda x, t_: model(x, t_, text, mask, pooled), x0, t, noise).mean()


def shared_accelerator() -> Accelerator:
    """accelerate keeps one state per process: every call returns an Accelerator over it."""
    return Accelerator(cpu=_common.DEVICE.type == "cpu", mixed_precision="no")


def train_step(model, batch_inputs, dtype: torch.dtype):
    """A closure running one optimizer step exactly as trainer.fit does: mmdit.trainer.train_step (autocast,
    backward, clip, the guarded fused AdamW step), then the EMA update."""
    accelerator = shared_accelerator()
    params = [p for p in model.parameters() if p.requires_grad]
    model, opt = accelerator.prepare(model, torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.99), fused=True))
    ema = [p.detach().clone() for p in params]
    precision = "bf16" if dtype == torch.bfloat16 else "no"

    def step():
        *_, bad, _ = trainer.train_step(accelerator, model, opt, [batch_inputs], lambda m, b: (loss_of(m, b), {}),
                                        precision, grad_clip=1.0)
        trainer.ema_update(ema, params, step=1000, decay=0.999, bad=bad)
    return step


def step_flops(model, s: Setting) -> float:
    """FLOPs of forward + backward per sample: counted at batch 1 (every op here is linear in the batch)."""
    with flop_counter.FlopCounterMode(display=False) as counter:
        loss_of(model, inputs(s, 1)).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def saved_mb(model, step) -> float:
    """Run `step`, return the MB of tensors autograd saved for backward (unique storages, not parameters)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values()) / 2 ** 20


def gpu_peak_mb(step) -> float | None:
    """MB the CUDA allocator peaks at over one more `step` (activations + state + workspace); None on the CPU."""
    if _common.DEVICE.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats()
    step()
    return torch.cuda.max_memory_allocated() / 2 ** 20


def bench(s: Setting, dtype_name: str, impls: list[str], reps: int, compile_: bool, bf16_batch: int) -> list[dict]:
    dtype = DTYPES[dtype_name]
    batch = s.batch if dtype == torch.float32 or native_bf16() else bf16_batch
    shared_accelerator().free_memory()  # forget the previous setting's prepared models
    models = {impl: build(impl, s.cfg) for impl in impls}
    batch_inputs = inputs(s, batch)
    steps = {impl: train_step(m, batch_inputs, dtype) for impl, m in models.items()}
    flops = {impl: step_flops(m, s) * batch for impl, m in models.items()}
    mem = {impl: saved_mb(m, steps[impl]) for impl, m in models.items()}  # also the warmup step
    gpu_mem = {impl: gpu_peak_mb(step) for impl, step in steps.items()}
    notes = {}
    if compile_:
        models["mmdit+compile"] = torch.compile(models["mmdit"])
        steps["mmdit+compile"] = train_step(models["mmdit+compile"], batch_inputs, dtype)
        flops["mmdit+compile"], mem["mmdit+compile"] = flops["mmdit"], None
        start = time.perf_counter()
        steps["mmdit+compile"]()  # compiles forward and backward
        notes["mmdit+compile"] = time.perf_counter() - start
        gpu_mem["mmdit+compile"] = gpu_peak_mb(steps["mmdit+compile"])
    mm, mm_flops = matmul(dtype)
    seconds = interleaved({**steps, "matmul": mm}, reps, warmup=0)
    peak = mm_flops / seconds["matmul"] / 1e9
    rows = []
    for impl, sec in seconds.items():
        if impl == "matmul":
            continue
        n_params = sum(p.numel() for p in models[impl].parameters())
        row = {"setting": s.name, "mode": s.cfg.mode, "dtype": dtype_name, "impl": impl, "batch": batch,
               "params_M": n_params / 1e6, "ms/step": 1e3 * sec, "samples/s": batch / sec,
               "GFLOP/step": flops[impl] / 1e9, "GFLOP/s": flops[impl] / sec / 1e9,
               "%peak": 100 * flops[impl] / sec / 1e9 / peak, "peak_GFLOP/s": peak,
               "saved_MB": mem[impl], "state_MB": 5 * 4 * n_params / 2 ** 20,  # w, grad, 2 moments, EMA
               "gpu_peak_MB": gpu_mem.get(impl)}
        if impl in notes:
            row["note"] = f"compile {notes[impl]:.0f}s, x{seconds['mmdit'] / sec:.2f} vs eager"
        rows.append(row)
    if "diffusers" in seconds:
        bound = seconds["diffusers"] / (flops["mmdit"] / peak / 1e9)
        rows[0]["note"] = f"x{seconds['diffusers'] / seconds['mmdit']:.2f} vs {peer(s.cfg.mode)} (bound x{bound:.2f})"
        rows[1]["impl"] = f"diffusers {peer(s.cfg.mode)}"
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", default="matched,default", help="comma list of: matched, default, gpu")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--mode", default="cross,joint", help="comma list of: cross, joint")
    p.add_argument("--dtype", default="fp32,bf16", help="comma list of: fp32, bf16")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    p.add_argument("--reps", type=int, default=3, help="timed steps per candidate (median)")
    p.add_argument("--bf16-batch", type=int, default=2, help="batch for bf16 without native bf16 support")
    p.add_argument("--compare-diffusers", action="store_true")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd mmdit (fp32)")
    a = p.parse_args()
    for name, value, accepted in (("--setting", a.setting, {"matched", "default", "gpu"}),
                                  ("--mode", a.mode, {"cross", "joint"}), ("--dtype", a.dtype, set(DTYPES))):
        if not set(value.split(",")) <= accepted:
            p.error(f"{name}={value!r}; accepted: a comma list of {', '.join(sorted(accepted))}")
    set_threads(a.threads)
    set_device(a.device)
    impls = ["mmdit", "diffusers"] if a.compare_diffusers else ["mmdit"]
    rows = []
    for setting_name in a.setting.split(","):
        for mode in a.mode.split(","):
            s = next(x for x in settings(mode) if x.name == setting_name)
            for dtype_name in a.dtype.split(","):
                compile_ = a.compile and (dtype_name == "fp32" or native_bf16())
                rows += bench(s, dtype_name, impls, a.reps, compile_, a.bf16_batch)
                print(table(rows[-len(impls) - compile_:],
                            ["setting", "mode", "dtype", "impl", "ms/step", "samples/s"]), flush=True)
    print(f"\n# bench_train: {machine()}; median of {a.reps} interleaved steps; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    print(table(rows, ["setting", "mode", "dtype", "impl", "batch", "params_M", "ms/step", "samples/s", "GFLOP/step",
                       "GFLOP/s", "peak_GFLOP/s", "%peak", "saved_MB", "state_MB",
                       *(["gpu_peak_MB"] if a.device != "cpu" else []), "note"]))


if __name__ == "__main__":
    main()
