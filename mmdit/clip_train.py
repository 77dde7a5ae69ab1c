"""Train a small CLIP on a dataset's image-caption pairs with open_clip: the in-domain reference for eval.

    python eval/train_clip.py --data configs/shapes.yaml --out DIR [data.key=value ...] [--steps 1200 ...]
    python eval/eval.py --model runs/shapes --metrics fid,clip --fid-features clip --clip-model DIR --out ...

Why: an offline machine has no pretrained CLIP or Inception weights, and a web-trained CLIP knows little about
32x32 synthetic shapes anyway. A CLIP trained on the dataset itself is a meaningful judge *of this domain*;
its scores are labelled in-domain everywhere and are not comparable with published CLIP scores or FIDs.

Model: `open_clip.CLIP` built from a model config dict (`model_config`: a ViT image tower at the dataset's
resolution, a text transformer over open_clip's own BPE tokenizer, which ships inside the open_clip package),
trained with open_clip's `ClipLoss` (and, as open_clip's training does, `logit_scale` clamped to [0, ln 100] after
every optimizer step) in mmdit's shared training loop (mmdit/trainer.py: AdamW, warmup + cosine,
checkpoints and resume), on batches read through mmdit's loader exactly as train/train.py reads them.

DIR is written in open_clip's local layout, `open_clip_config.json` + `open_clip_model.safetensors`, which
`open_clip.create_model_and_transforms("local-dir:DIR")` loads with no network, and `train_info.json`: the data,
the recipe and the held-out checks, all measured on the validation split, which the CLIP never trains on:
- image->text retrieval top-1 among *all distinct validation captions*: a hit when the retrieved caption is the
  image's own, or (shapes) describes the same four attributes, since paraphrases are equally right; and within
  batches of 64 consecutive validation pairs;
- FID on its image features: validation vs as many train images (should be small), and validation + Gaussian
  pixel noise vs the same train images (should grow with the noise): the extractor sees image quality.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import time
from pathlib import Path

import open_clip
import torch
from accelerate import Accelerator

from mmdit import precision
from mmdit.cli import ArgumentParser, run_cli
from mmdit.clip import OPENAI_MEAN, OPENAI_STD, CLIPLoadError, load_clip, save_open_clip
from mmdit.config import ConfigError, StageConfig, load_config
from mmdit.data.loader import DataError, ImageCaptions, dataset_source, ensure_dataset, pick_caption
from mmdit.data.shapes import ATTRIBUTES
from mmdit.metrics import FID, add_noise, clip_extractor, image_features, retrieve, text_features
from mmdit.data.order import batch_indices
from mmdit.trainer import fit

NOISE_LEVELS = (4, 8, 16, 32)  # std of the added pixel noise, in 0..255 units
MAX_LOGIT_SCALE = math.log(100)  # CLIP's cap on the softmax temperature: exp(logit_scale) <= 100


@torch.no_grad()
def clamp_logit_scale(model: torch.nn.Module, skipped=None) -> None:
    """Clamp `model.logit_scale` to [0, ln 100], as open_clip's training does after every optimizer step:
    unclamped, the temperature keeps growing and makes training unstable. fit's `after_step`."""
    model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)


