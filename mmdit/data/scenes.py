"""Synthetic multi-object scenes: a GenEval-style compositional benchmark (Ghosh et al. 2023) on CPU.

1-4 anti-aliased objects from the shapes vocabulary on shapes' gray background, at half shapes' diameters (small
10-12 px, large 15-17 px at 64 px: four large ones fit), bounding boxes ``GAP_PX`` apart (2+ clean pixels between
objects, for the judge) and inside shapes' border pad. Each scene is drawn FROM a spec for one of GenEval's six
tasks and captioned from that task's templates, which name every object's colour and shape: single_object "a
blue triangle", colors "a magenta square" (same scenes, other templates), two_object "a red circle and a green
square", counting "three yellow circles" (1-4), position "a red circle to the left of a blue square" (left of,
right of, above, below; no other objects), color_attr "a red square and a green circle" (two shapes, two colours).

A spec is GenEval's metadata with shapes as classes, ``{"task", "include": [{"shape", "color", "count",
"position": [relation, index of an earlier clause]}], "exclude": [{"shape", "count"}]}``; ``score`` applies
GenEval's rules to the objects found in an image (``judge_scene``) or stored with it:
1. each include clause needs ``count`` objects of its shape AND colour (colours are bound to shapes);
2. with a position, each of its objects is in that relation to every object of the clause it names: the centre
   offset, shrunk per axis by 0.1 x the summed diameters, normalised, exceeds 0.5 along the relation (generation
   keeps a clear margin: boxes apart along it, offset across <= 0.4 x along);
3. an exclude clause fails at ``count`` or more objects of its shape, any colour (counting excludes count + 1).

Held out of train, flagged in validation (``DEFAULT_HOLDOUT``): a binding ("yellow triangle": no such object in
train), a count ("three squares": no such counting caption), a relation ("circle above triangle", and the same
picture told as "triangle below circle"). ``generate`` writes ``data/{train,validation}-00000-of-00001.parquet``
(image, caption, task, spec and objects as JSON, holdout; objects hold shape, color, size, and cx, cy, diameter
as fractions of the side) and ``scenes.json``, atomically.
CLI: ``python -m mmdit.data.scenes --out DIR --num-images N [--size 64] [--holdout ...]``
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from mmdit.data import shapes
from mmdit.data.shapes import BACKGROUND, COLORS, EDGE_PAD, FILL_RATIO, SHAPES, SIZES

VERSION = 1
SCALE = 0.5  # object diameters relative to shapes'
SIZE_RANGES = {s: (lo * SCALE, hi * SCALE) for s, (lo, hi) in shapes.SIZE_RANGES.items()}
GAP_PX = 3  # bounding-box gap, pixels: >= 2 clean pixels between two objects' anti-aliased edges
MIN_SIZE = 32
TASKS = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
NUMBERS = ["one", "two", "three", "four"]
RELATIONS = {"left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1)}  # image y grows down
CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
REL_WORDS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
POSITION_THRESHOLD = 0.1  # GenEval's
DEFAULT_HOLDOUT = ("yellow triangle", "three squares", "circle above triangle")
TEMPLATES = {
    "single_object": ["a {a}", "a photo of a {a}", "an image with a single {a}", "one {a} on a gray background"],
    "colors": ["a {color} {shape}", "a {shape} colored {color}", "one {color} {shape}", "a {shape} in {color}"],
    "two_object": ["a {a} and a {b}", "a photo of a {a} and a {b}", "a {a} with a {b}", "two objects: a {a} and a {b}"],
    "counting": ["{n} {a}", "a photo of {n} {a}", "exactly {n} {a}", "{n} {a} on a gray background"],
    "position": ["a {a} {rel} a {b}", "a photo of a {a} {rel} a {b}", "a {a} sits {rel} a {b}", "a {a} is {rel} a {b}"],
    "color_attr": ["a {a} and a {b}", "a photo of a {a} and a {b}", "one {a} and one {b}", "a {a} next to a {b}"],
}


def _clause(shape, color, count=1, **extra) -> dict:
    return dict(shape=shape, color=color, count=count, **extra)


def sample_spec(rng, task: str) -> dict:
    """A random task spec (GenEval metadata); the scene is drawn from it by ``sample_scene``."""
    pairs = [(s, c) for s in SHAPES for c in COLORS]
    if task in ("single_object", "colors"):
        return dict(task=task, include=[_clause(*pairs[rng.integers(len(pairs))])])
    if task == "counting":
        n, (shape, color) = int(rng.integers(1, 5)), pairs[rng.integers(len(pairs))]
        return dict(task=task, include=[_clause(shape, color, n)], exclude=[dict(shape=shape, count=n + 1)])
    if task == "color_attr":  # two different shapes and two different colours, so binding is what is tested
        (sa, sb), (ca, cb) = rng.choice(SHAPES, 2, replace=False), rng.choice(list(COLORS), 2, replace=False)
        return dict(task=task, include=[_clause(str(sa), str(ca)), _clause(str(sb), str(cb))])
    if task not in ("two_object", "position"):
        raise ValueError(f"task={task!r}; accepted: {', '.join(TASKS)}")
    i, j = rng.choice(len(pairs), 2, replace=False)  # distinct pairs, so each clause names one object
    if task == "two_object":
        return dict(task=task, include=[_clause(*pairs[i]), _clause(*pairs[j])])
    # GenEval's order: the reference first, then the subject with [relation, index of the reference].
    rel = list(RELATIONS)[rng.integers(len(RELATIONS))]
    return dict(task=task, include=[_clause(*pairs[j]), _clause(*pairs[i], position=[rel, 0])])


def caption_for(spec: dict, template_index: int = 0) -> str:
    """Caption of a spec from one of its task's templates."""
    inc = spec["include"]
    name = [f"{c['color']} {c['shape']}" for c in inc]
    fields = dict(a=name[0], b=name[-1], color=inc[0]["color"], shape=inc[0]["shape"])
    if spec["task"] == "counting":
        fields.update(n=NUMBERS[inc[0]["count"] - 1], a=name[0] + "s" * (inc[0]["count"] > 1))
    if spec["task"] == "position":  # the subject (second clause) leads the sentence
        fields.update(a=name[1], b=name[0], rel=REL_WORDS[inc[1]["position"][0]])
    return TEMPLATES[spec["task"]][template_index].format(**fields)


