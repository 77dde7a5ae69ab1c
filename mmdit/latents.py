"""The latent cache: every image of a split encoded once by the trained VQ-VAE, so that diffusion training
never runs the encoder. Per split, `latents/<split>.safetensors` holds the code indices (N, h, w) and
`latents/<split>.json` the candidate captions and attribute columns of each row; `latents/stats.json`
holds the per-channel mean and std of the quantized train latents (`LatentNorm`), with which diffusion training
normalises them and the pipeline maps its samples back.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from mmdit.pixels import to_float
from mmdit.vqvae import VQVAE
from mmdit.weights import atomic_write

if TYPE_CHECKING:  # not at run time: the pipeline reads the normalisation without the data code
    from mmdit.data.loader import ImageCaptions


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


def save_split(directory: str | Path, split: str, indices: torch.Tensor, data: ImageCaptions) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"captions": data.captions, "columns": data.columns}
    atomic_write(directory / f"{split}.json", json.dumps(meta).encode())
    atomic_write(directory / f"{split}.safetensors", save({"indices": indices.contiguous()}))


def load_split(directory: str | Path, split: str) -> tuple[torch.Tensor, dict]:
    """-> (indices (N, h, w), {"captions": [[str, ...], ...], "columns": {name: [...]}})."""
    directory = Path(directory)
    path = directory / f"{split}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no latent cache for split {split!r} in {directory}: run the vqvae stage first")
    return load_file(str(path))["indices"], json.loads((directory / f"{split}.json").read_text())


@dataclass(frozen=True)
class LatentNorm:
    """Per-channel mean and std of the quantized train latents: diffusion runs on (z - mean) / std, the pipeline
    maps its samples back. Measured once by the VQ-VAE stage into `latents/stats.json`, exported in pipeline.json."""
    mean: list[float]
    std: list[float]

    @classmethod
    @torch.no_grad()
    def measure(cls, vqvae: VQVAE, indices: torch.Tensor) -> "LatentNorm":
        z = vqvae.quantizer.embed(indices.long())  # (N, d, h, w)
        return cls(z.mean(dim=(0, 2, 3)).tolist(), z.std(dim=(0, 2, 3)).tolist())

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
    return torch.cat([norm.normalise(vqvae.quantizer.embed(indices[i:i + 1024].long()).cpu())
                      for i in range(0, len(indices), 1024)])
