"""The latent cache: every image of a split encoded once by the trained VQ-VAE, so that diffusion training
never runs the encoder. Per split, `latents/<split>/` is a ShardStore (mmdit/shards.py) of SHARD_ROWS-row
shards, one row per dataset row: its code indices (h, w) int32 and its candidate captions as caption-cache rows
(K,) int64 (-1 padded); each shard's sidecar JSON keeps the captions' text and the dataset's other columns.
Every process builds its own shards (`fill_split`), a rerun encodes only the missing or damaged ones, and
training reads only the rows of each batch (`LatentSplit`), so nothing here grows with the dataset in memory.
`latents/stats.json` holds the per-channel mean and std of the quantized train latents (`LatentNorm`), with
which diffusion training normalises them and the pipeline maps its samples back.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmdit.pixels import to_float
from mmdit.shards import CacheError, ShardReader, ShardStore, split_rows
from mmdit.vqvae import VQVAE
from mmdit.weights import atomic_write

if TYPE_CHECKING:  # not at run time: the pipeline reads the normalisation without the data code
    from mmdit.data.loader import ImageCaptions
    from mmdit.text_encoder import CaptionCache

SHARD_ROWS = 4096  # rows per shard: 1 MiB of 8x8 codes; shard k is built by process k % processes


@torch.no_grad()
def encode_images(vqvae: VQVAE, images: torch.Tensor, batch_size: int = 256, desc: str = "") -> torch.Tensor:
    """uint8 (N, 3, H, W) -> code indices (N, h, w), int32."""
    vqvae.eval()
    device = next(vqvae.parameters()).device
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc=desc or "encoding", disable=not desc):
        x = to_float(images[i:i + batch_size].to(device))
        out.append(vqvae.encode(x)[1].int().cpu())
    return torch.cat(out)


def weights_id(directory: str | Path) -> str:
    """What identifies a VQ-VAE in the caches built from it: a hash of its exported weights file."""
    digest = hashlib.sha256()
    with open(Path(directory) / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def split_key(vqvae_id: str, cache: CaptionCache, split: str, rows: int, width: int) -> dict:
    """The producers a split's cache depends on: its VQ-VAE, the caption cache its caption rows point into (its
    encoder, and the instance: a caption cache deleted and built again may order its rows otherwise), and the
    split's size (rows, candidate captions per row)."""
    return {"vqvae": vqvae_id, "text_encoder": cache.meta["encoder"], "max_length": cache.meta["max_length"],
            "caption_cache": cache.store.instance(), "split": split, "rows": rows, "captions_per_row": width}


def candidate_rows(captions: list[list[str]], cache: CaptionCache, width: int) -> torch.Tensor:
    """Each row's candidate captions as caption-cache rows (N, width) int64, padded with -1."""
    out = torch.full((len(captions), width), -1, dtype=torch.long)
    for i, caps in enumerate(captions):
        out[i, :len(caps[:width])] = cache.rows(caps[:width])
    return out


def fill_split(vqvae: VQVAE, data: ImageCaptions, store: ShardStore, cache: CaptionCache, rank: int = 0,
               world_size: int = 1, shard_rows: int = SHARD_ROWS) -> int:
    """Encode this process's shards of a split (shard k is process k % world_size's) that are not yet complete:
    code indices (h, w) int32 and candidate caption rows (K,) per image, captions and columns in the sidecar.
    -> the number of shards encoded."""
    width = store.columns["captions"][0][0]
    todo = [r for r in split_rows(0, len(data), shard_rows)[rank::world_size]
            if not store.complete(*r, verify=True, sidecar=True)]
    for start, end in tqdm(todo, desc=f"latent cache: {store.dir.name}", disable=not todo or rank):
        captions = data.captions[start:end]
        columns = {k: v[start:end] for k, v in data.columns.items()}
        store.write(start, {"indices": encode_images(vqvae, data.images[start:end]),
                            "captions": candidate_rows(captions, cache, width)},
                    sidecar={"captions": captions, "columns": columns})
    return len(todo)


def split_columns(h: int, width: int) -> dict:
    return {"indices": ((h, h), torch.int32), "captions": ((width,), torch.int64)}


