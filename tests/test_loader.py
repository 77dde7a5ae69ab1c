import dataclasses
import io
import json
import logging
from collections import Counter

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from mmdit.data import DataConfig
from mmdit.data.loader import (EMPTY_CAPTION, DataError, ImageCaptions, StreamingImageCaptions, caption_list,
                               decode_image, ensure_dataset, open_split, pick_caption, split_captions)


def _png(path, mode, size, color):
    Image.new(mode, size, color).save(path)


@pytest.fixture
def imagefolder(tmp_path):
    """An imagefolder with every kind of trouble a real scrape has."""
    root = tmp_path / "folder"
    root.mkdir()
    rows = []
    for i in range(4):
        _png(root / f"good{i}.png", "RGB", (40, 30), (50 * i, 0, 0))
        rows.append({"file_name": f"good{i}.png", "caption": f"red {i}"})
    _png(root / "rgba.png", "RGBA", (16, 16), (0, 0, 255, 0))  # fully transparent -> white
    _png(root / "tiny.png", "RGB", (1, 1), (0, 255, 0))
    Image.new("L", (20, 20), 128).save(root / "gray.jpg", quality=95)
    Image.new("CMYK", (20, 20), (0, 0, 0, 0)).save(root / "cmyk.jpg")
    _png(root / "palette.png", "P", (8, 8), 3)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (root / "empty.png").write_bytes(b"")
    full = root / "good0.png"
    (root / "truncated.png").write_bytes(full.read_bytes()[:60])
    rows += [
        {"file_name": "rgba.png", "caption": "transparent"},
        {"file_name": "tiny.png", "caption": "one pixel"},
        {"file_name": "gray.jpg", "caption": "gray"},
        {"file_name": "cmyk.jpg", "caption": "cmyk"},
        {"file_name": "palette.png", "caption": "palette"},
        {"file_name": "corrupt.png", "caption": "corrupt"},
        {"file_name": "empty.png", "caption": "empty"},
        {"file_name": "truncated.png", "caption": "truncated"},
    ]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_imagefolder_skips_bad_images_and_converts_modes(imagefolder):
    cfg = DataConfig(name=str(imagefolder), resolution=8)
    data = ImageCaptions.from_split(cfg, "train", progress=False)
    assert len(data) == 9
    assert data.skipped == Counter({"undecodable image (corrupt, truncated or empty)": 3})
    assert data.images.shape == (9, 3, 8, 8) and data.images.dtype == torch.uint8
    by_caption = {tuple(c): data.images[i] for i, c in enumerate(data.captions)}
    assert torch.all(by_caption[("transparent",)] == 255)  # composited on white
    assert torch.all(by_caption[("gray",)][0] == by_caption[("gray",)][1])  # gray -> equal RGB channels
    assert torch.all(by_caption[("one pixel",)][1] == 255)  # 1x1 upsampled
    assert torch.all(by_caption[("cmyk",)] == 255)
    assert data.columns == {}  # an imagefolder's metadata.jsonl had no columns beyond file_name and caption


def test_resize_center_crop_keeps_the_middle(tmp_path):
    image = np.zeros((20, 60, 3), np.uint8)
    image[:, 20:40] = 255  # a white middle third on a wide black image
    Image.fromarray(image).save(tmp_path / "wide.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "wide.png", "caption": "x"}) + "\n")
    data = ImageCaptions.from_split(DataConfig(name=str(tmp_path), resolution=10), "train", progress=False)
    assert data.images.shape == (1, 3, 10, 10)
    assert data.images[0].float().mean() > 200  # the crop is the white middle, not the black sides


def test_caption_lists(tmp_path):
    rows = [{"file_name": f"{i}.png", "caption": [f"first {i}", f"second {i}"]} for i in range(3)]
    for i in range(3):
        _png(tmp_path / f"{i}.png", "RGB", (4, 4), (0, 0, 0))
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(name=str(tmp_path), resolution=4)
    data = ImageCaptions.from_split(cfg, "train", progress=False)
    assert sorted(data.captions) == [[f"first {i}", f"second {i}"] for i in range(3)]
    assert {pick_caption(data.captions[0], seed=0, draw=d, index=0) for d in range(40)} == set(data.captions[0])
    assert sorted(split_captions(cfg, "train")) == sorted(c for r in rows for c in r["caption"])


def test_several_captions_pick_is_random_but_reproducible():
    captions = ["a", "b", "c", "d"]
    picks = {pick_caption(captions, seed=0, draw=e, index=3) for e in range(40)}
    assert picks == set(captions)
    assert pick_caption(captions, 0, 5, 3) == pick_caption(captions, 0, 5, 3)


def _saved(tmp_path, n=10):
    images = [Image.new("RGB", (12, 12), (i * 20, 0, 0)) for i in range(n)]
    ds = datasets.Dataset.from_dict({"img": images, "text": [f"c{i}" for i in range(n)]},
                                    features=datasets.Features({"img": datasets.Image(), "text": datasets.Value("string")}))
    path = tmp_path / "saved"
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(2))}).save_to_disk(str(path))
    return path


