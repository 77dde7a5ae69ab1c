import json
from collections import Counter

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from mmdit.config import DataConfig
from mmdit.data.loader import (DataError, ImageCaptions, StreamingImageCaptions, open_split, pick_caption,
                               split_captions)


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
    item = data[0]
    assert set(item) == {"image", "caption", "index"}


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
    assert {data[0]["caption"]} <= set(data.captions[0])
    assert sorted(split_captions(cfg, "train")) == sorted(c for r in rows for c in r["caption"])


def test_several_captions_pick_is_random_but_reproducible():
    captions = ["a", "b", "c", "d"]
    picks = {pick_caption(captions, seed=0, epoch=e, index=3) for e in range(40)}
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
        seen.append([item["caption"] for item in stream])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(f"c{i}" for i in range(10))


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
