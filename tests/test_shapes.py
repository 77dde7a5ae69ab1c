import json
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFilter

from mmdit.data import shapes
from mmdit.data.shapes import (ATTRIBUTES, BACKGROUND, COLORS, POSITIONS, SHAPES, caption_for, generate, judge,
                               matches_holdout, parse_holdout, sample_examples)


def read_split(out, split):
    return pq.read_table(out / "data" / f"{split}-00000-of-00001.parquet").to_pydict()


def as_rows(table):
    return [dict(zip(table, values)) for values in zip(*table.values())]


def test_deterministic_per_seed(tmp_path):
    a, b, c = (generate(tmp_path / name, 60, seed=seed, verbose=False)
               for name, seed in [("a", 1), ("b", 1), ("c", 2)])
    assert a == b and a["counts"] == {"train": 57, "validation": 3}
    for split in ["train", "validation"]:
        ta, tb, tc = (read_split(tmp_path / n, split) for n in "abc")
        assert [i["bytes"] for i in ta["image"]] == [i["bytes"] for i in tb["image"]]
        assert ta["caption"] == tb["caption"]
        assert ta["caption"] != tc["caption"]
        assert [i["bytes"] for i in ta["image"]] != [i["bytes"] for i in tc["image"]]


@pytest.mark.parametrize("text", ["yellow triangle", "large cyan", "square bottom right"])
def test_holdout_excluded_from_train_kept_in_validation(tmp_path, text):
    info = generate(tmp_path / "d", 800, val_fraction=0.5, holdout=[text], verbose=False)
    combo = parse_holdout(text)
    assert info["holdout"] == [text] and info["holdout_attrs"] == [combo]
    assert json.loads((tmp_path / "d" / "shapes.json").read_text()) == info
    train, val = read_split(tmp_path / "d", "train"), read_split(tmp_path / "d", "validation")
    assert len(train["caption"]) == 400 and len(val["caption"]) == 400
    assert not any(matches_holdout(r, [combo]) or r["holdout"] for r in as_rows(train))
    held = [r for r in as_rows(val) if matches_holdout(r, [combo])]
    assert held and all(r["holdout"] for r in held)
    assert sum(r["holdout"] for r in as_rows(val)) == len(held)


def test_parse_holdout():
    assert parse_holdout("Small red circle, top left") == dict(
        size="small", color="red", shape="circle", position="top left")
    assert parse_holdout("bottom right big") == dict(position="bottom right", size="large")
    assert parse_holdout("top") == dict(position="top")
    with pytest.raises(ValueError, match="'purple'") as err:
        parse_holdout("purple circle")
    assert "'triangle'" in str(err.value)  # lists the accepted words
    with pytest.raises(ValueError, match="twice"):
        parse_holdout("red blue")
    with pytest.raises(ValueError, match="'hexagon'"):
        generate("/nonexistent/never/written", 10, holdout=["hexagon"], verbose=False)


def test_matches_holdout():
    attrs = dict(shape="triangle", color="yellow", position="top", size="small")
    assert matches_holdout(attrs, [dict(color="red"), dict(color="yellow", shape="triangle")])
    assert not matches_holdout(attrs, [dict(color="yellow", shape="circle")])
    assert not matches_holdout(attrs, [])


def test_captions_name_the_attributes():
    size_words = {"small": {"small", "little", "tiny"}, "large": {"large", "big"}}
    rows = sample_examples(300, seed=3)
    assert len({r["caption"].split()[0] for r in rows}) >= 6  # several templates in use
    for r in rows:
        text = r["caption"].lower()
        assert r["color"] in text and r["shape"] in text and r["position"] in text
        assert size_words[r["size"]] & set(text.replace(",", " ").replace(":", " ").split())
    attrs = dict(shape="circle", color="red", position="top left", size="large")
    assert caption_for(attrs) == "a large red circle in the top left"
    assert caption_for(dict(attrs, position="center")) == "a large red circle in the center"


