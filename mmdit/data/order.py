"""Which dataset rows a training step reads: an epoch's order is a keyed pseudo-random permutation of the rows,
computed for the positions a batch needs alone (no table of the rows), so that a batch is a pure function of
(seed, step) on any number of processes, however many rows the dataset has."""
from __future__ import annotations

import functools
import hashlib

import numpy as np
import torch


def batch_indices(step: int, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """The dataset rows shard `rank` of `world_size` trains on at `step`: a fresh permutation per epoch, a
    pure function of (step, seed), each shard taking its own slice of the global batch."""
    global_batch = batch_size * world_size
    per_epoch = n // global_batch
    if per_epoch == 0:
        raise ValueError(f"dataset has {n} rows, fewer than one global batch of {global_batch}; "
                         "lower the batch size")
    epoch, b = divmod(step, per_epoch)
    start = b * global_batch + rank * batch_size
    chunks = range(start // ORDER_CHUNK, (start + batch_size - 1) // ORDER_CHUNK + 1)
    order = torch.cat([_epoch_order(n, seed * 1_000_003 + epoch, c) for c in chunks])
    at = start - chunks[0] * ORDER_CHUNK
    return order[at:at + batch_size]


ORDER_CHUNK = 4096  # an epoch's order is computed this many positions at a time: numpy's per-call cost, amortised


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, key: int, chunk: int) -> torch.Tensor:
    """Positions [chunk * ORDER_CHUNK, ...) of the epoch's order of the n rows (<= ORDER_CHUNK,)."""
    return permute(torch.arange(chunk * ORDER_CHUNK, min((chunk + 1) * ORDER_CHUNK, n)), n, key)


def permute(i: torch.Tensor, n: int, key: int, rounds: int = 4) -> torch.Tensor:
    """Position i (B,) of a pseudo-random permutation of range(n), drawn from `key`, computed for these positions
    alone: no table of n entries (a LAION-sized epoch's order would take GBs on every process), O(B) per batch.
    A Feistel network is a bijection of range(2^(2h)), the smallest such range holding n; values that land at n
    or above are mapped again (cycle-walking) until they fall below n, which keeps it a bijection of range(n)."""
    h = np.uint64(max(1, (max(n - 1, 1).bit_length() + 1) // 2))  # half the bits: 2^(2h) < 4n
    mask, m32, mult, s16 = (np.uint64(1) << h) - np.uint64(1), np.uint64(0xFFFFFFFF), np.uint64(0x45D9F3B), np.uint64(16)
    keys = np.frombuffer(hashlib.blake2b(str(key).encode(), digest_size=4 * rounds).digest(), np.uint32).astype(np.uint64)
    x = i.numpy().astype(np.uint64)
    todo = np.ones(len(x), dtype=bool)
    while todo.any():
        left, right = x >> h, x & mask
        for k in keys:  # the round function: a 32-bit integer hash of the right half and the round's key
            f = ((right ^ k) & m32) * mult & m32
            f = (f ^ (f >> s16)) * mult & m32
            left, right = right, left ^ (f ^ (f >> s16)) & mask
        x = np.where(todo, (left << h) | right, x)
        todo = x >= n
    return torch.from_numpy(x.astype(np.int64))
