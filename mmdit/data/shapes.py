"""Synthetic captioned shapes: the embedded default dataset, and a judge for it.

Every image holds one anti-aliased object on a flat mid-gray background. The
object has four attributes, each from a small vocabulary (see ``VOCAB``):

* shape: circle, square, triangle
* color: red, green, blue, yellow, magenta, cyan (pure primaries/secondaries)
* position: the 3x3 grid cell containing the object's bounding-box centre
* size: small or large (the side / diameter of the bounding box)

Position and size are jittered but never ambiguous: the centre keeps a margin
from the grid-band borders, the two size ranges are separated by a gap, and the
object keeps a one-pixel (at 32 px) gap to the image border. Captions come from
several paraphrase templates; each one contains the canonical colour, shape and
position words literally, and the size as small/little/tiny or large/big.

``generate`` writes a Hugging Face parquet dataset (``data/{train,validation}-
00000-of-00001.parquet``, columns image, caption, shape, color, position, size,
holdout) plus ``shapes.json``. Held-out attribute combinations (``--holdout
"yellow triangle"``) never appear in train; validation keeps them, flagged.

``judge`` recovers the four attributes from an image with plain numpy analysis,
so generated samples and reconstructions can be scored against their prompts.

CLI: ``python -m mmdit.data.shapes --out DIR --num-images N [--holdout ...]``
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

VERSION = 1
SHAPES = ["circle", "square", "triangle"]
COLORS = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
    "yellow": (255, 255, 0), "magenta": (255, 0, 255), "cyan": (0, 255, 255),
}
POSITIONS = ["top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right"]  # row-major over the 3x3 grid
SIZES = ["small", "large"]
VOCAB = {"shape": SHAPES, "color": list(COLORS), "position": POSITIONS, "size": SIZES}
ATTRIBUTES = list(VOCAB)

# Mid gray is (nearly) equidistant from all six colours, so one foreground
# threshold fits them all, and it maps to 0 when pixels are scaled to [-1, 1].
BACKGROUND = (128, 128, 128)

# Geometry as fractions of the image side. Small starts at 10 px at 32 px.
SIZE_RANGES = {"small": (0.32, 0.37), "large": (0.46, 0.54)}
SIZE_THRESHOLD = (SIZE_RANGES["small"][1] * SIZE_RANGES["large"][0]) ** 0.5  # mid-gap
BAND_MARGIN = 0.03  # centre distance from grid-band borders
EDGE_PAD = 1 / 32  # object distance from the image border
SUPERSAMPLE = 4
FILL_RATIO = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # area / bbox area

SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["large", "big"]}
WHERE = {"top": "at the top", "bottom": "at the bottom", "left": "on the left",
         "right": "on the right", "center": "in the center"}
TEMPLATES = [
    "a {size} {color} {shape} {where}",
    "{position}: a {size} {color} {shape}",
    "a {color} {shape}, {size}, {where}",
    "{Where}, there is a {size} {color} {shape}",
    "a {size} {shape} colored {color}, {where}",
    "an image of a {size} {color} {shape} {where}",
    "a {size} {color} {shape} positioned {where}",
    "{Where} sits a {size} {color} {shape}",
]


def caption_for(attrs: dict, template_index: int = 0, size_word: str | None = None) -> str:
    """Caption for an attribute dict; canonical size word unless ``size_word`` is given."""
    where = WHERE.get(attrs["position"], "in the " + attrs["position"])
    return TEMPLATES[template_index].format(
        size=size_word or attrs["size"], color=attrs["color"], shape=attrs["shape"],
        position=attrs["position"], where=where, Where=where[0].upper() + where[1:])


# Every non-empty proper subset of the attributes, in a fixed order: what a partial caption may name.
PARTIAL = [tuple(a for j, a in enumerate(ATTRIBUTES) if mask >> j & 1) for mask in range(1, 2 ** len(ATTRIBUTES) - 1)]


def partial_caption(attrs: dict, keep) -> str:
    """A caption naming only the attributes in ``keep``, in template 0's order: "red", "a small circle at the
    top" (no colour), "a red square", "on the left". Such captions put a bare colour (a negative prompt) and a
    caption without one in the training distribution."""
    words = " ".join(attrs[a] for a in ("size", "color", "shape") if a in keep)
    if "shape" in keep:
        words = "a " + words
    if "position" in keep:
        words += " " + WHERE.get(attrs["position"], "in the " + attrs["position"])
    return words.strip()


# ---------------------------------------------------------------- holdout


def _phrases() -> list[tuple[str, str, str]]:
    """(phrase, attribute, canonical value), longest phrase first."""
    out = [(v, a, v) for a, vs in VOCAB.items() for v in vs]
    out += [(w, "size", s) for s, ws in SIZE_WORDS.items() for w in ws if w != s]
    return sorted(out, key=lambda p: -len(p[0]))


def parse_holdout(text: str) -> dict:
    """Parse e.g. "small red circle top left" into {"size": "small", ...}."""
    rest = " ".join(text.lower().replace(",", " ").split())
    attrs: dict = {}
    while rest:
        # Longest match first so "bottom right" is not read as "bottom" + "right".
        hit = next((p for p in _phrases() if rest == p[0] or rest.startswith(p[0] + " ")), None)
        if hit is None:
            accepted = ", ".join(repr(p[0]) for p in sorted(_phrases()))
            raise ValueError(f"holdout {text!r}: unknown word {rest.split()[0]!r}; "
                             f"accepted words: {accepted}")
        phrase, attr, value = hit
        if attr in attrs:
            raise ValueError(f"holdout {text!r}: {attr} given twice ({attrs[attr]!r}, {value!r})")
        attrs[attr] = value
        rest = rest[len(phrase):].strip()
    if not attrs:
        raise ValueError(f"holdout {text!r} names no attribute")
    return attrs


def matches_holdout(attrs: dict, holdout: list[dict]) -> bool:
    """True if ``attrs`` agrees with every attribute of any held-out combination."""
    return any(all(attrs[k] == v for k, v in combo.items()) for combo in holdout)


# ---------------------------------------------------------------- rendering


def _centre(band: int, diameter: float) -> tuple[float, float]:
    """Allowed range (fractions of the side) of the centre on one axis."""
    lo = max(band / 3 + BAND_MARGIN, diameter / 2 + EDGE_PAD)
    hi = min((band + 1) / 3 - BAND_MARGIN, 1 - diameter / 2 - EDGE_PAD)
    return lo, hi


def render(attrs: dict, cx: float, cy: float, diameter: float, size: int = 32) -> Image.Image:
    """Draw one object; centre and diameter are fractions of the image side."""
    k = size * SUPERSAMPLE
    img = Image.new("RGB", (k, k), BACKGROUND)
    # Pixel i covers [i, i + 1); PIL boxes include their last pixel, hence -1.
    x0, y0, x1, y1 = (round(v * k) for v in (cx - diameter / 2, cy - diameter / 2,
                                             cx + diameter / 2, cy + diameter / 2))
    draw, fill = ImageDraw.Draw(img), COLORS[attrs["color"]]
    if attrs["shape"] == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif attrs["shape"] == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    # BOX averaging of the supersampled canvas is exact area-coverage anti-aliasing.
    return img.resize((size, size), Image.BOX)


def sample_examples(n: int, size: int = 32, seed=0, holdout: list[dict] = (),
                    exclude_holdout: bool = False, progress: bool = False, partial: float = 0.0) -> list[dict]:
    """Render ``n`` random examples as dicts (PIL ``image``, ``caption``, attributes, ``holdout``).

    With ``exclude_holdout`` the attribute combinations are drawn uniformly from
    those not matching ``holdout``, which is rejection sampling without the loop.
    A ``partial`` share of the captions name a random subset of the attributes (``partial_caption``).
    """
    rng = np.random.default_rng(seed)
    combos = [dict(shape=s, color=c, position=p, size=z)
              for s in SHAPES for c in COLORS for p in POSITIONS for z in SIZES]
    if exclude_holdout:
        combos = [c for c in combos if not matches_holdout(c, holdout)]
        if not combos:
            raise ValueError("the holdout combinations exclude every image")
    # Draw all randomness up front, in a fixed order, for seed determinism.
    picks = rng.integers(len(combos), size=n)
    u = rng.random((n, 3))
    templates = rng.integers(len(TEMPLATES), size=n)
    synonyms = rng.integers(6, size=n)  # 6 = lcm of the synonym counts, so % stays uniform
    partial_u, subsets = rng.random(n), rng.integers(len(PARTIAL), size=n)  # drawn last: partial=0 changes nothing
    rows = []
    for i in tqdm(range(n), disable=not progress, desc="shapes", unit="img"):
        attrs = combos[picks[i]]
        lo, hi = SIZE_RANGES[attrs["size"]]
        diameter = lo + u[i, 0] * (hi - lo)
        row, col = divmod(POSITIONS.index(attrs["position"]), 3)
        (xlo, xhi), (ylo, yhi) = _centre(col, diameter), _centre(row, diameter)
        cx, cy = xlo + u[i, 1] * (xhi - xlo), ylo + u[i, 2] * (yhi - ylo)
        words = SIZE_WORDS[attrs["size"]]
        rows.append(dict(
            image=render(attrs, cx, cy, diameter, size),
            caption=(partial_caption(attrs, PARTIAL[subsets[i]]) if partial_u[i] < partial
                     else caption_for(attrs, templates[i], words[synonyms[i] % len(words)])),
            **attrs, holdout=matches_holdout(attrs, holdout)))
    return rows


# ---------------------------------------------------------------- dataset files


def png(image: Image.Image) -> dict:
    """A PIL image as a `datasets.Image` cell: PNG bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def write_atomically(out: Path, overwrite: bool, fill) -> None:
    """Call ``fill(tmp_dir)``, then move tmp_dir to ``out``: readers never see a half-written dataset."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        fill(tmp)
        if out.exists():  # empty, or replaced on request: swap it out, then delete it
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "d")
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _to_dataset(rows: list[dict]):
    import datasets  # heavy import, only needed when writing

    columns = {"image": [png(r["image"]) for r in rows]}
    columns.update({k: [r[k] for r in rows] for k in ["caption", *ATTRIBUTES, "holdout"]})
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                  **{a: datasets.Value("string") for a in ATTRIBUTES},
                                  "holdout": datasets.Value("bool")})
    return datasets.Dataset.from_dict(columns, features=features)


def generate(out_dir, num_images: int, size: int = 32, seed: int = 0,
             val_fraction: float = 0.05, holdout=(), overwrite: bool = False,
             verbose: bool = True, partial_captions: float = 0.0) -> dict:
    """Write the dataset to ``out_dir`` atomically and return its info dict. ``partial_captions``: the share
    of train captions naming a subset of the attributes (validation captions name all four: the judge's truth)."""
    holdout = list(holdout)
    holdout_attrs = [parse_holdout(h) for h in holdout]
    n_val = round(num_images * val_fraction)
    counts = {"train": num_images - n_val, "validation": n_val}
    start = time.perf_counter()
    info = {"version": VERSION, "size": size, "seed": seed, "num_images": num_images,
            "val_fraction": val_fraction, "holdout": holdout, "holdout_attrs": holdout_attrs,
            "counts": counts, "vocab": VOCAB, "partial_captions": partial_captions}

    def fill(tmp: Path) -> None:
        (tmp / "data").mkdir()
        for split_id, split in enumerate(["train", "validation"]):
            if not counts[split]:
                continue  # datasets refuses to load a split file with no rows
            # Separate streams: validation does not change when the holdout does.
            rows = sample_examples(counts[split], size, [seed, split_id], holdout_attrs,
                                   exclude_holdout=split == "train", progress=verbose,
                                   partial=partial_captions if split == "train" else 0.0)
            _to_dataset(rows).to_parquet(str(tmp / "data" / f"{split}-00000-of-00001.parquet"))
        (tmp / "shapes.json").write_text(json.dumps(info, indent=2) + "\n")

    out = Path(out_dir)
    write_atomically(out, overwrite, fill)
    if verbose:
        print(f"shapes: wrote {counts['train']} train + {counts['validation']} validation "
              f"images to {out} in {time.perf_counter() - start:.1f}s")
    return info


# ---------------------------------------------------------------- judge


def _template(shape: str, cx: float, cy: float, diameter: float, window) -> np.ndarray:
    """Ideal anti-aliased coverage of a shape over the pixel ``window`` (y0, y1, x0, x1)."""
    y0, y1, x0, x1 = window
    k = SUPERSAMPLE
    ys, xs = ((g + 0.5) / k for g in np.ogrid[y0 * k:y1 * k, x0 * k:x1 * k])
    r, dx, dy = diameter / 2, np.abs(xs - cx), ys - cy
    if shape == "circle":
        inside = dx ** 2 + dy ** 2 <= r ** 2
    elif shape == "square":
        inside = (dx <= r) & (np.abs(dy) <= r)
    else:
        inside = (np.abs(dy) <= r) & (dx <= (dy + r) / 2)
    return inside.reshape(y1 - y0, k, x1 - x0, k).mean(axis=(1, 3))


def _box_count(mask: np.ndarray, r: int) -> np.ndarray:
    """Number of ``mask`` pixels in the (2r+1)^2 window around each pixel (integral image)."""
    k, (h, w) = 2 * r + 1, mask.shape
    s = np.zeros((h + k, w + k), np.int32)
    s[r + 1:h + r + 1, r + 1:w + r + 1] = mask
    s = s.cumsum(0).cumsum(1)
    return s[k:, k:] - s[:-k, k:] - s[k:, :-k] + s[:-k, :-k]


def judge(image) -> dict:
    """Recover shape, color, position and size from an image (PIL or HxWx3 uint8 array).

    Also returns ``found`` (False when no foreground was detected: the four
    attributes are then only guesses). Works at any resolution.
    """
    px = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image,
                    dtype=np.float32)[..., :3]
    h, w = px.shape[:2]
    # The object covers under a third of the image, so the median is background,
    # even when a model drifts the background tone a little.
    bg = np.median(px.reshape(-1, 3), axis=0)
    palette = np.array(list(COLORS.values()), np.float32) - bg
    diff = px - bg
    # Pixels at least half covered by the object, minus isolated noise specks.
    mask = np.linalg.norm(diff, axis=-1) > 0.5 * np.linalg.norm(palette, axis=1).mean()
    count = _box_count(mask, 1)
    interior = count == 9
    mask &= count > 1
    if not mask.any():
        return dict(shape="circle", color="red", position="center", size="small", found=False)

    # A partly covered pixel is bg + a * (colour - bg): the direction identifies the colour.
    mean = diff[mask].mean(axis=0)
    cos = palette @ mean / (np.linalg.norm(palette, axis=1) * np.linalg.norm(mean) + 1e-6)
    color = list(COLORS)[int(cos.argmax())]

    # Soft coverage, normalised by the object's interior so that slightly off
    # colours still count as fully covered. Blur moves coverage around but keeps
    # its sum and centroid; only pixels near the mask count, to keep noise out.
    v = palette[cos.argmax()]
    cover = np.clip(diff @ v / (v @ v), 0, None)
    scale = np.median(cover[interior]) if interior.any() else 1.0
    if scale > 0:  # 0 when most of the interior is another colour than the one read (a generated mix)
        cover /= scale
    cover = np.clip(cover, 0, 1) * (_box_count(mask, 2) > 0)
    area = cover.sum()
    if area <= 0:  # nothing of the colour read near the foreground: no object to measure
        return dict(shape="circle", color=color, position="center", size="small", found=False)
    mx = (cover.sum(0) * (np.arange(w) + 0.5)).sum() / area
    my = (cover.sum(1) * (np.arange(h) + 0.5)).sum() / area

    # Fit each shape from area and centroid and keep the closest ideal render,
    # compared within a window holding the object and every candidate.
    candidates = []
    for shape in SHAPES:
        diameter = np.sqrt(area / FILL_RATIO[shape])
        # A triangle's centroid sits a sixth of its height below its bbox centre.
        candidates.append((shape, my - diameter / 6 if shape == "triangle" else my, diameter))
    reach = max(d for *_, d in candidates) * 2 / 3 + 1
    ys, xs = np.nonzero(cover)
    y0, y1 = max(0, min(ys.min(), int(my - reach))), min(h, max(ys.max() + 1, int(my + reach) + 1))
    x0, x1 = max(0, min(xs.min(), int(mx - reach))), min(w, max(xs.max() + 1, int(mx + reach) + 1))
    errors = [np.square(_template(s, mx, cy, d, (y0, y1, x0, x1)) - cover[y0:y1, x0:x1]).sum()
              for s, cy, d in candidates]
    shape, cy, diameter = candidates[int(np.argmin(errors))]
    col, row = min(int(3 * mx / w), 2), min(int(3 * cy / h), 2)
    return dict(shape=shape, color=color, position=POSITIONS[3 * row + col],
                size="large" if diameter / min(h, w) > SIZE_THRESHOLD else "small", found=True)