def test_partial_captions_name_only_their_subset_and_only_in_train(tmp_path):
    attrs = dict(shape="circle", color="red", position="top left", size="small")
    assert shapes.partial_caption(attrs, ("color",)) == "red"
    assert shapes.partial_caption(attrs, ("shape", "position", "size")) == "a small circle in the top left"
    assert len(set(shapes.PARTIAL)) == 14 and tuple(ATTRIBUTES) not in shapes.PARTIAL
    full = sample_examples(400, seed=3)
    mixed = sample_examples(400, seed=3, partial=0.5)
    assert [r["image"].tobytes() for r in full] == [r["image"].tobytes() for r in mixed]  # the same images
    changed = [(f, m) for f, m in zip(full, mixed) if f["caption"] != m["caption"]]
    assert 150 < len(changed) < 250
    for _, m in changed:  # each attribute's word appears exactly when the caption keeps it
        words = m["caption"].split()
        named = {a for a in ("shape", "color", "size") if m[a] in words}
        named |= {"position"} if m["caption"].endswith(m["position"].split()[-1]) else set()
        assert named and named != set(ATTRIBUTES) and m["caption"] in {
            shapes.partial_caption(m, keep) for keep in shapes.PARTIAL if set(keep) == named}
    info = generate(tmp_path / "d", 200, val_fraction=0.5, partial_captions=0.5, verbose=False)
    assert info["partial_captions"] == 0.5
    val = as_rows(read_split(tmp_path / "d", "validation"))
    assert all(r["color"] in r["caption"] and r["shape"] in r["caption"] for r in val)  # the judge's truth
    train = as_rows(read_split(tmp_path / "d", "train"))
    assert sum(r["color"] not in r["caption"] or r["shape"] not in r["caption"] for r in train) > 20


def test_geometry_small_objects_and_inside():
    for r in sample_examples(400, seed=4):
        px = np.asarray(r["image"], np.int16)
        touched = np.abs(px - BACKGROUND).sum(-1) > 0
        border = np.concatenate([touched[0], touched[-1], touched[:, 0], touched[:, -1]])
        assert not border.any(), "object must lie fully inside the image"
        ys, xs = np.nonzero(touched)
        assert min(np.ptp(ys), np.ptp(xs)) + 1 >= 10, "small objects are >= 10 px across at 32"


def test_judge_accuracy_clean():
    rows = sample_examples(2000, seed=12345)
    acc = shapes.judge_accuracy([r["image"] for r in rows], rows)
    assert min(acc.values()) >= 0.995, acc


def test_judge_accuracy_blur_and_noise():
    rng = np.random.default_rng(0)
    rows = sample_examples(400, seed=54321)
    noisy = [np.clip(np.asarray(r["image"].filter(ImageFilter.GaussianBlur(0.8)), np.float32)
                     + rng.normal(0, 8, (32, 32, 3)), 0, 255).astype(np.uint8) for r in rows]
    acc = shapes.judge_accuracy(noisy, rows)
    assert min(acc.values()) >= 0.99, acc


def test_judge_other_sizes_and_blank():
    rows = sample_examples(100, size=64, seed=6)
    assert min(shapes.judge_accuracy([r["image"] for r in rows], rows).values()) >= 0.99
    for blank in [Image.new("RGB", (32, 32), BACKGROUND), np.zeros((16, 16, 3), np.uint8)]:
        result = judge(blank)
        assert set(ATTRIBUTES) <= set(result) and result["found"] is False


def test_judge_reads_any_image_a_model_may_make():
    """Blocks of random colours on noise (what an edit or an off-caption prompt can produce): always a verdict,
    never an error or a NaN; the 33rd of these once divided by a zero interior median."""
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(200):
            image = np.full((32, 32, 3), 128, np.uint8)
            for _ in range(rng.integers(1, 4)):
                (y, x), side = rng.integers(0, 28, 2), rng.integers(2, 14)
                image[y:y + side, x:x + side] = rng.integers(0, 256, 3)
            if rng.random() < 0.5:
                image = np.clip(image + rng.normal(0, rng.uniform(0, 60), image.shape), 0, 255).astype(np.uint8)
            verdict = judge(image)
            assert verdict["shape"] in SHAPES and verdict["position"] in POSITIONS and verdict["color"] in COLORS


def test_loads_with_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    generate(tmp_path / "d", 40, holdout=["red"], verbose=False)
    ds = datasets.load_dataset(str(tmp_path / "d"))
    assert set(ds) == {"train", "validation"}
    assert ds["train"].num_rows == 38 and ds["validation"].num_rows == 2
    assert set(ds["train"].column_names) == {"image", "caption", *ATTRIBUTES, "holdout"}
    example = ds["train"][0]
    assert example["image"].size == (32, 32) and example["color"] != "red"
    assert not list(tmp_path.glob(".d.*")), "no temp dirs left behind"
    generate(tmp_path / "no_val", 20, val_fraction=0, verbose=False)
    assert set(datasets.load_dataset(str(tmp_path / "no_val"))) == {"train"}
    with pytest.raises(FileExistsError):
        generate(tmp_path / "d", 10, verbose=False)
    generate(tmp_path / "d", 10, overwrite=True, verbose=False)
    assert json.loads((tmp_path / "d" / "shapes.json").read_text())["num_images"] == 10
