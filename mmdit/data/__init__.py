"""The data: the embedded shapes dataset (shapes.py), OpenMoji (openmoji.py), and any Hugging Face dataset,
imagefolder or parquet directory (loader.py; streamed: stream.py). This package's config section lives here, so
that the data code imports without the models or the trainer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from mmdit.checks import check_int, check_seed, check_text


@dataclass
class DataConfig:
    # "shapes" = the embedded synthetic dataset (generated into `path` when missing); anything else is a
    # Hugging Face hub name, a local imagefolder / parquet directory, or a `save_to_disk` directory.
    name: str = "shapes"
    path: str = "data/shapes"  # where the shapes dataset lives; ignored for other datasets
    config_name: Optional[str] = None  # hub dataset configuration (the second argument of load_dataset)
    train_split: str = "train"
    val_split: str = "validation"
    image_column: str = "image"
    caption_column: str = "caption"
    resolution: int = 32
    streaming: bool = False
    # Shapes generation (only used when name == "shapes").
    num_images: int = 20000
    seed: int = 0
    holdout: list[str] = field(default_factory=list)

    def __post_init__(self):
        check_text("data.name", self.name, "shapes, a Hugging Face dataset name or a local dataset directory")
        if self.name == "shapes":
            check_text("data.path", self.path, "the directory of the shapes dataset (generated when missing)")
            check_int("data.num_images", self.num_images)
        check_int("data.resolution", self.resolution)
        check_seed("data.seed", self.seed, bits=32)  # numpy's seed range: shapes generation, shuffling
