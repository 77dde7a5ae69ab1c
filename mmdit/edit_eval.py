"""`eval/eval.py --metrics edit`: how well a shapes run edits, read by the shapes judge.

Three tasks on the caption set's real images (the eval's validation rows, with their truth attributes), each
row's choices made by (seed, row, task) alone (`pick`), so any N, batch size or process count gives the same:

- recolour: image-to-image at RECOLOUR_STRENGTH, prompted with the same shape, size and position in another
  colour; scored by the judge's accuracy against the new attributes (all four right).
- reshape: the object's bounding box (widened by MASK_MARGIN) is inpainted (strength 1), prompted with another
  shape AND another colour at the same position and size. Sampled once without pasting: the judge scores the
  pasted result (Edit.paste_back, the pipeline's rule), PSNR outside the mask the raw decode against the input
  (pasted, it would be infinite), next to the VQ-VAE's own reconstruction, its ceiling.
- negative prompt: a caption naming shape, size and position but no colour, sampled twice with the same noise:
  without, and with a colour as the negative prompt. Reported: the share of images
  that are not of that colour, and the shape / size / position accuracy, both times.

    gens = generations(cs.truth, cs.real, seed)          # what to sample: prompts, edits, negative prompts
    images = {g.name: <sample g> for g in gens}          # mmdit.evaluate.generate(..., edit=, negatives=)
    report = score(gens, images, vqvae, objective, sampling_seconds)
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from mmdit.data.shapes import (ATTRIBUTES, BACKGROUND, COLORS, SHAPES, caption_for, judge, judge_accuracy,
                               partial_caption)
from mmdit.editing import Edit
from mmdit.grid import save_grid
from mmdit.metrics import reconstruct
from mmdit.pixels import to_float, to_pil, to_uint8
from mmdit.vqvae import VQVAE, psnr

# The share of the way back to noise: far enough for the colour to change, not so far that the layout (shape,
# size, position) is drawn afresh, as at 1 (text-to-image).
RECOLOUR_STRENGTH = 0.8
# The reshape mask is the object's bounding box widened by this share of the side (2 px at 32 px): the new
# object may be drawn a little larger (a size class spans a range of diameters) or off-centre (the position is
# a grid cell), and a box cut to the old object's edge would clip it.
MASK_MARGIN = 2 / 32
LAYOUT = ("shape", "size", "position")  # what a colour-less caption names
GRID_ROWS = 4  # examples per task in edit.png
PROTOCOL = {  # what report.json says of how the numbers were made
    "rows": "the caption set's real images and truth attributes; every task samples row i with noise (seed, i)",
    "prompts": "caption template 0, 'a {size} {color} {shape} {where}'; colour-less: the same without {color}",
    "choices": "row i's new colour / shape / negative colour: random.Random(f'{task} {seed} {i}'), never the old one",
    "reshape_mask": "bounding box of the pixels that differ from the background, widened by mask_margin_px",
    "reshape_scores": "judge: the pasted result; PSNR: the raw decode vs the input outside the mask, mean per image",
    "negative_prompt": "colour-less captions, sampled without and with a colour as the negative prompt, same noise",
}


@dataclass
class Generation:
    """One set of prompts the eval samples, and what each image should show."""
    name: str
    prompts: list[str]
    truth: list[dict]  # the attributes the judge should read (negative prompt: the real image's)
    edit: Edit | None = None  # images to edit, one per prompt
    negatives: list[str] | None = None  # negative prompts, one per prompt; None = ""


def pick(values: list[str], seed: int, index: int, task: str, avoid: str | None = None) -> str:
    """A value other than `avoid`, chosen by (seed, index, task) alone: not by N, batching or other tasks.
    (random.Random hashes a string seed with SHA-512: the same choice in every process and Python run.)"""
    return random.Random(f"{task} {seed} {index}").choice([v for v in values if v != avoid])


def attributes(row: dict) -> dict:
    """A caption set's truth row (it may carry more, e.g. its holdout flag) -> the four attributes."""
    return {a: row[a] for a in ATTRIBUTES}


def margin_px(resolution: int) -> int:
    return round(MASK_MARGIN * resolution)


def colourless_caption(attrs: dict) -> str:
    """Shape, size and position without a colour ("a small circle at the top"): the partial captions of
    training (data.partial_captions) name them so."""
    return partial_caption(attrs, LAYOUT)


