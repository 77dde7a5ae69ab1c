"""The caption set an evaluation samples (mmdit/evaluate.py): N rows of a split, the held-out combinations with an
equal share, and their real images; or the captions of a --prompts file."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mmdit.data.loader import ImageCaptions
from mmdit.data.shapes import ATTRIBUTES


class EvalError(ValueError):
    """Bad input to eval: the message says what is wrong and what is accepted."""


@dataclass
class CaptionSet:
    captions: list[str]
    truth: list[dict] | None  # per caption: the attributes the judge must read (shapes), else None
    real: torch.Tensor | None  # uint8 (N, 3, R, R): the real image of each caption, when there is one
    reference: torch.Tensor  # uint8 real images: FID reference set, reconstructed by the VQ-VAE
    protocol: dict


def select_rows(holdout: list[bool], n: int) -> list[int]:
    """n rows: the first held-out rows, an equal share (all of them when fewer), then the first seen rows."""
    held = [i for i, h in enumerate(holdout) if h]
    seen = [i for i, h in enumerate(holdout) if not h]
    k_seen = min(len(seen), n - min(len(held), n // 2))
    return sorted(held[:n - k_seen] + seen[:k_seen])


def read_prompts(path: Path) -> tuple[list[str], list[dict] | None]:
    if not path.is_file():
        raise EvalError(f"--prompts {path}: no such file; accepted: a .txt file (one caption per line) or .jsonl")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines, None
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
            rows[-1]["caption"] = str(rows[-1]["caption"])
        except (ValueError, KeyError, TypeError) as e:
            raise EvalError(f"--prompts {path} line {number}: not a JSON object with a \"caption\" ({e})") from e
    has_truth = all(all(a in r for a in ATTRIBUTES) for r in rows)
    return [r["caption"] for r in rows], rows if has_truth else None


def caption_set(cfg, args) -> CaptionSet:
    data = ImageCaptions.from_split(cfg.data, args.split, progress=False)
    n = args.num_samples
    if args.prompts:
        captions, truth = read_prompts(Path(args.prompts))
        if not captions:
            raise EvalError(f"--prompts {args.prompts} holds no caption")
        captions, truth = captions[:n], truth[:n] if truth else None
        # As many real images as samples, as with --split: FID's bias depends on the set sizes, so FIDs from
        # the two caption sources compare only so.
        reference = data.images[:len(captions)]
        protocol = {"source": f"prompts file {args.prompts}", "reference": f"first {len(reference)} images of "
                    f"split {args.split!r}"}
        return CaptionSet(captions, truth, None, reference, protocol)
    holdout = data.columns.get("holdout")
    rows = select_rows(holdout, n) if holdout else list(range(min(n, len(data))))
    truth = ([{k: data.columns[k][i] for k in data.columns} for i in rows]
             if all(a in data.columns for a in ATTRIBUTES) else None)
    held = sum(bool(holdout[i]) for i in rows) if holdout else 0
    protocol = {"source": f"split {args.split!r}, first caption of each row",
                "selection": ("held-out combinations get an equal share (min(N/2, all of them)), the rest are the "
                              "first seen rows, in split order" if holdout else "the first N rows"),
                "n_seen": len(rows) - held, "n_held_out": held, "reference": "the real images of these rows"}
    real = data.images[rows]
    return CaptionSet([data.captions[i][0] for i in rows], truth, real, real, protocol)
