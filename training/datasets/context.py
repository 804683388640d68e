"""PASCAL Context, 60 classes with background kept as class 0 (the paper's zero-shot setting).

``root`` is ``VOCdevkit/VOC2010`` (or ``VOCdevkit``), as written by mmseg's
``tools/convert_datasets/pascal_context.py``::

    JPEGImages/<name>.jpg
    SegmentationClassContext/<name>.png     ids 0..59 (0 = background)
    ImageSets/SegmentationContext/{train,val}.txt
"""
from __future__ import annotations

from pathlib import Path

from .base import DatasetError, Sample, SegmentationDataset, read_split_file, require_dir
from .classes import CONTEXT60

SPLITS = ("train", "val")


def resolve_root(root: Path) -> Path:
    root = Path(root)
    if not (root / "JPEGImages").is_dir() and (root / "VOC2010" / "JPEGImages").is_dir():
        root = root / "VOC2010"
    require_dir(root, "VOC2010 root")
    require_dir(root / "JPEGImages", "VOC2010 JPEGImages")
    require_dir(root / "SegmentationClassContext", "PASCAL Context SegmentationClassContext")
    return root


def context_samples(root: Path, split: str) -> list[Sample]:
    if split not in SPLITS:
        raise DatasetError(f"unknown PASCAL Context split {split!r}; choose from {list(SPLITS)}")
    root = resolve_root(root)
    names = read_split_file(root / "ImageSets" / "SegmentationContext" / f"{split}.txt")
    return [
        Sample(n, root / "JPEGImages" / f"{n}.jpg", root / "SegmentationClassContext" / f"{n}.png")
        for n in names
    ]


def context60(root: Path, split: str, label_space: str = "full", on_missing: str = "error"):
    return SegmentationDataset(
        "context60", context_samples(root, split), CONTEXT60, {i: i for i in range(60)},
        label_space, on_missing, description=f"PASCAL Context {split} at {root}",
    )