def object_box(images: torch.Tensor, margin: int) -> torch.Tensor:
    """uint8 (B, 3, R, R) real shapes images -> bool (B, R, R): the bounding box of the pixels that are not the
    flat background (the object, anti-aliased edge included), widened by `margin` pixels on every side."""
    object_pixels = (images != torch.tensor(BACKGROUND, dtype=images.dtype)[:, None, None]).any(1)  # (B, R, R)
    rows, cols = object_pixels.any(2).float(), object_pixels.any(1).float()  # (B, R): one convex object per image

    def widen(extent: torch.Tensor) -> torch.Tensor:
        return F.max_pool1d(extent[:, None], 2 * margin + 1, stride=1, padding=margin)[:, 0] > 0

    return widen(rows)[:, :, None] & widen(cols)[:, None, :]


def generations(truth: list[dict], real: torch.Tensor, seed: int) -> list[Generation]:
    """The four samplings of the three tasks, for the rows' truth attributes and real images uint8 (N, 3, R, R)."""
    recoloured = [{**attributes(t), "color": pick(list(COLORS), seed, i, "recolour", avoid=t["color"])}
                  for i, t in enumerate(truth)]
    reshaped = [{**attributes(t), "shape": pick(SHAPES, seed, i, "reshape shape", avoid=t["shape"]),
                 "color": pick(list(COLORS), seed, i, "reshape color", avoid=t["color"])} for i, t in enumerate(truth)]
    colourless = [colourless_caption(t) for t in truth]
    negatives = [pick(list(COLORS), seed, i, "negative") for i in range(len(truth))]
    return [
        Generation("recolour", [caption_for(t) for t in recoloured], recoloured, Edit(real, RECOLOUR_STRENGTH)),
        # paste=False: the raw decode, for PSNR outside the mask; the pasted image is made from it in `score`
        Generation("reshape", [caption_for(t) for t in reshaped], reshaped,
                   Edit(real, 1.0, object_box(real, margin_px(real.shape[-1])), paste=False)),
        Generation("colourless", colourless, [attributes(t) for t in truth]),
        Generation("negative", colourless, [attributes(t) for t in truth], negatives=negatives),
    ]


# ---------------------------------------------------------------------------------------------------
# Scoring (main process only), on uint8 (N, 3, R, R) samples.

def psnr_outside(images: torch.Tensor, reference: torch.Tensor, repaint: torch.Tensor) -> float:
    """Mean per-image PSNR (dB) over the pixels outside `repaint`: uint8 (N, 3, R, R) x 2, bool (N, R, R)."""
    keep = ~repaint
    return torch.cat([psnr(to_float(a[:, k])[None], to_float(b[:, k])[None])  # (1, 3, pixels kept)
                      for a, b, k in zip(images, reference, keep)]).mean().item()


def pasted(gen: Generation, raw: torch.Tensor) -> torch.Tensor:
    """The pipeline's paste rule on raw decodes uint8 (N, 3, R, R): the input's own pixels outside the mask."""
    return to_uint8(replace(gen.edit, paste=True).paste_back(to_float(raw)))


def judge_input(images: torch.Tensor) -> list:
    """uint8 (N, 3, R, R) -> the (R, R, 3) arrays the judge reads."""
    return list(images.permute(0, 2, 3, 1).numpy())


def mean(flags: list[bool]) -> float:
    return sum(flags) / len(flags)


def negative_row(images: torch.Tensor, truth: list[dict], negatives: list[str]) -> dict:
    """Of images sampled from colour-less captions: the share not of the negative colour (the judge's colour),
    and the accuracy of the three attributes the caption names, each and all three."""
    verdicts = [judge(a) for a in judge_input(images)]
    right = [{a: v[a] == t[a] for a in LAYOUT} for v, t in zip(verdicts, truth, strict=True)]
    return {"not_negative_color": mean([v["color"] != c for v, c in zip(verdicts, negatives, strict=True)]),
            **{a: mean([r[a] for r in right]) for a in LAYOUT},
            "shape_size_position": mean([all(r.values()) for r in right])}


