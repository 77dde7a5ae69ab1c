"""One small interface over the CLIP models evaluation uses: uint8 images and captions in, embeddings out.

    clip = load_clip("/tmp/clip")                         # a directory written by eval/train_clip.py (offline)
    clip = load_clip("ViT-B-32/laion2b_s34b_b79k")        # an open_clip `model/pretrained` tag (network)
    clip = load_clip("openai/clip-vit-base-patch16")      # a transformers name, or a save_pretrained directory
    image_emb = clip.encode_image(images)                 # uint8 (B, 3, H, W) -> (B, D), not normalised
    text_emb = clip.encode_text(["a red circle"])         # list of B captions -> (B, D), not normalised

What a name means, in this order:
- a directory holding `open_clip_config.json`: open_clip's own local layout ({"model_cfg", "preprocess_cfg"} +
  `open_clip_model.safetensors`, the layout of open_clip models on the hub), loaded by open_clip as
  `local-dir:DIR`; `eval/train_clip.py` writes it, plus `train_info.json`, which marks the model *in-domain*;
- a directory holding a transformers `config.json`: `CLIPModel` + its tokenizer (+ `preprocessor_config.json`);
- `model/pretrained` with `model` an open_clip architecture (`open_clip.list_models()`), or `hf-hub:org/repo`;
- anything else: a transformers hub name. Hub names need network access (or the hub cache).

Resize protocol: pixels go to [0, 1], are resized to the model's input size with torch's bicubic
interpolation (antialiased when shrinking), then normalised with the model's mean and std. open_clip and
transformers preprocess PIL images with PIL's bicubic kernel, which differs from torch's a little, so scores
match theirs closely, not to the last digit. A 32x32 image stays 32x32 for a CLIP trained at 32x32.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
ACCEPTED = ("a directory written by eval/train_clip.py, an open_clip directory (open_clip_config.json), "
            "a transformers CLIP directory, an open_clip model/pretrained tag (e.g. ViT-B-32/laion2b_s34b_b79k) "
            "or a transformers hub name (e.g. openai/clip-vit-base-patch16; hub names need network access)")


class CLIPLoadError(ValueError):
    """A CLIP that cannot be loaded; the message names it and says what is accepted."""


class CLIP(torch.nn.Module):
    """A CLIP behind one interface. `forward` = `encode_image` and `num_features` = the embedding width, so
    torchmetrics' FrechetInceptionDistance takes it as its feature extractor (FID on CLIP features)."""

    def __init__(self, model: torch.nn.Module, tokenizer, kind: str, image_size: int, mean, std, info: dict):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.kind = kind  # "open_clip" | "transformers"
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.info = info  # name, source, in_domain, weights id, resize protocol: what reports print
        with torch.no_grad():
            self.num_features = self.encode_text([""]).shape[-1]

    @property
    def in_domain(self) -> bool:
        return self.info["in_domain"]

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> normalised float (B, 3, S, S) at the model's input size S."""
        x = images.to(self.mean.device).float() / 255
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                              antialias=True).clamp(0, 1)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images)
        if self.kind == "open_clip":
            return self.model.encode_image(x).float()
        return _tensor(self.model.get_image_features(pixel_values=x)).float()

    forward = encode_image

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        device = self.mean.device
        if self.kind == "open_clip":
            return self.model.encode_text(self.tokenizer(list(texts)).to(device)).float()
        limit = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=limit, return_tensors="pt")
        return _tensor(self.model.get_text_features(input_ids=tokens["input_ids"].to(device),
                                                    attention_mask=tokens["attention_mask"].to(device))).float()


def _tensor(output) -> torch.Tensor:
    # transformers 4 returns the projected embeddings, transformers 5 an output whose pooler_output they are.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def weights_id(directory: Path) -> str:
    """The content hash of a directory's safetensors weights (the only weights format read from a directory)."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CLIPLoadError(f"cannot load CLIP {str(directory)!r}: no .safetensors weights in it; accepted: {ACCEPTED}")
    return file_id(files[0])


def file_id(path: Path) -> str:
    """A short content hash: the cache key of anything computed with these weights."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------
