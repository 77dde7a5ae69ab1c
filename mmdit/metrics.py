"""Evaluation metrics: FID (torchmetrics) on Inception-v3 or CLIP features against a cached reference set,
CLIP score, VQ-VAE reconstruction PSNR.

    extractor, info = inception_extractor("weights.safetensors")   # or clip_extractor(load_clip(DIR))
    fid = FID(extractor, info)
    fid.set_reference(real_images, {"dataset": ..., "split": ...}, cache_dir)  # computed once, then cached
    fid(generated_images)                                          # uint8 (N, 3, H, W) -> float
    clip_score(clip_cosines(clip, images, captions))

Protocol, and why:
- FID is torchmetrics' FrechetInceptionDistance. Its statistics are sums (features, outer products, count),
  so a reference set's statistics are computed once and cached as safetensors, keyed by dataset, split,
  extractor, weights, N and a hash of the reference images themselves; a changed dataset is a cache miss.
- Inception-v3 is torch-fidelity's port of the original TensorFlow graph (2048-d pool features), the weights
  torchmetrics downloads. Images are resized to 299x299 the way TensorFlow 1.x did (torchmetrics
  `antialias=False`), which is the original FID protocol; torchmetrics' default (antialias=True) is a
  different resize and gives different numbers. A 32x32 image is upsampled ~9x: FIDs of 32x32 images are only
  comparable with FIDs computed at the same resolution, N and resize.
- CLIP features: the image tower's (unnormalised) embedding, resized as `mmdit.clip` documents.
- CLIP score: 100 * max(cos(image, caption), 0) per pair, averaged (torchmetrics' formula). torchmetrics'
  CLIPScore class clamps the *mean* instead; both are reported, they differ only when some cosine is negative.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import socket
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3

from mmdit.clip import CLIP, file_id
from mmdit.pixels import to_float, to_uint8
from mmdit.vqvae import VQVAE, psnr
from mmdit.weights import atomic_write

# The file torch-fidelity (hence torchmetrics) downloads into the torch hub cache.
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
INCEPTION_RESIZE = ("uint8 -> 299x299 bilinear as TensorFlow 1.x resizes (torch-fidelity's "
                    "interpolate_bilinear_2d_like_tensorflow1x = torchmetrics antialias=False): the original protocol")
REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


class MetricError(ValueError):
    """A metric that cannot be set up as asked; the message says what is wrong and what is accepted."""


def add_noise(images: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    """uint8 images + Gaussian noise of std `sigma` (in 0..255 units), clipped: a controlled corruption."""
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)) * sigma
    return (images.float() + noise).round().clamp(0, 255).to(torch.uint8)


def tensor_hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# Feature extractors: an nn.Module from uint8 (B, 3, H, W) to (B, D), plus what the report says about it.

def _offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return True
    try:  # a quick probe: an unreachable network must fail in seconds, not hang in a download
        socket.create_connection(("github.com", 443), timeout=5).close()
        return False
    except OSError:
        return True


def inception_state(weights: str | Path | None) -> tuple[dict[str, torch.Tensor], str]:
    """The Inception-v3 state dict and a short hash of its file. `weights` None = the torch hub cache, downloaded
    there when online. Never unpickles code: safetensors, or torch.load(weights_only=True)."""
    if weights is None:
        path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_URL.rsplit("/", 1)[1]
        if not path.is_file():
            if _offline():
                raise MetricError(f"the Inception-v3 weights are not in {path.parent} and cannot be downloaded "
                                  f"offline; pass --inception-weights FILE (torch-fidelity's {path.name}, or a "
                                  "safetensors file of its state dict), or --fid-features clip --clip-model DIR")
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(INCEPTION_URL, str(path))
    else:
        path = Path(weights)
        if not path.is_file():
            raise MetricError(f"--inception-weights {path}: no such file")
    safetensors = path.suffix == ".safetensors"
    try:
        state = load_file(str(path)) if safetensors else torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # anything unreadable is the same user error (torch's own message is about pickles)
        state = None
    if not (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
        kind = "safetensors file" if safetensors else "torch.save file (read with weights_only=True)"
        raise MetricError(f"--inception-weights={path}: cannot read it as a {kind} of named tensors; accepted: "
                          f"torch-fidelity's Inception-v3 weights ({INCEPTION_URL.rsplit('/', 1)[1]}) or a "
                          "safetensors file of the same state dict")
    return state, file_id(path)


def inception_extractor(weights: str | Path | None = None, dims: int = 2048) -> tuple[torch.nn.Module, dict]:
    """torchmetrics' Inception-v3 (pool features of width `dims`: 64, 192, 768 or 2048) with the given weights."""
    state, weights_id = inception_state(weights)
    # torch-fidelity reads weights with torch.load(weights_only=False); bytes serialised here from plain
    # tensors keep untrusted pickles out of it.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    try:
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(dims)],
                                 feature_extractor_weights_path=buffer, antialias=False)
    except RuntimeError as e:  # load_state_dict: missing / unexpected / mis-shaped tensors
        raise MetricError(f"--inception-weights {weights}: not torch-fidelity's Inception-v3 "
                          f"({str(e).splitlines()[0][:200]})") from e
    net.num_features = dims  # torchmetrics would otherwise run a dummy 299x299 image to find it
    return net, {"extractor": f"inception-v3-{dims}", "weights_id": weights_id, "input_size": 299,
                 "resize": INCEPTION_RESIZE, "in_domain": False, "label": f"FID (Inception-v3, {dims}-d pool features)"}


