"""Sharded tensor stores on disk: what the latent cache and the caption cache are kept in, so that both scale
with the disk instead of with memory.

A store is a directory:

    index.json                                   {"format", "key", "columns": {name: {shape, dtype}}, "meta"}
    rows-000000000000-000000004096.safetensors   rows [0, 4096): one U8 tensor "rows" (4096, row bytes), each
                                                 row its columns' bytes side by side (layout in the metadata)
    rows-000000000000-000000004096.json          optional sidecar: what the caller keeps per shard (captions)

Every row is addressed by its global row number; a shard's name is its row range, so any process can write
any shard without coordination, and a build resumes by writing only the shards that are missing. `key`
names the producer (the VQ-VAE weights, the text encoder): a store built by another one is refused in one
line. Shards are written atomically (temp file + rename) with a CRC32 of their rows in their metadata;
`complete(..., verify=True)` checks it, so a damaged shard is reported with its path and rebuilt. Readers
read only the rows a batch asks for, through the page cache (`ShardReader` says why not memory maps): a
process's memory does not grow with the rows.
"""
from __future__ import annotations

import json
import os
import re
import struct
import uuid
import warnings
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save

from mmdit.weights import atomic_write

FORMAT = 1
SHARD = re.compile(r"rows-(\d{12})-(\d{12})\.safetensors")
DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64,
          "I32": torch.int32, "I16": torch.int16, "U8": torch.uint8, "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}
# the numpy dtype a batch is read into (then viewed as the torch one): bf16 travels as its int16 bits
NUMPY = {torch.float32: np.float32, torch.bfloat16: np.int16, torch.float16: np.float16, torch.int64: np.int64,
         torch.int32: np.int32, torch.int16: np.int16, torch.uint8: np.uint8, torch.bool: np.bool_}


class CacheError(ValueError):
    """A cache that cannot be used (another producer's, missing, damaged); the message is one line."""


def split_rows(start: int, end: int, shard_rows: int) -> list[tuple[int, int]]:
    """The shard ranges covering rows [start, end), `shard_rows` each (the last one shorter)."""
    return [(s, min(s + shard_rows, end)) for s in range(start, end, shard_rows)]


def _header(buf) -> tuple[dict, int]:
    """safetensors' layout: u64 header length, the JSON header, then the data. -> (header, data offset)."""
    if len(buf) < 8:
        raise ValueError("shorter than a safetensors header")
    (n,) = struct.unpack("<Q", buf[:8])
    if n > len(buf) - 8:
        raise ValueError(f"header length {n} runs past the end of the file ({len(buf)} bytes)")
    return json.loads(bytes(buf[8:8 + n])), 8 + n


