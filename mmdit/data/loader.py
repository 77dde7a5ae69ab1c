"""One loader for every image-caption dataset: the embedded shapes, a local folder, or the hub.

    ds = open_split(cfg.data, "train")              # a datasets.Dataset / IterableDataset, images undecoded
    images = ImageCaptions.from_split(cfg.data, "train")   # decoded once: uint8 (N, 3, R, R) + captions
    stream = StreamingImageCaptions(cfg.data, "train", rank, world_size)  # too big for disk: yields images

What `cfg.name` may be (the same path for all):
- "shapes" / "scenes": the synthetic datasets in `cfg.path` (parquet, the hub's own layout);
- a local directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`;
- a local directory that `datasets.load_dataset` understands: an `imagefolder` with `metadata.jsonl`
  (or `metadata.csv`) captions, or parquet / arrow files;
- a Hugging Face hub dataset name (+ `cfg.config_name`), downloaded and cached by `datasets`.

Images are decoded by us, not by `datasets`, so that a corrupt, truncated or zero-size file is skipped and
counted instead of crashing a run hours in. Every image is turned upright (its EXIF orientation), converted to
RGB (transparency composited on white), resized so its short side is `cfg.resolution` and center-cropped.

An imagefolder's `metadata.jsonl` is read by us too: `datasets`' JSON reader stops at the first caption whose
type differs from the rows before it (a number, or one list among strings). Here a number is its text, strings
and lists mix, and a row that cannot be used is skipped and counted like a corrupt image, named in the log.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import datasets
import pyarrow as pa
from datasets.distributed import split_dataset_by_node
import torch
from PIL import Image, ImageFile, ImageOps
from tqdm.auto import tqdm

from mmdit.data import DataConfig
from mmdit.pixels import prepare, to_rgb

log = logging.getLogger(__name__)

# A truncated file must fail to decode (and be skipped), not come back silently half gray.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# The column a metadata row that cannot be used carries instead of its data: [reason counted, line logged].
SKIP = "_skip"
UNDECODABLE = "undecodable image (corrupt, truncated or empty)"
EMPTY_CAPTION = "with an empty caption, trained as unconditional"
LISTED = 5  # bad rows named in the log per reason; the rest are only counted


class DataError(ValueError):
    """A dataset that cannot be used as configured; the message says what is wrong and what is accepted."""


def dataset_source(cfg: DataConfig) -> str:
    return cfg.path if cfg.generated else cfg.name


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
        elif path.is_dir() and (metadata := _jsonl_metadata(path, split)):
            ds = read_metadata(metadata, path, cfg.caption_column)
        elif path.exists():
            ds = datasets.load_dataset(str(path), split=split, streaming=cfg.streaming)
        elif cfg.generated or source.startswith((".", "/", "~")):
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
    if cfg.streaming and isinstance(ds, datasets.Dataset):
        ds = ds.to_iterable_dataset()

    columns = [c for c in ds.column_names or (ds.features or {}) if c != SKIP]
    for role, column in (("image", cfg.image_column), ("caption", cfg.caption_column)):
        if columns and column not in columns:
            raise DataError(
                f"dataset {source!r} has no {role} column {column!r} (set data.{role}_column); "
                f"columns: {', '.join(columns)}"
            )
    return ds.cast_column(cfg.image_column, datasets.Image(decode=False))


# ---------------------------------------------------------------------------------------------------
# An imagefolder's metadata.jsonl, read line by line.

def _jsonl_metadata(path: Path, split: str) -> list[str]:
    """The metadata.jsonl files of `split` of the imagefolder `path`, found as `datasets` finds them (split
    directories or names); [] if `path` is not such an imagefolder or has no such split (`datasets` decides)."""
    builder = datasets.load_dataset_builder(str(path))
    if builder.name != "imagefolder" or split not in builder.config.data_files:
        return []
    return sorted(f for f in builder.config.data_files[split] if os.path.basename(f) == "metadata.jsonl")


def _skip(reason: str, detail: str, row: dict | None = None) -> dict:
    return {**(row or {}), SKIP: [reason, detail]}


def _metadata_row(line: bytes, folder: Path, caption_column: str) -> dict:
    """One metadata.jsonl line -> {"image": path, caption: str or list of str, other keys}, or, if it cannot be
    used, {SKIP: [reason, why and what is accepted]} (with the other keys when only the caption is wrong)."""
    try:
        row = json.loads(line.rstrip())
    except UnicodeDecodeError:
        return _skip("metadata line not JSON", "not UTF-8 text; accepted: one JSON object per line")
    except json.JSONDecodeError as e:
        return _skip("metadata line not JSON", f"{e.msg} at column {e.colno}; accepted: one JSON object per line")
    if not isinstance(row, dict):
        return _skip("metadata line not JSON", f"{line.rstrip()[:60]!r} is not an object; accepted: one JSON object "
                     "per line")
    file_name = row.pop("file_name", None)
    relative = os.path.normpath(file_name) if isinstance(file_name, str) and file_name else ""
    # As `datasets` does: a file_name must not reach outside the folder (no "..", absolute path or URL).
    if not relative or "://" in file_name or os.path.isabs(relative) or relative.split(os.sep)[0] == "..":
        shown = "missing" if file_name is None else repr(file_name)
        return _skip("no usable file_name", f"file_name {shown}; accepted: a path inside the folder of "
                     "metadata.jsonl, relative to it")
    row = {"image": str(folder / relative), **row}
    caption = row.get(caption_column)
    captions = caption_list(caption)
    if not captions:
        kind = "missing"
        if caption_column in row:  # None keeps the column's type; the row is skipped anyway
            kind, row[caption_column] = f"{json.dumps(caption)[:60]} is not text", None
        return _skip("no caption", f"{file_name}: caption {kind}; accepted: a string (\"\" = unconditional), a "
                     "number, or a list of them", row)
    row[caption_column] = captions if isinstance(caption, list) else captions[0]
    return row


def read_metadata(files: list[str], root: Path, caption_column: str) -> datasets.Dataset:
    """The rows of an imagefolder's metadata.jsonl files as a Dataset. A row that cannot be used keeps its
    place with SKIP = [reason, "file line N: why; what is accepted"]: iter_examples counts it with bad images."""
    rows = []
    for file in files:
        name = os.path.relpath(file, root)
        with open(file, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = _metadata_row(line, Path(file).parent, caption_column)
                if SKIP in row:
                    row[SKIP][1] = f"{name} line {number}: {row[SKIP][1]}"
                rows.append(row)
    if any(isinstance(row.get(caption_column), list) for row in rows):  # strings and lists mix: all lists
        for row in rows:
            if isinstance(row.get(caption_column), str):
                row[caption_column] = [row[caption_column]]
    keys = dict.fromkeys(["image", *(k for row in rows for k in row)])
    return datasets.Dataset.from_dict({k: _column([row.get(k) for row in rows], k, root) for k in keys})


def _column(values: list, key: str, root: Path) -> list:
    """A metadata column as `datasets` can store it: an extra column mixing JSON types is kept as JSON text."""
    try:
        pa.array(values)
        return values
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        log.warning(f"data: {root}: metadata column {key!r} mixes JSON types; kept as JSON text")
        return [v if v is None or isinstance(v, str) else json.dumps(v) for v in values]


# ---------------------------------------------------------------------------------------------------
# Decoding and preprocessing one example.

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
        return to_rgb(ImageOps.exif_transpose(image))  # phone photos are stored sideways + an EXIF rotation
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def _text(value: Any) -> list[str]:
    # A number is text written without quotes (a year, a count); a bool, null or object is not a caption.
    if isinstance(value, str):
        return [value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [str(value)]
    return []


def caption_list(value: Any) -> list[str]:
    """A caption cell -> its candidate captions (a column may hold one caption or a list of them)."""
    if isinstance(value, (list, tuple)):
        return [c for v in value for c in _text(v)]
    return _text(value)


def _tally(counter: Counter, reason: str, message: str) -> None:
    counter[reason] += 1
    if counter[reason] <= LISTED:
        more = f" (after {LISTED}, rows like this are counted, not listed)" if counter[reason] == LISTED else ""
        log.warning(f"data: {message}{more}")


def _image_reason(value: Any) -> str:
    # A file to read (its bytes are not in the dataset) that is not there is missing, not corrupt.
    file = value.get("path") if isinstance(value, dict) and not value.get("bytes") else None
    return "image file not found" if file and not os.path.exists(file) else UNDECODABLE


def iter_examples(
    ds: datasets.Dataset | datasets.IterableDataset, cfg: DataConfig, skipped: Counter, desc: str = "",
    notes: Counter | None = None,
) -> Iterator[tuple[torch.Tensor, list[str], dict]]:
    """Yield (uint8 (3, R, R), candidate captions, the other columns), skipping bad rows: each is counted in
    `skipped` by reason and the first few are named in the log. `notes` counts rows kept but worth a mention."""
    notes = Counter() if notes is None else notes
    for index, row in enumerate(tqdm(ds, desc=desc or "decoding images", disable=not desc, mininterval=2.0)):
        if row.get(SKIP):  # a metadata row read_metadata could not use
            _tally(skipped, row[SKIP][0], f"skipped {row[SKIP][1]}")
            continue
        value = row[cfg.image_column]
        name = (value.get("path") if isinstance(value, dict) else None) or f"row {index}"
        image = decode_image(value)
        if image is None:
            reason = _image_reason(value)
            _tally(skipped, reason, f"skipped {name}: {reason}")
            continue
        captions = caption_list(row[cfg.caption_column])
        if not captions:
            _tally(skipped, "no caption", f"skipped {name}: no caption")
            continue
        if not any(c.strip() for c in captions):
            _tally(notes, EMPTY_CAPTION, f"kept {name} {EMPTY_CAPTION}")
        extra = {k: v for k, v in row.items() if k not in (cfg.image_column, cfg.caption_column, SKIP)}
        yield prepare(image, cfg.resolution), captions, extra


def summary(source: str, split: str, kept: int, skipped: Counter, notes: Counter | None = None) -> str:
    line = f"data: {source!r} split {split!r}: {kept} images"
    if notes:
        line += " (" + ", ".join(f"{n} {why}" for why, n in notes.most_common()) + ")"
    if skipped:
        reasons = ", ".join(f"{n} {why}" for why, n in skipped.most_common())
        line += f", skipped {sum(skipped.values())} ({reasons})"
    return line


# ---------------------------------------------------------------------------------------------------
# The two dataset forms training uses.

def pick_caption(captions: list[str], seed: int, draw: int, index: int) -> str:
    """One caption per sample, random but a pure function of (seed, draw, index), `draw` being the training
    step (or epoch) it is drawn for: resumable, worker-safe."""
    if len(captions) == 1:
        return captions[0]
    return captions[random.Random(f"{seed}/{draw}/{index}").randrange(len(captions))]


class ImageCaptions:
    """A split decoded once into memory: fast epochs for the small datasets a CPU trains on. Training draws
    rows of `images` by index and picks each row's caption from `captions` itself (`pick_caption`)."""

    def __init__(self, images: torch.Tensor, captions: list[list[str]], columns: dict[str, list]):
        self.images = images  # (N, 3, R, R) uint8
        self.captions = captions  # the candidate captions of each row
        self.columns = columns  # the dataset's other columns, a list per column

    @classmethod
    def from_split(cls, cfg: DataConfig, split: str, progress: bool = True) -> "ImageCaptions":
        skipped, notes = Counter(), Counter()
        images, captions, columns = [], [], {}
        ds = open_split(dataclasses.replace(cfg, streaming=False), split)
        desc = f"loading {split}" if progress else ""
        for image, caps, extra in iter_examples(ds, cfg, skipped, desc, notes):
            images.append(image)
            captions.append(caps)
            for key, value in extra.items():
                columns.setdefault(key, []).append(value)
        log.info(summary(dataset_source(cfg), split, len(images), skipped, notes))
        if not images:
            raise DataError(f"dataset {dataset_source(cfg)!r} split {split!r} has no usable images "
                            f"({sum(skipped.values())} skipped)")
        dataset = cls(torch.stack(images), captions, columns)
        dataset.skipped, dataset.notes = skipped, notes
        return dataset

    def __len__(self) -> int:
        return len(self.images)