def clip_extractor(clip: CLIP) -> tuple[torch.nn.Module, dict]:
    """A CLIP's image tower as FID's feature extractor (FID on CLIP features, as SD3 reports it)."""
    label = (f"in-domain FID on CLIP features ({clip.info['name']}, trained on this dataset: not a standard FID)"
             if clip.in_domain else f"FID on CLIP image features ({clip.info['name']})")
    return clip, {"extractor": f"clip-{clip.num_features}", "clip": clip.info["name"],
                  "weights_id": clip.info["weights_id"], "input_size": clip.image_size, "resize": clip.info["resize"],
                  "in_domain": clip.in_domain, "label": label}


# ---------------------------------------------------------------------------------------------------
# FID against one fixed, cached reference set.

class FID:
    def __init__(self, extractor: torch.nn.Module, info: dict, batch_size: int = 100):
        # sync_on_compute=False: under `accelerate launch` only the main process computes metrics, on images
        # already gathered; a cross-process sync inside compute() would wait for processes that never come.
        self.metric = FrechetInceptionDistance(feature=extractor, reset_real_features=False, sync_on_compute=False)
        self.info = info
        self.batch_size = batch_size
        self.reference: dict | None = None

    def _add(self, images: torch.Tensor, real: bool) -> None:
        for i in range(0, len(images), self.batch_size):
            self.metric.update(images[i:i + self.batch_size].to(self.metric.device), real=real)

    def set_reference(self, images: torch.Tensor, description: dict, cache_dir: str | Path | None) -> dict:
        """Statistics of the real set: loaded from `cache_dir` when this exact set was seen with this extractor."""
        key = {**description, "extractor": self.info["extractor"], "weights_id": self.info["weights_id"],
               "n": len(images), "images_sha256": tensor_hash(images)}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        path = Path(cache_dir) / f"{self.info['extractor']}-{digest}.safetensors" if cache_dir else None
        cached = path is not None and path.is_file()
        if cached:
            states = load_file(str(path))
            for name in REAL_STATES:
                setattr(self.metric, name, states[name].to(self.metric.device))
        else:
            self._add(images, real=True)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                states = {name: getattr(self.metric, name).cpu().contiguous() for name in REAL_STATES}
                atomic_write(path, save(states, metadata={"key": json.dumps(key)}))
        self.reference = {**key, "cache_file": str(path) if path else None, "from_cache": cached}
        return self.reference

    def __call__(self, images: torch.Tensor) -> float:
        if self.reference is None:
            raise RuntimeError("FID: call set_reference(real_images, ...) first")
        self.metric.reset()  # forgets the previous generated set; keeps the reference (reset_real_features=False)
        self._add(images, real=False)
        return float(self.metric.compute())


# ---------------------------------------------------------------------------------------------------
# CLIP score and reconstruction quality.

@torch.no_grad()
def image_features(clip: CLIP, images: torch.Tensor, batch_size: int = 100) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> unit-norm image embeddings (N, D), on the CPU."""
    return F.normalize(torch.cat([clip.encode_image(images[i:i + batch_size]).cpu()
                                  for i in range(0, len(images), batch_size)]), dim=-1)


@torch.no_grad()
def text_features(clip: CLIP, captions: list[str], batch_size: int = 100) -> torch.Tensor:
    """N captions -> unit-norm text embeddings (N, D), on the CPU."""
    return F.normalize(torch.cat([clip.encode_text(captions[i:i + batch_size]).cpu()
                                  for i in range(0, len(captions), batch_size)]), dim=-1)


def clip_cosines(clip: CLIP, images: torch.Tensor, captions: list[str], batch_size: int = 100) -> torch.Tensor:
    """Cosine similarity of each image with its own caption: uint8 (N, 3, H, W), N captions -> (N,)."""
    return (image_features(clip, images, batch_size) * text_features(clip, captions, batch_size)).sum(-1)


def clip_score(cosines: torch.Tensor) -> dict[str, float]:
    return {"clip_score": (100 * cosines.clamp(min=0)).mean().item(),
            "torchmetrics_clip_score": max(100 * cosines.mean().item(), 0.0)}


def retrieve(image: torch.Tensor, captions: list[str], clip: CLIP, batch_size: int = 100) -> list[str]:
    """Image features (N, D) from image_features -> for each, the caption the CLIP ranks first among the set's
    distinct captions (image->text retrieval)."""
    distinct = list(dict.fromkeys(captions))
    return [distinct[j] for j in (image @ text_features(clip, distinct, batch_size).T).argmax(-1).tolist()]


def retrieval_top1(clip: CLIP, images: torch.Tensor, captions: list[str], batch_size: int = 100) -> float:
    """Image->text top-1 among the set's distinct captions (a hit = the image's own caption): does the CLIP
    still recognise each image? Compared between real images and their reconstructions."""
    retrieved = retrieve(image_features(clip, images, batch_size), captions, clip, batch_size)
    return sum(r == c for r, c in zip(retrieved, captions)) / len(captions)


@torch.no_grad()
def reconstruct(vqvae: VQVAE, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, float]:
    """uint8 (N, 3, H, W) -> (VQ-VAE reconstructions as uint8, mean PSNR in dB of the float reconstructions)."""
    device = next(vqvae.parameters()).device
    recons, scores = [], []
    for i in range(0, len(images), batch_size):
        x = to_float(images[i:i + batch_size].to(device))
        recon = vqvae.decode(vqvae.encode(x)[0])
        scores.append(psnr(x, recon).cpu())
        recons.append(to_uint8(recon).cpu())
    return torch.cat(recons), torch.cat(scores).mean().item()
