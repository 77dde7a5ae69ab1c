"""Benchmark the sharded, memory-mapped caches at scale: build a synthetic cache of N rows, then train the DiT
from it.

    python bench/bench_cache.py --rows 1000000 [--procs 2] [--dir /tmp/bench-cache] [--steps 50] [--keep]

The build runs the real code paths (CaptionCache.encode_all planning and sharding, ShardStore writes, caption
rows resolved per latent row) with random stand-ins for the models, at the default shapes (configs/shapes.yaml:
16 caption tokens of 384 in bf16, 8x8 codes of 1024): `--procs` build processes, each encoding its share of
the caption shards and of the latent shards, as the text and vqvae stages do. Captions are deduplicated as web
captions are: 30% of the rows take one of 1,000 stock captions ("a photo", ...), the rest are their own.
Then, in this process (which built nothing), the DiT stage's own path: DiTBatches through the maps (flow
objective; the empty caption's row looked up as the stage does) trains the default DiT for `--steps` steps on
one thread, batch assembly is also timed alone (1000 batches read once to warm the page cache, then timed
from it, then timed again with the cache files' pages dropped, as a cache larger than memory is read), and a
sample grid of the default prompts is drawn from the cache (`sample_grid`, 2 sampler steps).
Prints build rows/s (caption rows and latent rows), batch-assembly samples/s warm and cold (per second of wall
time, and per second of the process's CPU time: one core's rate on a shared machine), DiT steps/s, and the peak
RSS of the builders and of the trainer (ru_maxrss).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (the repository root on sys.path, like the other benchmarks)
import torch

from mmdit import latents
from mmdit.config import load_config
from mmdit.data.order import batch_indices
from mmdit.dit import DiT
from mmdit.shards import ShardStore, split_rows
from mmdit.pipeline import PipelineInfo, TextToImagePipeline
from mmdit.sampling import SampleOptions
from mmdit.stages.dit import DiTBatches, sample_grid
from mmdit.text_encoder import CaptionCache, TextEmbeddings
from mmdit.vqvae import VQVAE

CFG = load_config(_common.DEFAULT_CONFIG)
L, D, H = CFG.text_encoder.max_length, 384, CFG.data.resolution // 4  # 16 tokens of 384; 8x8 codes


class RandomEncoder:
    """A stand-in for the text encoder: fixed-length random states (bf16-exact) per caption."""
    id, max_length, dim = "random-bench-encoder", L, D

    def __call__(self, captions):
        g = torch.Generator().manual_seed(len(captions))
        n = len(captions)
        return TextEmbeddings(torch.randn(n, L, D, generator=g), torch.ones(n, L, dtype=torch.bool),
                              torch.randn(n, D, generator=g))


def caption(i: int) -> str:
    """Row i's caption: 30% one of 1,000 stock captions, the rest distinct."""
    h = (i * 2654435761) % 4294967296
    return f"stock caption {h % 1000}" if h % 10 < 3 else f"a photo of thing number {i}, seen from afar"


def build(rank: int, world: int, rows: int, root: Path, barrier, times) -> None:
    """One build process: its share of the caption shards, then of the latent shards."""
    torch.set_num_threads(1)
    cache = CaptionCache(RandomEncoder(), root / "captions")
    start = time.perf_counter()
    # as the text stage plans them: the empty caption and the sample prompts first
    captions = ["", *CFG.dit_train.sample_prompts] + [caption(i) for i in range(rows)] if rank == 0 else []
    cache.encode_all(captions, rank, world, barrier.wait)
    del captions
    times.put(("captions", rank, time.perf_counter() - start))
    start = time.perf_counter()
    key = latents.split_key("random-bench-vqvae", cache, "train", rows, 1)
    if rank == 0:
        ShardStore(root / "latents" / "train", key, latents.split_columns(H, 1), reset=True)
    barrier.wait()
    store = ShardStore(root / "latents" / "train", key)
    for lo, hi in split_rows(0, rows, latents.SHARD_ROWS)[rank::world]:
        g = torch.Generator().manual_seed(lo)
        texts = [[caption(i)] for i in range(lo, hi)]
        store.write(lo, {"indices": torch.randint(0, 1024, (hi - lo, H, H), dtype=torch.int32, generator=g),
                         "captions": latents.candidate_rows(texts, cache, 1)},
                    sidecar={"captions": texts, "columns": {}})
    barrier.wait()
    if rank == 0:
        store.set_meta(rows=rows)
    times.put(("latents", rank, time.perf_counter() - start))


def run_builders(rows: int, procs: int, root: Path) -> dict:
    ctx = mp.get_context("spawn")
    barrier, times = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=build, args=(r, procs, rows, root, barrier, times)) for r in range(procs)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
        if w.exitcode:
            raise SystemExit(f"build process failed with exit code {w.exitcode}")
    out: dict = {}
    while not times.empty():
        what, _, seconds = times.get()
        out[what] = max(out.get(what, 0.0), seconds)
    return out