class ShardStore:
    """One store directory; `key` must match the one it was created with (`reset` empties a foreign one
    instead: a builder replacing an outdated cache). `columns` {name: (row shape, dtype)} is needed to create
    it; a reader passes None and takes the recorded ones."""

    def __init__(self, directory: str | Path, key: dict, columns: dict | None = None, reset: bool = False):
        self.dir, self.key = Path(directory), key
        index = self.dir / "index.json"
        found = json.loads(index.read_text()) if index.is_file() else None
        if found is not None and found.get("key") != key:
            if not reset:
                theirs = {k: v for k, v in found.get("key", {}).items() if key.get(k) != v}
                raise CacheError(f"{self.dir} was built for {theirs}, not for {key}; accepted: a cache built "
                                 "by this run's models (run the stage that builds it again, or delete the directory)")
            for path in self.dir.glob("rows-*"):
                path.unlink()
            found = None
        if found is None:
            if columns is None:
                raise CacheError(f"{self.dir}: no cache here (no index.json); accepted: a directory the stage "
                                 "that builds this cache has written")
            self.dir.mkdir(parents=True, exist_ok=True)
            found = {"format": FORMAT, "key": key, "meta": {},
                     "columns": {k: {"shape": list(shape), "dtype": NAMES[dtype]} for k, (shape, dtype) in columns.items()}}
            atomic_write(index, json.dumps(found, indent=1).encode())
        self.columns = {k: (tuple(v["shape"]), DTYPES[v["dtype"]]) for k, v in found["columns"].items()}
        self.meta = found.get("meta", {})
        # A row's columns packed side by side, each 8-byte aligned: a batch reads one range per row.
        self.layout, at = {}, 0
        for name, (shape, dtype) in self.columns.items():
            size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            self.layout[name], at = (at, size), at + -(-size // 8) * 8
        self.row_bytes = at
        self._layout = {k: [*v, list(self.columns[k][0]), NAMES[self.columns[k][1]]] for k, v in self.layout.items()}

    def set_meta(self, **meta) -> None:
        """Record what a finished build knows (row count, ...) in index.json; one process calls it."""
        self.meta = {**self.meta, **meta}
        index = {"format": FORMAT, "key": self.key, "meta": self.meta,
                 "columns": {k: {"shape": list(s), "dtype": NAMES[d]} for k, (s, d) in self.columns.items()}}
        atomic_write(self.dir / "index.json", json.dumps(index, indent=1).encode())

    def instance(self) -> str:
        """A random id of this store, made once when first asked (the first of racing processes wins): what
        refers to its rows from elsewhere records it, so that a store deleted and built again, whose rows may
        differ, is not mistaken for the old one."""
        path = self.dir / "instance"
        if not path.is_file():
            tmp = self.dir / f".instance-{uuid.uuid4().hex}"
            tmp.write_text(uuid.uuid4().hex)
            try:
                os.link(tmp, path)  # atomic and exclusive: an existing id is never replaced
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        return path.read_text()

    def path(self, start: int, end: int, suffix: str = ".safetensors") -> Path:
        return self.dir / f"rows-{start:012d}-{end:012d}{suffix}"

    def shards(self, suffix: str = ".safetensors") -> list[tuple[int, int]]:
        """The row ranges of the shard files present (complete or not; with suffix=".json": the sidecars), in
        row order."""
        found = (SHARD.fullmatch(p.name[:-len(suffix)] + ".safetensors") for p in self.dir.glob(f"rows-*{suffix}"))
        return sorted((int(m[1]), int(m[2])) for m in found if m)

    def write(self, start: int, tensors: dict[str, torch.Tensor], sidecar=None) -> None:
        """Rows [start, start + len) of every column, atomically; the sidecar JSON (if any) first, so that a
        shard whose tensors exist always has it."""
        n = {len(t) for t in tensors.values()}
        if tensors.keys() != self.columns.keys() or len(n) != 1:
            raise ValueError(f"a shard needs columns {sorted(self.columns)} of equal length, got "
                             f"{ {k: tuple(t.shape) for k, t in tensors.items()} }")
        end = start + n.pop()
        for name, t in tensors.items():
            shape, dtype = self.columns[name]
            if tuple(t.shape[1:]) != shape or t.dtype != dtype:
                raise ValueError(f"column {name}: rows of {tuple(t.shape[1:])} {t.dtype}, expected {shape} {dtype}")
        if sidecar is not None:
            atomic_write(self.path(start, end, ".json"), json.dumps(sidecar).encode())
        packed = torch.zeros(end - start, self.row_bytes, dtype=torch.uint8)  # (n, row bytes)
        for name, t in tensors.items():
            at, size = self.layout[name]
            packed[:, at:at + size] = t.detach().cpu().contiguous().reshape(end - start, -1).view(torch.uint8)
        meta = json.dumps({"crc32": f"{zlib.crc32(packed.numpy()):08x}", "layout": self._layout}, sort_keys=True)
        atomic_write(self.path(start, end), save({"rows": packed}, metadata={"mmdit": meta}))  # one key: stable bytes

    def complete(self, start: int, end: int, verify: bool = True, sidecar: bool = False) -> bool:
        """Whether the shard of rows [start, end) is there and sound (with `verify`, its checksums too; with
        `sidecar`, its JSON as well). A damaged shard is reported with its path and removed, to be rebuilt."""
        path = self.path(start, end)
        if not path.is_file():
            return False
        try:
            _open_shard(path, end - start, self.row_bytes, verify)
            if sidecar:
                json.loads(self.path(start, end, ".json").read_text())
        except (OSError, ValueError, KeyError) as e:
            warnings.warn(f"cache shard {path} is damaged ({e}); rebuilding it")
            path.unlink(missing_ok=True)
            return False
        return True

    def sidecar(self, start: int, end: int):
        return json.loads(self.path(start, end, ".json").read_text())

    def reader(self) -> "ShardReader":
        return ShardReader(self)


def _open_shard(path: Path, rows: int, row_bytes: int, verify: bool) -> int:
    """Check the shard at `path` -> the byte offset of its packed rows (rows, row_bytes) in the file; ValueError
    when the file is not the shard expected (truncated, another layout; with `verify`, a checksum that differs)."""
    with open(path, "rb") as f:
        head = f.read(8)
        header, offset = _header(head + f.read(struct.unpack("<Q", head)[0] if len(head) == 8 else 0))
        size = os.fstat(f.fileno()).st_size
        info, meta = header.get("rows"), json.loads((header.get("__metadata__") or {}).get("mmdit", "{}"))
        if info is None or info["dtype"] != "U8" or info["shape"] != [rows, row_bytes]:
            raise ValueError(f"rows are {info and (info['dtype'], info['shape'])}, expected U8 {[rows, row_bytes]}")
        begin, end = info["data_offsets"]
        if offset + end > size:
            raise ValueError(f"truncated: its rows end at byte {offset + end} of {size}")
        if verify and meta.get("crc32") != f"{zlib.crc32(os.pread(f.fileno(), end - begin, offset + begin)):08x}":
            raise ValueError("checksum differs")
    return offset + begin


class ShardReader:
    """Rows of a store, read from its shard files: `gather(rows)` -> {column: (B, *shape)}, one `os.preadv` per
    row (its columns are packed side by side) straight into the batch, through the page cache.

    Why not memory maps (measured with bench/bench_cache.py at 100k rows, 16 x 384 caption states): as fast at
    best, but every fault maps neighbouring pages too (fault-around, large page-cache folios: up to ~2 MB per
    row read), and mapped pages count in the process's RSS: 1.9 GB after 250 batches, growing with every new
    row touched. With reads the RSS stays flat, and no process needs one map per shard of a LAION-sized cache."""

    def __init__(self, store: ShardStore, max_open: int = 512):
        self.store, self.columns, self.max_open = store, store.columns, max_open
        ranges = store.shards()
        self.offsets = []  # per shard: the byte offset of its rows
        for start, end in ranges:
            path = store.path(start, end)
            try:
                self.offsets.append(_open_shard(path, end - start, store.row_bytes, verify=False))
            except (OSError, ValueError) as e:
                raise CacheError(f"cache shard {path} is damaged ({e}); accepted: a complete cache (run the "
                                 "stage that builds it again: it rebuilds damaged shards)") from None
        self.starts = np.array([s for s, _ in ranges] or [0], dtype=np.int64)  # (S,)
        self.ends = np.array([e for _, e in ranges] or [0], dtype=np.int64)
        self.ranges = ranges
        self.before = np.cumsum(self.ends - self.starts) - (self.ends - self.starts)  # dense index of each shard's first row
        self._fds: OrderedDict[int, int] = OrderedDict()  # shard -> open descriptor, the most recent last
        self._last: tuple[bytes | None, np.ndarray | None] = (None, None)  # the last rows read, packed

    def _fd(self, shard: int) -> int:
        fd = self._fds.pop(shard, None)
        if fd is None:
            fd = os.open(self.store.path(*self.ranges[shard]), os.O_RDONLY)
            if len(self._fds) >= self.max_open:  # a LAION-sized cache has more shards than a process may open
                os.close(self._fds.popitem(last=False)[1])
        self._fds[shard] = fd
        return fd

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

    def __del__(self):
        try:
            self.close()
        except (OSError, AttributeError, TypeError):  # at interpreter exit os may be gone already
            pass

    def __len__(self) -> int:
        """The number of rows present (a complete cache: every row below the last)."""
        return sum(e - s for s, e in self.ranges)

    def dense(self, index: torch.Tensor) -> torch.Tensor:
        """Dense indices 0..len-1 (the rows present, in order, gaps skipped) -> store rows (B,). The identity for
        a store without gaps; a streamed split's latent cache has one after each process's part."""
        i = index.cpu().numpy()
        shard = np.searchsorted(self.before, i, side="right") - 1
        return torch.from_numpy(self.starts[shard] + (i - self.before[shard]))

    def locate(self, rows: torch.Tensor) -> tuple[list[int], list[int]]:
        """Global rows (B,) -> (shard, row in shard) lists; CacheError naming a row no shard holds."""
        rows = rows.cpu().numpy()
        shard = np.searchsorted(self.starts, rows, side="right") - 1  # (B,)
        local = rows - self.starts[shard]
        bad = (shard < 0) | (local >= self.ends[shard] - self.starts[shard])
        if bad.any():
            raise CacheError(f"{self.store.dir}: row {int(rows[bad][0])} is in no shard; accepted: rows of a "
                             "complete cache (run the stage that builds it again)")
        return shard.tolist(), local.tolist()

    def gather(self, rows: torch.Tensor, columns: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        key = rows.cpu().numpy().tobytes()
        if key != self._last[0]:  # the same rows again (another column of the same batch): no second read
            self._last = key, self._read(rows)
        packed, out = self._last[1], {}
        for name in columns or tuple(self.columns):
            (shape, dtype), (at, size) = self.columns[name], self.store.layout[name]
            column = np.ascontiguousarray(packed[:, at:at + size]).view(NUMPY[dtype])
            out[name] = torch.from_numpy(column.reshape(len(packed), *shape)).view(dtype)
        return out

    def _read(self, rows: torch.Tensor) -> np.ndarray:
        """The packed rows (B, row bytes): one `os.preadv` per row."""
        shard, local = self.locate(rows)
        size = self.store.row_bytes
        packed = np.empty((len(shard), size), dtype=np.uint8)
        flat = memoryview(packed.reshape(-1))
        for i, (s, r) in enumerate(zip(shard, local)):
            if os.preadv(self._fd(s), [flat[i * size:(i + 1) * size]], self.offsets[s] + r * size) != size:
                raise CacheError(f"cache shard {self.store.path(*self.ranges[s])} is shorter than its header "
                                 "says; accepted: a complete cache (run the stage that builds it again)")
        return packed

    def read(self, start: int, end: int, column: str) -> torch.Tensor:
        """Rows [start, end) of one column (a copy), e.g. a chunk of a sequential pass over the cache."""
        return self.gather(torch.arange(start, end), (column,))[column]
