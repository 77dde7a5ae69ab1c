"""The data: the embedded shapes dataset (shapes.py), its multi-object scenes (scenes.py), OpenMoji (openmoji.py),
and any Hugging Face dataset,
imagefolder or parquet directory (loader.py; streamed: stream.py). This package's config section lives here, so
that the data code imports without the models or the trainer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from mmdit.checks import check_int, check_seed, check_text


GENERATED = ("shapes", "scenes")


@dataclass
class DataConfig:
    # "shapes" / "scenes" = the embedded synthetic datasets (generated into `path` when missing); anything else
    # is a Hugging Face hub name, a local imagefolder / parquet directory, or a `save_to_disk` directory.
    name: str = "shapes"
    path: str = "data/shapes"  # where the shapes / scenes dataset lives; ignored for other datasets
    config_name: Optional[str] = None  # hub dataset configuration (the second argument of load_dataset)
    train_split: str = "train"
    val_split: str = "validation"
    image_column: str = "image"
    caption_column: str = "caption"
    resolution: int = 32
    streaming: bool = False
    # Generation (only used when name is "shapes" or "scenes"); holdout phrases: shapes.parse_holdout,
    # scenes.parse_holdout.
    num_images: int = 20000
    seed: int = 0
    holdout: list[str] = field(default_factory=list)
    partial_captions: float = 0.0  # shapes: the share of train captions naming only some attributes

    @property
    def generated(self) -> bool:
        """One of the embedded datasets, generated offline into `path`."""
        return self.name in GENERATED

    def __post_init__(self):
        check_text("data.name", self.name, "shapes, scenes, a Hugging Face dataset name or a local dataset directory")
        if self.generated:
            check_text("data.path", self.path, f"the directory of the {self.name} dataset (generated when missing)")
            check_int("data.num_images", self.num_images)
        check_int("data.resolution", self.resolution)
        if not 0 <= self.partial_captions <= 1:
            raise ValueError(f"data.partial_captions={self.partial_captions}; accepted: a share in [0, 1]")
        check_seed("data.seed", self.seed, bits=32)  # numpy's seed range: shapes generation, shuffling
