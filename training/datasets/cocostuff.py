"""COCO-Stuff 164k, 171 classes, MMSegmentation layout (``tools/convert_datasets/coco_stuff164k.py``).

``root`` is ``coco_stuff164k``::

    images/{train2017,val2017}/<id>.jpg
    annotations/{train2017,val2017}/<id>_labelTrainIds.png    ids 0..170, 255 = unlabeled

The image folder is listed (sorted) and every image needs its ``_labelTrainIds.png``.
"""
from __future__ import annotations

from pathlib import Path

from .base import DatasetError, Sample, SegmentationDataset, require_dir
from .classes import COCOSTUFF171

SPLITS = {"train": "train2017", "val": "val2017", "train2017": "train2017", "val2017": "val2017"}
LABEL_SUFFIX = "_labelTrainIds.png"


def cocostuff_samples(root: Path, split: str) -> list[Sample]:
    if split not in SPLITS:
        raise DatasetError(f"unknown COCO-Stuff split {split!r}; choose from {sorted(SPLITS)}")
    root = require_dir(Path(root), "COCO-Stuff root")
    sub = SPLITS[split]
    img_dir = require_dir(root / "images" / sub, "COCO-Stuff images")
    ann_dir = require_dir(root / "annotations" / sub, "COCO-Stuff annotations")
    images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() == ".jpg")
    if not images:
        raise DatasetError(f"no .jpg images in {img_dir}")
    return [Sample(p.stem, p, ann_dir / f"{p.stem}{LABEL_SUFFIX}") for p in images]


def cocostuff171(root: Path, split: str, label_space: str = "full", on_missing: str = "error"):
    return SegmentationDataset(
        "cocostuff171", cocostuff_samples(root, split), COCOSTUFF171, {i: i for i in range(171)},
        label_space, on_missing, description=f"COCO-Stuff {split} at {root}",
    )