def score(gens: list[Generation], images: dict[str, torch.Tensor], vqvae: VQVAE, objective: str,
          sampling_seconds: float) -> dict:
    """gens (from `generations`) and their samples uint8 (N, 3, R, R) by name -> the report's `edit` section."""
    by_name = {g.name: g for g in gens}
    recolour, reshape, negative = by_name["recolour"], by_name["reshape"], by_name["negative"]
    real, mask = reshape.edit.images, reshape.edit.repaint
    recon, _ = reconstruct(vqvae, real)
    return {
        "objective": objective, "n": len(real), "sampling_seconds": round(sampling_seconds, 1), "protocol": PROTOCOL,
        "recolour": {"strength": recolour.edit.strength,
                     **judge_accuracy(judge_input(images["recolour"]), recolour.truth)},
        "reshape": {"strength": reshape.edit.strength, "mask_margin_px": margin_px(real.shape[-1]),
                    "mask_share": mask.float().mean().item(),
                    **judge_accuracy(judge_input(pasted(reshape, images["reshape"])), reshape.truth),
                    "psnr_outside_mask_db": psnr_outside(images["reshape"], real, mask),
                    "reconstruction_psnr_outside_mask_db": psnr_outside(recon, real, mask)},
        "negative_prompt": {"without": negative_row(images["colourless"], negative.truth, negative.negatives),
                            "with": negative_row(images["negative"], negative.truth, negative.negatives)},
    }


def save_edit_grid(gens: list[Generation], images: dict[str, torch.Tensor], path: Path,
                   rows: int = GRID_ROWS) -> Path:
    """A few rows per task, each labelled with the task, what its columns are and the prompt."""
    by_name = {g.name: g for g in gens}
    recolour, reshape, negative = by_name["recolour"], by_name["reshape"], by_name["negative"]
    masks = reshape.edit.repaint[:, None].expand(-1, 3, -1, -1).to(torch.uint8) * 255  # (N, 3, R, R), white = repaint
    pil = lambda x: to_pil(to_float(x))  # noqa: E731  uint8 (n, 3, R, R) -> n PIL images
    shown = slice(0, rows)
    columns = [
        (recolour, [recolour.edit.images, images["recolour"]], "recolour (input, output)"),
        (reshape, [reshape.edit.images, masks, images["reshape"], pasted(reshape, images["reshape"])],
         "reshape (input, mask, raw, pasted)"),
        (negative, [images["colourless"], images["negative"]], "no colour (without, with negative prompt)"),
    ]
    grid, labels = [], []
    for gen, tensors, what in columns:
        grid += [list(row) for row in zip(*(pil(t[shown]) for t in tensors))]
        labels += [f"{what}: {prompt}" + (f" / negative: {gen.negatives[i]}" if gen.negatives else "")
                   for i, prompt in enumerate(gen.prompts[shown])]
    return save_grid(grid, path, scale=2, labels=labels)


def markdown(edit: dict) -> list[str]:
    """The report.md section."""
    keys, reshape = [*ATTRIBUTES, "all"], edit["reshape"]
    lines = [f"## Editing ({edit['objective']} objective, shapes judge)", "",
             (f"{edit['n']} real images per task. Recolour: image-to-image at strength {edit['recolour']['strength']}, "
              f"another colour. Reshape: the object's box (+{reshape['mask_margin_px']} px, "
              f"{100 * reshape['mask_share']:.1f}% of the pixels) inpainted with another shape and colour, judged "
              "pasted."), "",
             "| task | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {task} | " + " | ".join(f"{100 * edit[task][k]:.1f}%" for k in keys) + " |"
              for task in ("recolour", "reshape")]
    lines += ["", (f"Reshape, PSNR outside the mask of the raw decode vs the input: "
                   f"{reshape['psnr_outside_mask_db']:.2f} dB (the VQ-VAE's reconstruction: "
                   f"{reshape['reconstruction_psnr_outside_mask_db']:.2f} dB)."), "",
              "Colour-less captions (shape, size, position), a colour as the negative prompt:", "",
              "| negative prompt | not that colour | " + " | ".join(LAYOUT) + " | all three |", "|---" * 6 + "|"]
    for name, row in edit["negative_prompt"].items():
        values = [row["not_negative_color"], *(row[a] for a in LAYOUT), row["shape_size_position"]]
        lines.append(f"| {name} | " + " | ".join(f"{100 * v:.1f}%" for v in values) + " |")
    return lines + [""]