def parse_holdout(text: str) -> dict:
    """Parse "yellow triangle" (binding), "three squares" (count) or "circle above triangle" (relation)."""
    words = " ".join(text.lower().replace(",", " ").split())
    accepted = ("accepted: a binding like 'yellow triangle', a count like 'three squares', "
                "or a relation like 'circle above triangle' (left of, right of, above, below)")
    for rel in RELATIONS:
        a, sep, b = words.partition(f" {rel} ")
        if sep:
            if a not in SHAPES or b not in SHAPES:
                raise ValueError(f"holdout={text!r}; {accepted}")
            return dict(kind="relation", shape=a, relation=rel, reference=b)
    first, _, rest = words.partition(" ")
    if first in NUMBERS:
        shape = rest[:-1] if rest.endswith("s") and first != "one" else rest
        if shape not in SHAPES:
            raise ValueError(f"holdout={text!r}; {accepted}")
        return dict(kind="count", count=NUMBERS.index(first) + 1, shape=shape)
    attrs = shapes.parse_holdout(words)  # its error lists the accepted words
    if set(attrs) - {"shape", "color", "size"}:
        raise ValueError(f"holdout={text!r}; {accepted} (with an optional size)")
    return dict(kind="binding", **attrs)


def matches_holdout(spec: dict, objects: list[dict], holdout: list[dict]) -> bool:
    """True if the scene (its spec and objects) shows any held-out combination."""
    inc = spec["include"]

    def shows(h: dict) -> bool:
        if h["kind"] == "binding":
            return any(all(o[k] == v for k, v in h.items() if k != "kind") for o in objects)
        if h["kind"] == "count":
            return spec["task"] == "counting" and (inc[0]["count"], inc[0]["shape"]) == (h["count"], h["shape"])
        told = spec["task"] == "position" and (inc[1]["shape"], inc[1]["position"][0], inc[0]["shape"])
        return told in [(h["shape"], h["relation"], h["reference"]),
                        (h["reference"], CONVERSE[h["relation"]], h["shape"])]

    return any(shows(h) for h in holdout)