def test_save_to_disk_with_custom_columns(tmp_path):
    path = _saved(tmp_path)
    cfg = DataConfig(name=str(path), image_column="img", caption_column="text", resolution=12)
    data = ImageCaptions.from_split(cfg, "validation", progress=False)
    assert len(data) == 2 and data.captions == [["c0"], ["c1"]]
    assert split_captions(cfg, "train") == [f"c{i}" for i in range(10)]


def test_streaming_shards_are_disjoint_and_complete(tmp_path):
    cfg = DataConfig(name=str(_saved(tmp_path)), image_column="img", caption_column="text", resolution=12)
    seen = []
    for rank in range(2):
        stream = StreamingImageCaptions(cfg, "train", rank=rank, world_size=2, shuffle_buffer=4)
        images = list(stream)
        assert all(image.shape == (3, 12, 12) and image.dtype == torch.uint8 for image in images)
        seen.append([image[0, 0, 0].item() for image in images])  # image i is red i * 20
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == [i * 20 for i in range(10)]


@pytest.mark.parametrize("kwargs, message", [
    ({"caption_column": "caption"}, r"no caption column 'caption' \(set data.caption_column\); columns: img, text"),
    ({"image_column": "image", "caption_column": "text"}, r"no image column 'image'.*columns: img, text"),
])
def test_missing_columns_are_clear(tmp_path, kwargs, message):
    cfg = DataConfig(name=str(_saved(tmp_path)), **{"image_column": "img", **kwargs})
    with pytest.raises(DataError, match=message):
        open_split(cfg, "train")


def test_missing_split_path_and_hub(tmp_path):
    with pytest.raises(DataError, match="no split 'test'; splits: train, validation"):
        open_split(DataConfig(name=str(_saved(tmp_path)), image_column="img", caption_column="text"), "test")
    with pytest.raises(DataError, match="does not exist"):
        open_split(DataConfig(name="shapes", path=str(tmp_path / "nowhere")), "train")
    with pytest.raises(DataError, match="local directory"):
        open_split(DataConfig(name="no-such-user/no-such-dataset"), "train")


def test_empty_dataset_is_an_error(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "bad.png", "caption": "x"}) + "\n")
    with pytest.raises(DataError, match="no usable images"):
        ImageCaptions.from_split(DataConfig(name=str(tmp_path)), "train", progress=False)


def _metadata(root, lines):
    (root / "metadata.jsonl").write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                                                 for line in lines))


def test_odd_metadata_rows_are_normalised_or_skipped_and_named(tmp_path, caplog):
    """One number or list caption among strings used to stop datasets' JSON reader for the whole folder."""
    for i in range(60):
        _png(tmp_path / f"{i}.png", "RGB", (4, 4), (i, 0, 0))
    rows = [{"file_name": f"{i}.png", "caption": f"red {i}", "score": i} for i in range(60)]
    rows[57] = {"file_name": "57.png", "caption": 5, "score": "high"}  # number caption; score mixes types
    rows[3]["caption"] = ["first", "second"]
    rows[4]["caption"] = {"en": "red"}
    rows[5]["caption"] = None
    rows[6] = {"caption": "no file"}
    rows[7]["caption"] = ""
    rows[8] = '{"file_name": "8.png", "caption": '  # a line cut off mid-write
    rows[9] = {"file_name": "../9.png", "caption": "outside"}
    rows[10]["file_name"] = "gone.png"
    _metadata(tmp_path, rows)
    cfg = DataConfig(name=str(tmp_path), resolution=4)
    with caplog.at_level(logging.INFO, logger="mmdit.data.loader"):
        data = ImageCaptions.from_split(cfg, "train", progress=False)
    assert data.skipped == Counter({"no caption": 2, "no usable file_name": 2, "metadata line not JSON": 1,
                                    "image file not found": 1})
    assert data.notes == Counter({EMPTY_CAPTION: 1}) and len(data) == 54
    assert ["5"] in data.captions and ["first", "second"] in data.captions and ["red 0"] in data.captions
    assert data.columns["score"][:2] == ["0", "1"] and "high" in data.columns["score"]  # kept as text
    assert 'metadata.jsonl line 5: 4.png: caption {"en": "red"} is not text; accepted: a string' in caplog.text
    assert "metadata.jsonl line 9: Expecting value" in caplog.text and "gone.png: image file not found" in caplog.text
    assert "54 images (1 with an empty caption, trained as unconditional), skipped 6" in caplog.text
    assert {"5", "first", "second", ""} <= set(split_captions(cfg, "train"))
    stream = StreamingImageCaptions(DataConfig(name=str(tmp_path), resolution=4, streaming=True), "train", 0, 2)
    assert len(list(stream)) + len(list(StreamingImageCaptions(stream.cfg, "train", 1, 2))) == 54


