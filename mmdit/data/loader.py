"""One loader for every image-caption dataset: the embedded shapes, a local folder, or the hub.

    ds = open_split(cfg.data, "train")              # a datasets.Dataset / IterableDataset, images undecoded
    images = ImageCaptions.from_split(cfg.data, "train")   # decoded once: uint8 (N, 3, R, R) + captions
    stream = StreamingImageCaptions(cfg.data, "train", rank, world_size)  # for datasets too big for disk

What `cfg.name` may be (the same path for all):
- "shapes": the synthetic dataset in `cfg.path` (parquet, the hub's own layout);
- a local directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`;
- a local directory that `datasets.load_dataset` understands: an `imagefolder` with `metadata.jsonl`
  (or `metadata.csv`) captions, or parquet / arrow files;
- a Hugging Face hub dataset name (+ `cfg.config_name`), downloaded and cached by `datasets`.

Images are decoded by us, not by `datasets`, so that a corrupt, truncated or zero-size file is skipped and
counted instead of crashing a run hours in. Every image is converted to RGB (transparency composited on
white), resized so its short side is `cfg.resolution` and center-cropped to a square.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import random
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import datasets
from datasets.distributed import split_dataset_by_node
import torch
from PIL import Image, ImageFile
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from tqdm.auto import tqdm

from mmdit.config import DataConfig

log = logging.getLogger(__name__)

# A truncated file must fail to decode (and be skipped), not come back silently half gray.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class DataError(ValueError):
    """A dataset that cannot be used as configured; the message says what is wrong and what is accepted."""


def dataset_source(cfg: DataConfig) -> str:
    return cfg.path if cfg.name == "shapes" else cfg.name


def _is_saved_to_disk(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def open_split(cfg: DataConfig, split: str) -> datasets.Dataset | datasets.IterableDataset:
    """Open one split with the image column left undecoded ({"bytes", "path"} dicts)."""
    source = dataset_source(cfg)
    path = Path(source)
    try:
        if path.is_dir() and _is_saved_to_disk(path):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"dataset {source!r} has no split {split!r}; splits: {', '.join(ds)}")
                ds = ds[split]
            if cfg.streaming:
                ds = ds.to_iterable_dataset()
        elif path.exists():
            ds = datasets.load_dataset(str(path), split=split, streaming=cfg.streaming)
        elif cfg.name == "shapes" or source.startswith((".", "/", "~")):
            raise DataError(f"dataset path {source!r} does not exist")
        else:
            ds = datasets.load_dataset(source, cfg.config_name, split=split, streaming=cfg.streaming)
    except DataError:
        raise
    except ValueError as e:  # datasets says "Unknown split" this way
        raise DataError(f"cannot open split {split!r} of dataset {source!r}: {e}") from e
    except (OSError, ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        raise DataError(
            f"cannot load dataset {source!r} (split {split!r}): {e}. A hub name needs network access; "
            "offline, pass a local directory (imagefolder with metadata.jsonl, parquet, or save_to_disk)"
        ) from e

    columns = ds.column_names or list((ds.features or {}).keys())
    for role, column in (("image", cfg.image_column), ("caption", cfg.caption_column)):
        if columns and column not in columns:
            raise DataError(
                f"dataset {source!r} has no {role} column {column!r} (set data.{role}_column); "
                f"columns: {', '.join(columns)}"
            )
    return ds.cast_column(cfg.image_column, datasets.Image(decode=False))


# ---------------------------------------------------------------------------------------------------
# Decoding and preprocessing one example.

def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparent pixels become white (the usual background of icon datasets)."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit gray: scale to 8 bits, PIL would clip
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB")


def decode_image(value: Any) -> Image.Image | None:
    """{"bytes", "path"} / path / PIL image -> RGB PIL image, or None if it cannot be decoded."""
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and value.get("bytes"):
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict) and value.get("path"):
            image = Image.open(value["path"])
        elif isinstance(value, (str, Path)):
            image = Image.open(value)
        else:
            return None
        image.load()  # decode now: truncated data raises here, not later in a worker
        if image.width < 1 or image.height < 1:
            return None
        return to_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def preprocess(image: Image.Image, resolution: int) -> torch.Tensor:
    """RGB PIL image -> uint8 (3, R, R): short side resized to R (antialiased), then center crop."""
    if image.size != (resolution, resolution):
        image = TF.resize(image, resolution, interpolation=InterpolationMode.BICUBIC, antialias=True)
        image = TF.center_crop(image, [resolution, resolution])
    return TF.pil_to_tensor(image)


def caption_list(value: Any) -> list[str]:
    """A caption cell -> its candidate captions (a column may hold one string or several)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [c for c in value if isinstance(c, str)]
    return []