def relations(a: dict, b: dict) -> set[str]:
    """GenEval's relations of object ``a`` to object ``b`` (centres and diameters in any one unit)."""
    offset = np.array([a["cx"] - b["cx"], a["cy"] - b["cy"]])
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (a["diameter"] + b["diameter"]), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    return {r for r, (ux, uy) in RELATIONS.items() if ux * dx + uy * dy > 0.5}


def _apart(a: dict, b: dict, size: int) -> bool:
    """Bounding boxes at least GAP_PX apart along some axis."""
    reach = (a["diameter"] + b["diameter"]) / 2 * size + GAP_PX
    return max(abs(a["cx"] - b["cx"]), abs(a["cy"] - b["cy"])) * size >= reach


def _clear_relation(a: dict, b: dict, rel: str, size: int) -> bool:
    """``a`` is ``rel`` of ``b`` by a clear margin: boxes apart along the relation, across offset <= 0.4 x along."""
    ux, uy = RELATIONS[rel]
    along = (a["cx"] - b["cx"]) * ux + (a["cy"] - b["cy"]) * uy
    across = abs((a["cx"] - b["cx"]) * uy - (a["cy"] - b["cy"]) * ux)
    return along * size >= (a["diameter"] + b["diameter"]) / 2 * size + GAP_PX and across <= 0.4 * along


def _place(rng, objects: list[dict], size: int, relation: str | None = None, tries: int = 200) -> list[dict]:
    """Give each object a centre, one at a time, away from those already placed (restart when stuck); with
    ``relation`` (two objects), the second is the subject in that relation to the first."""
    while True:
        placed = []
        for obj in objects:
            half = obj["diameter"] / 2 + EDGE_PAD
            for _ in range(tries):
                cx, cy = np.round(rng.uniform(half, 1 - half, 2), 4)
                cand = dict(obj, cx=float(cx), cy=float(cy))
                # A clear relation to the only other object implies being apart from it.
                if (_clear_relation(cand, placed[0], relation, size) if relation and placed
                        else all(_apart(cand, p, size) for p in placed)):
                    placed.append(cand)
                    break
            else:
                break
        if len(placed) == len(objects):
            return placed


def sample_scene(rng, spec: dict, size: int = 64) -> list[dict]:
    """The objects of a scene that satisfies ``spec``: shape, color, size, and cx, cy, diameter (fractions)."""
    objects = []
    for clause in spec["include"]:
        for _ in range(clause["count"]):
            lo, hi = SIZE_RANGES[z := SIZES[rng.integers(len(SIZES))]]
            objects.append(dict(shape=clause["shape"], color=clause["color"], size=z,
                                diameter=round(float(rng.uniform(lo, hi)), 4)))
    relation = spec["include"][-1].get("position", [None])[0]
    return _place(rng, objects, size, relation)


def render_scene(objects: list[dict], size: int = 64) -> Image.Image:
    """Draw each object with shapes.render and paste its touched pixels (objects never share a pixel)."""
    canvas = np.full((size, size, 3), BACKGROUND, np.uint8)
    for o in objects:
        px = np.asarray(shapes.render(o, o["cx"], o["cy"], o["diameter"], size))
        touched = (px != BACKGROUND).any(-1)
        canvas[touched] = px[touched]
    return Image.fromarray(canvas)


def sample_scenes(n: int, size: int = 64, seed=0, holdout: list[dict] = (), exclude_holdout: bool = False,
                  progress: bool = False) -> list[dict]:
    """``n`` rows (PIL ``image``, ``caption``, ``task``, ``spec``, ``objects``, ``holdout``), tasks round-robin;
    with ``exclude_holdout`` a spec or scene showing a held-out combination is drawn again."""
    if size < MIN_SIZE:
        raise ValueError(f"size={size}; accepted: >= {MIN_SIZE}")
    rng = np.random.default_rng(seed)
    rows = []
    for i in tqdm(range(n), disable=not progress, desc="scenes", unit="img"):
        row = draw_row(rng, TASKS[i % len(TASKS)], size,
                       lambda spec, objects: not (exclude_holdout and matches_holdout(spec, objects, holdout)))
        rows.append(dict(row, holdout=matches_holdout(row["spec"], row["objects"], holdout)))
    return rows