class StreamingImageCaptions(torch.utils.data.IterableDataset):
    """A split streamed from disk or the hub, sharded across processes, decoded on the fly: yields its uint8
    images (3, R, R), what StreamBatches batches (the latent cache of a streamed split, encode_stream, reads
    captions and columns through `iter_examples` instead).

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
        self.notes: Counter = Counter()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.ds.set_epoch(epoch)

    def __iter__(self) -> Iterator[torch.Tensor]:
        kept = 0
        for image, _, _ in iter_examples(self.ds, self.cfg, self.skipped, notes=self.notes):
            kept += 1
            yield image
        log.info(summary(dataset_source(self.cfg), self.split, kept, self.skipped, self.notes))


def ensure_dataset(cfg: DataConfig) -> None:
    """Generate the embedded shapes or scenes dataset into `cfg.path` if it is not there yet; one generated
    with other settings is refused (training on it would silently ignore the config)."""
    info = Path(cfg.path) / f"{cfg.name}.json"
    if not cfg.generated:
        return
    if info.is_file():
        check_generated(cfg, json.loads(info.read_text()))
        return
    from mmdit.data import scenes, shapes

    if cfg.name == "shapes":
        shapes.generate(cfg.path, num_images=cfg.num_images, size=cfg.resolution, seed=cfg.seed, holdout=cfg.holdout,
                        partial_captions=cfg.partial_captions)
    else:
        scenes.generate(cfg.path, num_images=cfg.num_images, size=cfg.resolution, seed=cfg.seed, holdout=cfg.holdout)


def check_generated(cfg: DataConfig, info: dict) -> None:
    asked = {"size": cfg.resolution, "num_images": cfg.num_images, "seed": cfg.seed, "holdout": cfg.holdout}
    if cfg.name == "shapes":
        asked["partial_captions"] = cfg.partial_captions
    found = {k: info.get(k, 0.0 if k == "partial_captions" else None) for k in asked}
    if found != asked:
        differ = ", ".join(f"{k}={found[k]!r} (asked: {v!r})" for k, v in asked.items() if found[k] != v)
        raise DataError(f"{cfg.path} holds a {cfg.name} dataset generated with {differ}; accepted: the settings it "
                        f"was made with, or another data.path (or delete {cfg.path} to generate it anew)")


def split_captions(cfg: DataConfig, split: str) -> list[str]:
    """Every distinct caption of a split, in first-seen order, without decoding a single image."""
    ds = open_split(dataclasses.replace(cfg, streaming=False), split).select_columns([cfg.caption_column])
    seen: dict[str, None] = {}
    for value in ds[cfg.caption_column]:
        seen.update(dict.fromkeys(caption_list(value)))
    return list(seen)
