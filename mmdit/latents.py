"""The latent cache: every image of a split encoded once by the trained VQ-VAE, so that diffusion training
never runs the encoder. Per split, `latents/<split>.safetensors` holds the code indices (N, h, w) and
`latents/<split>.json` the candidate captions and attribute columns of each row; `latents/stats.json`
holds the per-channel mean and std of the quantized train latents, used to normalise them for diffusion.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from mmdit.data.loader import ImageCaptions
from mmdit.vqvae import VQVAE
from mmdit.weights import atomic_write


@torch.no_grad()
def encode_images(vqvae: VQVAE, images: torch.Tensor, batch_size: int = 256, desc: str = "") -> torch.Tensor:
    """uint8 (N, 3, H, W) -> code indices (N, h, w), int32."""
    vqvae.eval()
    device = next(vqvae.parameters()).device
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc=desc or "encoding", disable=not desc):
        x = images[i:i + batch_size].to(device).float() / 127.5 - 1
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


@torch.no_grad()
def latent_stats(vqvae: VQVAE, indices: torch.Tensor) -> dict[str, list[float]]:
    """Per-channel mean and std of the quantized latents: the normalisation the diffusion model uses."""
    latents = vqvae.quantizer.embed(indices.long())  # (N, d, h, w)
    return {"mean": latents.mean(dim=(0, 2, 3)).tolist(), "std": latents.std(dim=(0, 2, 3)).tolist()}