def iter_examples(
    ds: datasets.Dataset | datasets.IterableDataset, cfg: DataConfig, skipped: Counter, desc: str = ""
) -> Iterator[tuple[torch.Tensor, list[str], dict]]:
    """Yield (uint8 (3, R, R), candidate captions, the other columns), skipping and counting bad rows."""
    for row in tqdm(ds, desc=desc or "decoding images", disable=not desc, mininterval=2.0):
        image = decode_image(row[cfg.image_column])
        if image is None:
            skipped["undecodable image (corrupt, truncated or empty)"] += 1
            continue
        captions = caption_list(row[cfg.caption_column])
        if not captions:
            skipped["no caption"] += 1
            continue
        extra = {k: v for k, v in row.items() if k not in (cfg.image_column, cfg.caption_column)}
        yield preprocess(image, cfg.resolution), captions, extra


def summary(source: str, split: str, kept: int, skipped: Counter) -> str:
    line = f"data: {source!r} split {split!r}: {kept} images"
    if skipped:
        reasons = ", ".join(f"{n} {why}" for why, n in skipped.most_common())
        line += f", skipped {sum(skipped.values())} ({reasons})"
    return line


# ---------------------------------------------------------------------------------------------------
# The two dataset forms training uses.

def pick_caption(captions: list[str], seed: int, epoch: int, index: int) -> str:
    """One caption per sample, random but a pure function of (seed, epoch, index): resumable, worker-safe."""
    if len(captions) == 1:
        return captions[0]
    return captions[random.Random(f"{seed}/{epoch}/{index}").randrange(len(captions))]


class ImageCaptions(torch.utils.data.Dataset):
    """A split decoded once into memory: fast epochs for the small datasets a CPU trains on."""

    def __init__(self, images: torch.Tensor, captions: list[list[str]], columns: dict[str, list], seed: int = 0):
        self.images = images  # (N, 3, R, R) uint8
        self.captions = captions
        self.columns = columns
        self.seed = seed
        self.epoch = 0

    @classmethod
    def from_split(cls, cfg: DataConfig, split: str, progress: bool = True) -> "ImageCaptions":
        skipped: Counter = Counter()
        images, captions, columns = [], [], {}
        ds = open_split(dataclasses.replace(cfg, streaming=False), split)
        for image, caps, extra in iter_examples(ds, cfg, skipped, desc=f"loading {split}" if progress else ""):
            images.append(image)
            captions.append(caps)
            for key, value in extra.items():
                columns.setdefault(key, []).append(value)
        log.info(summary(dataset_source(cfg), split, len(images), skipped))
        if not images:
            raise DataError(f"dataset {dataset_source(cfg)!r} split {split!r} has no usable images "
                            f"({sum(skipped.values())} skipped)")
        dataset = cls(torch.stack(images), captions, columns, seed=cfg.seed)
        dataset.skipped = skipped
        return dataset

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {
            "image": self.images[index],
            "caption": pick_caption(self.captions[index], self.seed, self.epoch, index),
            "index": index,
        }


class StreamingImageCaptions(torch.utils.data.IterableDataset):
    """A split streamed from disk or the hub, sharded across processes, decoded on the fly.

    Each process sees a disjoint part of the stream (`datasets.distributed.split_dataset_by_node`), and
    the stream is shuffled with a buffer, re-seeded every epoch through `set_epoch`.
    """

    def __init__(self, cfg: DataConfig, split: str, rank: int = 0, world_size: int = 1, shuffle_buffer: int = 1000):
        self.cfg = cfg
        self.split = split
        ds = open_split(dataclasses.replace(cfg, streaming=True), split)
        if shuffle_buffer > 0:
            ds = ds.shuffle(seed=cfg.seed, buffer_size=shuffle_buffer)
        self.ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
        self.epoch = 0
        self.skipped: Counter = Counter()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.ds.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict]:
        kept = 0
        for index, (image, captions, _) in enumerate(iter_examples(self.ds, self.cfg, self.skipped)):
            kept += 1
            yield {"image": image, "caption": pick_caption(captions, self.cfg.seed, self.epoch, index), "index": index}
        log.info(summary(dataset_source(self.cfg), self.split, kept, self.skipped))


def ensure_dataset(cfg: DataConfig) -> None:
    """Generate the embedded shapes dataset into `cfg.path` if it is not there yet."""
    if cfg.name != "shapes" or (Path(cfg.path) / "shapes.json").is_file():
        return
    from mmdit.data import shapes

    shapes.generate(cfg.path, num_images=cfg.num_images, size=cfg.resolution, seed=cfg.seed, holdout=cfg.holdout)


def split_captions(cfg: DataConfig, split: str) -> list[str]:
    """Every distinct caption of a split, in first-seen order, without decoding a single image."""
    ds = open_split(dataclasses.replace(cfg, streaming=False), split).select_columns([cfg.caption_column])
    seen: dict[str, None] = {}
    for value in ds[cfg.caption_column]:
        seen.update(dict.fromkeys(caption_list(value)))
    return list(seen)