def judge_accuracy(images, truth: list[dict]) -> dict[str, float]:
    """Judge every image (PIL or HxWx3 arrays); the fraction right per attribute, and with all four right."""
    verdicts = [judge(im) for im in images]
    right = [{a: v[a] == t[a] for a in ATTRIBUTES} for v, t in zip(verdicts, truth, strict=True)]
    acc = {a: sum(r[a] for r in right) / len(right) for a in ATTRIBUTES}
    acc["all"] = sum(all(r.values()) for r in right) / len(right)
    return acc


def generation_parser(doc: str, size: int) -> argparse.ArgumentParser:
    """The command line the generated datasets share (shapes, scenes); each adds its --holdout and its own."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--num-images", type=int, required=True)
    p.add_argument("--size", type=int, default=size, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    return p


def main(argv=None):
    p = generation_parser(__doc__, 32)
    p.add_argument("--holdout", action="append", default=[],
                   help='combination kept out of train, e.g. "yellow triangle" (repeatable)')
    p.add_argument("--partial-captions", type=float, default=0.0,
                   help="share of train captions naming a subset of the attributes")
    a = p.parse_args(argv)
    generate(a.out, a.num_images, a.size, a.seed, a.val_fraction, a.holdout, a.overwrite,
             partial_captions=a.partial_captions)


if __name__ == "__main__":
    main()