# open_clip's local layout: what eval/train_clip.py writes and `local-dir:` loads.

def save_open_clip(model: torch.nn.Module, model_cfg: dict, out_dir: str | Path, mean=OPENAI_MEAN, std=OPENAI_STD,
                   train_info: dict | None = None) -> None:
    """Write `model` (an open_clip.CLIP built from `model_cfg`) in open_clip's local-dir layout."""
    from safetensors.torch import save_file

    from mmdit.weights import cpu_state

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = model_cfg["vision_cfg"]["image_size"]
    preprocess = {"size": size, "mean": list(mean), "std": list(std), "interpolation": "bicubic",
                  "resize_mode": "shortest"}
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess},
                                                          indent=2))
    save_file(cpu_state(model), str(out / "open_clip_model.safetensors"))
    if train_info is not None:
        (out / "train_info.json").write_text(json.dumps(train_info, indent=2))


def _load_open_clip(name: str, pretrained: str | None, info: dict) -> CLIP:
    model, _, _ = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    pre = model.visual.preprocess_cfg  # size, mean, std as open_clip's own transforms use them
    size = pre["size"] if isinstance(pre["size"], int) else pre["size"][0]
    return CLIP(model, open_clip.get_tokenizer(name), "open_clip", size, pre["mean"], pre["std"], info)


def _load_transformers(name: str, info: dict) -> CLIP:
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(name)
    mean, std = OPENAI_MEAN, OPENAI_STD
    if not Path(name).is_dir() or (Path(name) / "preprocessor_config.json").is_file():
        processor = CLIPImageProcessor.from_pretrained(name)
        mean, std = processor.image_mean, processor.image_std
    return CLIP(model, AutoTokenizer.from_pretrained(name), "transformers", model.config.vision_config.image_size,
                mean, std, info)


def load_clip(name: str, device: str | torch.device = "cpu") -> CLIP:
    """Load a CLIP by directory or name (see the module docstring); a clear CLIPLoadError if it cannot be had."""
    path = Path(name)
    info = {"name": name, "in_domain": False}
    try:
        if path.is_dir() and (path / "open_clip_config.json").is_file():
            info.update(source="open_clip directory", weights_id=weights_id(path))
            if (path / "train_info.json").is_file():  # trained by eval/train_clip.py on the evaluated dataset
                info.update(in_domain=True, train_info=json.loads((path / "train_info.json").read_text()))
            clip = _load_open_clip(f"local-dir:{path}", None, info)
        elif path.is_dir() and (path / "config.json").is_file():
            info.update(source="transformers directory", weights_id=weights_id(path))
            clip = _load_transformers(str(path), info)
        elif path.exists():
            raise CLIPLoadError(f"cannot load CLIP {name!r}: the directory holds neither open_clip_config.json "
                                f"nor config.json; accepted: {ACCEPTED}")
        elif name.startswith("hf-hub:") or name.split("/")[0] in open_clip.list_models():
            info.update(source="open_clip", weights_id=name)
            if name.startswith("hf-hub:"):
                clip = _load_open_clip(name, None, info)
            else:
                model, _, tag = name.partition("/")
                if not tag:  # open_clip would build the architecture with random weights
                    raise CLIPLoadError(f"CLIP {name!r} names an open_clip architecture without pretrained weights; "
                                        f"accepted: model/pretrained, e.g. {model}/"
                                        f"{(open_clip.list_pretrained_tags_by_model(model) or ['TAG'])[0]}")
                clip = _load_open_clip(model, tag, info)
        else:
            info.update(source="transformers", weights_id=name)
            clip = _load_transformers(name, info)
    except CLIPLoadError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIPLoadError(f"cannot load CLIP {name!r}: {reason}; accepted: {ACCEPTED}") from e
    info["image_size"] = clip.image_size
    info["resize"] = (f"uint8 -> [0, 1] -> torch bicubic (antialiased) to {clip.image_size}x{clip.image_size} "
                      f"-> (x - mean) / std")
    return clip.to(device)