def draw_row(rng, task: str, size: int, accept, tries: int = 10_000) -> dict:
    """A row (image, caption, task, spec, objects) of ``task`` whose spec and objects ``accept`` takes."""
    for _ in range(tries):
        spec = sample_spec(rng, task)
        objects = sample_scene(rng, spec, size)
        if accept(spec, objects):
            break
    else:
        raise ValueError(f"no {task} scene drawn in {tries} tries fits: the holdout combinations exclude them all")
    caption = caption_for(spec, int(rng.integers(len(TEMPLATES[task]))))
    return dict(image=render_scene(objects, size), caption=caption, task=task, spec=spec, objects=objects)


def truth_rows(columns: dict[str, list]) -> list[dict]:
    """A loaded split's columns -> per row {"spec", "objects"} decoded from their JSON, as ``score`` reads them."""
    return [{"spec": json.loads(s), "objects": json.loads(o)} for s, o in zip(columns["spec"], columns["objects"])]


def _to_dataset(rows: list[dict]):
    import datasets  # heavy import, only needed when writing

    text = ["caption", "task", "spec", "objects"]
    columns = {k: [json.dumps(r[k]) if k in ("spec", "objects") else r[k] for r in rows] for k in [*text, "holdout"]}
    features = datasets.Features({"image": datasets.Image(), **{k: datasets.Value("string") for k in text},
                                  "holdout": datasets.Value("bool")})
    columns["image"] = [shapes.png(r["image"]) for r in rows]
    return datasets.Dataset.from_dict(columns, features=features)


def generate(out_dir, num_images: int, size: int = 64, seed: int = 0, val_fraction: float = 0.05,
             holdout=DEFAULT_HOLDOUT, overwrite: bool = False, verbose: bool = True) -> dict:
    """Write the dataset to ``out_dir`` atomically and return its info dict (also in ``scenes.json``)."""
    holdout = list(holdout)
    parsed = [parse_holdout(h) for h in holdout]
    n_val = round(num_images * val_fraction)
    counts = {"train": num_images - n_val, "validation": n_val}
    info = {"version": VERSION, "size": size, "seed": seed, "num_images": num_images, "val_fraction": val_fraction,
            "holdout": holdout, "holdout_parsed": parsed, "counts": counts, "tasks": TASKS}
    start = time.perf_counter()

    def fill(tmp: Path):
        (tmp / "data").mkdir()
        for split_id, split in enumerate(["train", "validation"]):
            if counts[split]:  # datasets refuses to load a split file with no rows
                # Separate streams: validation does not change when the holdout does.
                rows = sample_scenes(counts[split], size, [seed, split_id], parsed,
                                     exclude_holdout=split == "train", progress=verbose)
                _to_dataset(rows).to_parquet(str(tmp / "data" / f"{split}-00000-of-00001.parquet"))
        (tmp / "scenes.json").write_text(json.dumps(info, indent=2) + "\n")

    shapes.write_atomically(Path(out_dir), overwrite, fill)
    if verbose:
        print(f"scenes: wrote {counts['train']} train + {counts['validation']} validation images "
              f"to {out_dir} in {time.perf_counter() - start:.1f}s")
    return info