def model_config(args: argparse.Namespace, resolution: int) -> dict:
    """The open_clip model config dict (the schema of open_clip's model_configs/*.json)."""
    return {
        "embed_dim": args.embed_dim,
        "vision_cfg": {"image_size": resolution, "patch_size": args.patch_size, "width": args.width,
                       "layers": args.layers, "head_width": 32, "mlp_ratio": 4.0},
        "text_cfg": {"context_length": args.context_length, "vocab_size": 49408,  # open_clip's BPE vocabulary
                     "width": args.text_width, "heads": max(1, args.text_width // 32), "layers": args.text_layers},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a config YAML whose data section names the dataset")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of that config, e.g. data.path=...")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--width", type=int, default=64, help="image tower width")
    parser.add_argument("--layers", type=int, default=4, help="image tower depth")
    parser.add_argument("--text-width", type=int, default=64)
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--context-length", type=int, default=0,
                        help="text tokens (longer captions are cut); 0 = the longest train caption's, at most 77")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "patch_size", "width", "layers", "text_width", "text_layers", "embed_dim"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.context_length < 0:
        parser.error(f"--context-length must be >= 0 (0 = automatic), got {args.context_length}")
    return args


@torch.no_grad()
def retrieval(clip, data: ImageCaptions, batch: int = 64) -> dict:
    """Image->text top-1 on a split the CLIP did not train on (see the module docstring for the two protocols)."""
    captions = [c[0] for c in data.captions]
    image = image_features(clip, data.images, 256)  # (N, D)
    retrieved = retrieve(image, captions, clip, 256)
    exact = [r == c for r, c in zip(retrieved, captions)]
    report = {"n_images": len(captions), "n_candidates": len(set(captions)),
              "all_captions_exact_top1": sum(exact) / len(exact)}
    if all(a in data.columns for a in ATTRIBUTES):  # shapes: a paraphrase with the same attributes is a hit
        attrs = [tuple(data.columns[a][i] for a in ATTRIBUTES) for i in range(len(captions))]
        of_caption = dict(zip(reversed(captions), reversed(attrs)))
        same = [of_caption[r] == a for r, a in zip(retrieved, attrs)]
        report["all_captions_attributes_top1"] = sum(same) / len(same)
        for name, flag in (("seen", False), ("held_out", True)):
            keep = [i for i, h in enumerate(data.columns.get("holdout", [False] * len(same))) if bool(h) == flag]
            if keep:
                top1 = sum(same[i] for i in keep) / len(keep)
                report[f"{name}_combinations"] = {"n": len(keep), "all_captions_attributes_top1": top1}
    hits = 0
    for start in range(0, len(captions) - batch + 1, batch):  # whole batches only
        pick = (image[start:start + batch] @ text_features(clip, captions[start:start + batch], batch).T).argmax(-1)
        pick = pick.tolist()
        hits += sum(captions[start + j] == captions[start + i] for i, j in enumerate(pick))
    report[f"batch{batch}_top1"] = hits / (len(captions) // batch * batch)
    return report


def fid_checks(clip, train: ImageCaptions, val: ImageCaptions) -> dict:
    """FID on the CLIP's features: validation vs train (small), noisy validation vs train (grows with noise)."""
    _, info = clip_extractor(clip)
    fid = FID(clip, info)
    n = min(len(val.images), len(train.images))
    fid.set_reference(train.images[:n], {"split": "train", "rows": f"first {n}"}, None)
    report = {"n": n, "reference": f"first {n} train images", "validation": fid(val.images[:n])}
    for sigma in NOISE_LEVELS:
        report[f"validation_noise_{sigma}"] = fid(add_noise(val.images[:n], sigma, seed=sigma))
    return report


def tokenize(captions: list[str], context_length: int) -> torch.Tensor:
    """Captions -> open_clip BPE tokens (C, L), L = `context_length`, or the longest caption's length (start and
    end tokens included) when 0. A longer caption is cut, keeping its end token (the text tower pools there)."""
    tokens = open_clip.SimpleTokenizer(context_length=max(77, context_length))(captions)  # (C, >= 77), 0 = padding
    longest = int((tokens != 0).sum(1).max())
    context_length = context_length or longest
    if longest > context_length:
        print(f"train_clip: captions up to {longest} tokens are cut to --context-length {context_length}")
        tokens[:, context_length - 1] = tokens[:, context_length - 1:].max(1).values
    return tokens[:, :context_length]


def clip_loss(loss_of: open_clip.ClipLoss, model, batch) -> tuple[torch.Tensor, dict]:
    """open_clip's contrastive loss, with the in-batch image->text top-1 and the logit scale as logs."""
    image, text, scale = model(*batch)  # normalised (B, D), (B, D) and exp(logit_scale)
    loss = loss_of(image, text, scale)
    with torch.no_grad():
        accuracy = ((image @ text.T).argmax(-1) == torch.arange(len(image), device=image.device)).float().mean()
    return loss, {"in_batch_top1": accuracy, "logit_scale": scale.detach()}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = load_config(args.data, args.overrides)
    out = Path(args.out)
    accelerator = Accelerator(mixed_precision=precision.accelerator_precision(cfg.train.mixed_precision))
    ensure_dataset(cfg.data)
    train = ImageCaptions.from_split(cfg.data, cfg.data.train_split)
    val = ImageCaptions.from_split(cfg.data, cfg.data.val_split)
    if cfg.data.resolution % args.patch_size:
        raise ConfigError(f"--patch-size {args.patch_size} does not divide data.resolution={cfg.data.resolution}")

    distinct = list(dict.fromkeys(c for caps in train.captions for c in caps))
    row_of = {c: i for i, c in enumerate(distinct)}
    tokens = tokenize(distinct, args.context_length)  # (captions, L): a batch only indexes the table
    args.context_length = tokens.shape[1]
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    per_epoch = len(train) // (args.batch_size * accelerator.num_processes)

    def get_batch(step: int, shard: int, num_shards: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = batch_indices(step, len(train), args.batch_size, args.seed, shard, num_shards)
        epoch = step // per_epoch
        caps = [pick_caption(train.captions[i], args.seed, epoch, i) for i in rows.tolist()]
        x = (train.images[rows].float() / 255 - mean) / std  # what mmdit.clip.CLIP.preprocess feeds at eval
        return x.to(accelerator.device), tokens[[row_of[c] for c in caps]].to(accelerator.device)

    model_cfg = model_config(args, cfg.data.resolution)
    torch.manual_seed(args.seed)
    model = open_clip.CLIP(**model_cfg)
    stage = StageConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                        betas=[0.9, 0.98], log_every=50, image_every=args.steps + 1, checkpoint_every=args.steps,
                        keep_checkpoints=1)
    print(f"train_clip: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
          f"({sum(p.numel() for p in model.token_embedding.parameters()) / 1e6:.2f}M in the token embedding), "
          f"{len(train)} train pairs, {args.steps} steps of {args.batch_size}")
    start = time.perf_counter()
    model = fit(accelerator, "clip", model, stage, get_batch, functools.partial(clip_loss, open_clip.ClipLoss()), out,
                mixed_precision=cfg.train.mixed_precision, after_step=clamp_logit_scale)
    seconds = time.perf_counter() - start
    info = {"in_domain": True,
            "note": "trained on this dataset by eval/train_clip.py: in-domain scores, not comparable with "
                    "published CLIP scores or FIDs",
            "dataset": dataset_source(cfg.data), "train_split": cfg.data.train_split, "train_pairs": len(train),
            "resolution": cfg.data.resolution, "recipe": {k: v for k, v in vars(args).items() if k != "out"},
            "model_cfg": model_cfg, "train_seconds": round(seconds, 1),
            "torch_threads": torch.get_num_threads()}
    save_open_clip(model, model_cfg, out, train_info=info)

    clip = load_clip(str(out))  # what eval loads: checks the directory round-trips, offline
    info["retrieval"] = {"split": cfg.data.val_split, **retrieval(clip, val)}
    info["fid_on_clip_features"] = fid_checks(clip, train, val)
    (out / "train_info.json").write_text(json.dumps(info, indent=2))
    print(json.dumps({k: info[k] for k in ("train_seconds", "retrieval", "fid_on_clip_features")}, indent=2))
    print(f"train_clip: wrote {out} (in-domain CLIP; load with --clip-model {out})")
    return info


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv, user_errors=(ConfigError, DataError, CLIPLoadError))