def test_caption_cells():
    assert caption_list(5) == ["5"] and caption_list(2.5) == ["2.5"] and caption_list("") == [""]
    assert caption_list(True) == [] and caption_list(None) == [] and caption_list({"en": "x"}) == []
    assert caption_list(["a", 7, None, {"b": 1}]) == ["a", "7"]


def test_split_directories_read_like_datasets(tmp_path):
    for split in ("train", "validation"):
        (tmp_path / split).mkdir()
        _png(tmp_path / split / "a.png", "RGB", (4, 4), (0, 0, 0))
        _png(tmp_path / split / "b.png", "RGB", (4, 4), (0, 0, 0))
        _metadata(tmp_path / split, [{"file_name": "a.png", "caption": f"{split} a"},
                                     {"file_name": "b.png", "caption": [f"{split} b", 3]}])
    cfg = DataConfig(name=str(tmp_path), resolution=4)
    assert ImageCaptions.from_split(cfg, "validation", progress=False).captions == [["validation a"], ["validation b", "3"]]
    with pytest.raises(DataError, match="cannot open split 'test'"):
        open_split(cfg, "test")


def _sideways_jpeg() -> bytes:
    """A 32x16 JPEG, red left half, blue right half, stored with EXIF orientation 6 (display rotated 90° cw)."""
    image = Image.new("RGB", (32, 16), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 16, 16))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    image.save(out, "JPEG", quality=95, exif=exif)
    return out.getvalue()


@pytest.mark.parametrize("form", ["path", "bytes", "pil"])
def test_exif_orientation_is_applied(tmp_path, form):
    data = _sideways_jpeg()
    (tmp_path / "phone.jpg").write_bytes(data)
    value = {"path": str(tmp_path / "phone.jpg"), "bytes": None} if form == "path" else (
        {"path": None, "bytes": data} if form == "bytes" else Image.open(io.BytesIO(data)))
    image = np.asarray(decode_image(value)).astype(int)
    assert image.shape == (32, 16, 3)  # upright: 16 wide, 32 high
    assert image[2, :, 0].min() > 200 and image[-3, :, 2].min() > 200  # the red half on top, blue below


def test_exif_orientation_through_the_loader(tmp_path):
    (tmp_path / "phone.jpg").write_bytes(_sideways_jpeg())
    _metadata(tmp_path, [{"file_name": "phone.jpg", "caption": "upright"}])
    image = ImageCaptions.from_split(DataConfig(name=str(tmp_path), resolution=8), "train", progress=False).images[0]
    assert image[0, 0].min() > 200 and image[2, -1].min() > 200  # top row red, bottom row blue


@pytest.mark.parametrize("name", ["shapes", "scenes"])
def test_a_generated_dataset_is_made_once_and_refused_when_the_config_asks_for_another(tmp_path, name):
    cfg = DataConfig(name=name, path=str(tmp_path / name), num_images=24, resolution=32, holdout=[])
    ensure_dataset(cfg)
    info = tmp_path / name / f"{name}.json"
    made = info.stat().st_mtime_ns
    ensure_dataset(cfg)  # the same settings: kept as it is
    assert info.stat().st_mtime_ns == made and len(ImageCaptions.from_split(cfg, "train", progress=False)) == 23
    with pytest.raises(DataError, match=r"generated with num_images=24 \(asked: 40\).*another data.path"):
        ensure_dataset(dataclasses.replace(cfg, num_images=40))
    if name == "shapes":
        with pytest.raises(DataError, match=r"partial_captions=0.0 \(asked: 0.5\)"):
            ensure_dataset(dataclasses.replace(cfg, partial_captions=0.5))