def _components(mask: np.ndarray) -> np.ndarray:
    """8-connected labels 1..k of ``mask`` (0 = background): each pixel takes its neighbourhood's max label
    until nothing changes, then the labels are renumbered."""
    h, w = mask.shape
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:
        p = np.pad(labels, 1)
        spread = np.where(mask, np.max([p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=0), 0)
        if np.array_equal(spread, labels):
            break
        labels = spread
    values, index = np.unique(labels, return_inverse=True)
    return index.reshape(h, w) + (values[0] != 0)


def _read_object(px: np.ndarray, bg: np.ndarray, region: np.ndarray, mask: np.ndarray) -> dict:
    """One object: shapes.judge on a crop of side SCALE x image (so its size reading carries over), with
    everything outside ``region`` set to background; the centre from the coverage of the colour read."""
    h, w = mask.shape
    side = max(8, round(min(h, w) * SCALE))
    ys, xs = np.nonzero(mask)
    y0, x0 = int(ys.mean()) - side // 2 + side, int(xs.mean()) - side // 2 + side
    clean = np.where(region[..., None], px, bg)
    canvas = np.pad(clean - bg, ((side, side), (side, side), (0, 0))) + bg
    verdict = shapes.judge(np.clip(canvas[y0:y0 + side, x0:x0 + side], 0, 255).astype(np.uint8))
    # A partly covered pixel is bg + a * (colour - bg); the coverage centroid is the shape's centroid.
    v = np.array(COLORS[verdict["color"]], np.float32) - bg
    cover = np.clip((clean - bg) @ v / (v @ v), 0, 1) * region
    area = max(cover.sum(), 1e-6)
    cx, cy = ((cover.sum(axis) * (np.arange(n) + 0.5)).sum() / area for axis, n in [(0, w), (1, h)])
    diameter = np.sqrt(area / FILL_RATIO[verdict["shape"]])
    if verdict["shape"] == "triangle":  # its centroid sits a sixth of its height below its box centre
        cy -= diameter / 6
    return dict(shape=verdict["shape"], color=verdict["color"], size=verdict["size"],
                cx=cx / w, cy=cy / h, diameter=diameter / min(h, w))


def judge_scene(image, min_pixels: int = 4) -> list[dict]:
    """Every object of an image (PIL or HxWx3 uint8): shape, color, size, and cx, cy, diameter as fractions of
    the side, in reading order. Foreground components under ``min_pixels`` pixels are taken for noise."""
    px = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, np.float32)[..., :3]
    # Objects cover well under half the image, so the median is the background.
    bg = np.median(px.reshape(-1, 3), axis=0)
    palette = np.array(list(COLORS.values()), np.float32) - bg
    # Pixels at least half covered (shapes.judge's threshold), minus isolated noise specks.
    mask = np.linalg.norm(px - bg, axis=-1) > 0.5 * np.linalg.norm(palette, axis=1).mean()
    mask &= shapes._box_count(mask, 1) > 1
    labels = _components(mask)
    found = []
    for k in range(1, labels.max() + 1):
        comp = labels == k
        if comp.sum() < min_pixels:
            continue
        # The anti-aliased rim lies within 2 px of the mask; keep away from the other objects' rims.
        region = (shapes._box_count(comp, 2) > 0) & ~(shapes._box_count(mask & ~comp, 1) > 0)
        found.append(_read_object(px, bg, region, comp))
    return sorted(found, key=lambda o: (round(o["cy"], 2), o["cx"]))


def score(spec: dict, objects: list[dict]) -> bool:
    """GenEval's verdict for a spec on the objects found in an image (see the module docstring)."""
    groups = []
    for clause in spec["include"]:
        group = [o for o in objects if o["shape"] == clause["shape"]
                 and clause.get("color") in (None, o["color"])][:clause["count"]]
        if len(group) < clause["count"]:
            return False
        rel, target = clause.get("position", (None, None))
        if rel and not all(rel in relations(o, t) for o in group for t in groups[target]):
            return False
        groups.append(group)
    return all(sum(o["shape"] == ex["shape"] for o in objects) < ex["count"] for ex in spec.get("exclude", []))


def judge_accuracy(images, rows: list[dict]) -> dict[str, float]:
    """Fractions of images with all objects ``exact`` (centre within 1 px) and passing their spec (``score``)."""
    exact = correct = 0
    for image, row in zip(images, rows, strict=True):
        found, truth, side = judge_scene(image), row["objects"], min(np.asarray(image).shape[:2])
        same = [any(all(f[k] == t[k] for k in ("shape", "color", "size")) and side * max(
            abs(f["cx"] - t["cx"]), abs(f["cy"] - t["cy"])) <= 1 for t in truth) for f in found]
        exact += len(found) == len(truth) and all(same)
        correct += score(row["spec"], found)
    return {"exact": exact / len(rows), "score": correct / len(rows)}


def main(argv=None):
    p = shapes.generation_parser(__doc__, 64)
    p.add_argument("--holdout", action="append", help="binding, count or relation kept out of train "
                   f"(repeatable; default: {', '.join(DEFAULT_HOLDOUT)})")
    a = p.parse_args(argv)
    generate(a.out, a.num_images, a.size, a.seed, a.val_fraction, a.holdout or DEFAULT_HOLDOUT, a.overwrite)


if __name__ == "__main__":
    main()