class LatentSplit:
    """A split's latent cache, read row by row from its shards: `indices` (h, w) int32 and `captions` (K,) caption-cache
    rows (-1 padded) per dataset row. `key` (split_key) refuses a cache built for another VQ-VAE or text encoder;
    None reads any."""

    def __init__(self, directory: str | Path, split: str, key: dict | None = None):
        path = Path(directory) / split
        if not (path / "index.json").is_file():
            raise CacheError(f"no latent cache for split {split!r} in {directory} (or one of an older layout); "
                             "accepted: a latent cache the vqvae stage of this code wrote (run train.stage=vqvae)")
        found = json.loads((path / "index.json").read_text())["key"]
        if key is not None:  # the split's size is the cache's own; the producers must be this run's
            key = {**found, **{k: v for k, v in key.items() if k not in ("rows", "captions_per_row")}}
        self.store = ShardStore(path, key or found)
        self.reader = self.store.reader()
        self.n = self.store.meta.get("rows")  # recorded once every shard was written
        if self.n is None or len(self.reader) != self.n:
            raise CacheError(f"latent cache {path} holds {len(self.reader)} of {self.n or 'its'} rows: its build did "
                             "not finish; accepted: a complete cache (run the vqvae stage again: it encodes only the "
                             "missing shards)")
        self.indices, self.captions = Column(self.reader, "indices"), Column(self.reader, "captions")

    def __len__(self) -> int:
        return self.n

    def text(self) -> tuple[list[list[str]], dict[str, list]]:
        """Every row's candidate captions and the dataset's other columns, from the sidecars (a small split's)."""
        captions, columns = [], {}
        for start, end in self.reader.ranges:
            meta = self.store.sidecar(start, end)
            captions.extend(meta["captions"])
            for key, values in meta["columns"].items():
                columns.setdefault(key, []).extend(values)
        return captions, columns


class Column:
    """One column of a store as an indexable of its rows, numbered densely (ShardReader.dense): `column[rows]`
    (B, *shape), `len`, `shape`; an optional `fn` maps each gathered batch (the normalised latents a flow DiT
    trains on)."""

    def __init__(self, reader: ShardReader, name: str, fn=None, shape: tuple[int, ...] | None = None):
        self.reader, self.name, self.fn = reader, name, fn
        self.shape = (len(reader), *(shape or reader.columns[name][0]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> torch.Tensor:
        if isinstance(rows, slice):
            rows = torch.arange(*rows.indices(len(self)))  # a slice of a map: a copy of those rows
        out = self.reader.gather(self.reader.dense(torch.as_tensor(rows)), (self.name,))[self.name]
        return self.fn(out) if self.fn else out

    def map(self, fn, shape: tuple[int, ...] | None = None) -> "Column":
        """The column with `fn` applied to each gathered batch, whose rows then have `shape` (default: the same)."""
        return Column(self.reader, self.name, fn, shape)

    def chunks(self, size: int = 65536):
        """The whole column in row order, `size` rows at a time (a pass that never holds it all)."""
        for start in range(0, len(self), size):
            yield self[start:min(start + size, len(self))]


@dataclass(frozen=True)
class LatentNorm:
    """Per-channel mean and std of the quantized train latents: diffusion runs on (z - mean) / std, the pipeline
    maps its samples back. Measured once by the VQ-VAE stage into `latents/stats.json`, exported in pipeline.json."""
    mean: list[float]
    std: list[float]

    @classmethod
    @torch.no_grad()
    def measure(cls, vqvae: VQVAE, indices) -> "LatentNorm":
        """From code indices (N, h, w), a tensor or a Column read chunk by chunk: every latent is a code vector,
        so the code counts give the exact mean and (unbiased) std, in float64, without the latents in memory."""
        codes = vqvae.quantizer.codes().detach().double().cpu()  # (K, d)
        counts = torch.zeros(len(codes), dtype=torch.float64)
        for chunk in (indices.chunks() if isinstance(indices, Column) else [indices]):
            counts += torch.bincount(chunk.flatten().long(), minlength=len(codes)).double()
        n = counts.sum()
        mean = (counts[:, None] * codes).sum(0) / n  # (d,)
        var = (counts[:, None] * (codes - mean) ** 2).sum(0) / (n - 1)
        return cls(mean.float().tolist(), var.sqrt().float().tolist())

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor(v, device=like.device).view(1, -1, 1, 1) for v in (self.mean, self.std))

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(z)
        return (z - mean) / std

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(x)
        return x * std + mean

    def save(self, directory: str | Path) -> None:
        atomic_write(Path(directory) / "stats.json", json.dumps(asdict(self), indent=2).encode())

    @classmethod
    def load(cls, directory: str | Path) -> "LatentNorm":
        return cls(**json.loads((Path(directory) / "stats.json").read_text()))


@torch.no_grad()
def diffusion_latents(vqvae: VQVAE, indices: torch.Tensor, norm: LatentNorm) -> torch.Tensor:
    """Code indices (N, h, w) -> the normalised code vectors diffusion trains on, (N, d, h, w) on the CPU."""
    return FlowLatents(vqvae, norm)(indices)


class FlowLatents:
    """Code indices (B, h, w) -> normalised code vectors (B, d, h, w), by a lookup in the normalised codebook
    (K, d): per element the same arithmetic as normalising the embedded codes, at a fraction of the cost."""

    @torch.no_grad()
    def __init__(self, vqvae: VQVAE, norm: LatentNorm):
        codes = vqvae.quantizer.codes().detach().cpu()  # (K, d)
        self.table = norm.normalise(codes[:, :, None, None])[:, :, 0, 0]  # (K, d)

    def __call__(self, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(indices.long().cpu(), self.table).permute(0, 3, 1, 2).contiguous()  # a row lookup