def assembly_rate(batches: DiTBatches, steps: range) -> tuple[float, float]:
    """Samples assembled per second of wall time, and per second of this process's CPU time: what one core
    sustains, whatever else the machine runs (reads waiting on the disk count in the first, not in the second)."""
    start, cpu = time.perf_counter(), time.process_time()
    for step in steps:
        batches(step, 0, 1)
    samples = len(steps) * batches.cfg.batch_size
    return samples / (time.perf_counter() - start), samples / (time.process_time() - cpu)


def evict(root: Path) -> None:
    """Drop the cache files' pages from the page cache (no root needed: POSIX_FADV_DONTNEED on each file)."""
    for path in (p for p in root.rglob("*") if p.is_file()):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def train(rows: int, root: Path, steps: int) -> dict:
    """The DiT stage's reading path: DiTBatches over the maps; batch assembly timed alone, then `steps` steps."""
    torch.manual_seed(0)
    cache = CaptionCache(RandomEncoder(), root / "captions")
    cached = latents.LatentSplit(root / "latents", "train")
    vqvae = VQVAE(CFG.vqvae).eval()
    norm = latents.LatentNorm([0.0] * CFG.vqvae.code_dim, [1.0] * CFG.vqvae.code_dim)
    x = cached.indices.map(latents.FlowLatents(vqvae, norm), (CFG.vqvae.code_dim, H, H))
    tcfg = CFG.dit_train
    batches = DiTBatches(x, cached.captions, cache, tcfg, 0, torch.device("cpu"), "flow")
    timed = range(1, 1001)
    assembly_rate(batches, timed)  # warm-up: the rows these batches read are in the page cache after it
    assemble = assembly_rate(batches, timed)
    evict(root)  # the same batches as a cache larger than memory is read: every row from the disk
    cold = assembly_rate(batches, timed)

    dit = DiT(CFG.dit.for_data(in_channels=CFG.vqvae.code_dim, input_size=H, text_dim=D, codebook_size=1024))
    opt = torch.optim.AdamW(dit.parameters(), lr=tcfg.lr)
    start = time.perf_counter()
    for step in range(steps):
        loss, _ = batches.train_loss(dit, batches(timed.stop + step, 0, 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    steps_per_s = steps / (time.perf_counter() - start)
    assert len(batch_indices(0, rows, tcfg.batch_size, 0)) == tcfg.batch_size

    start = time.perf_counter()
    info = PipelineInfo(None, L, norm.mean, norm.std)
    pipe = TextToImagePipeline(dit.eval(), vqvae, info)
    sample_grid(pipe, cache, tcfg.sample_prompts, SampleOptions(steps=2), root / "samples.png")
    grid_s = time.perf_counter() - start
    return {"assemble": assemble, "cold": cold, "steps_per_s": steps_per_s, "loss": loss.item(), "grid_s": grid_s}


def size(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2 ** 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--procs", type=int, default=1, help="build processes")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--dir", type=Path, default=None, help="where the cache is built (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the cache (and reuse it: a rerun builds nothing)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = args.dir or Path(tempfile.mkdtemp(prefix="bench-cache-"))
    try:
        build_s = run_builders(args.rows, args.procs, root)
        build_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20
        result = train(args.rows, root, args.steps)
        train_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        print(f"machine: {_common.machine()}")
        print(f"rows {args.rows}, {args.procs} build process(es); cache on disk: captions "
              f"{size(root / 'captions'):.2f} GiB, latents {size(root / 'latents'):.3f} GiB")
        print(f"build: captions {args.rows / build_s['captions']:.0f} rows/s ({build_s['captions']:.1f} s), "
              f"latents {args.rows / build_s['latents']:.0f} rows/s ({build_s['latents']:.1f} s)")
        print(f"batch assembly: {result['assemble'][0]:.0f} samples/s, {result['assemble'][1]:.0f} samples per CPU "
              f"second (batch {CFG.dit_train.batch_size}, 1 thread)")
        print(f"the same batches from a cold page cache (the files' pages dropped): {result['cold'][0]:.0f} "
              f"samples/s, {result['cold'][1]:.0f} samples per CPU second")
        print(f"DiT: {args.steps} steps at {result['steps_per_s']:.2f} steps/s, last loss {result['loss']:.3f}")
        print(f"sample grid of {len(CFG.dit_train.sample_prompts)} prompts from the cache (2 sampler steps): "
              f"{result['grid_s']:.1f} s")
        print(f"peak RSS: builders {build_rss:.2f} GiB (largest process), trainer {train_rss:.2f} GiB")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
