"""PASCAL VOC 2012, 20 classes (background ignored), MMSegmentation/MaskCLIP layout.

``root`` is ``VOCdevkit/VOC2012`` (or ``VOCdevkit``)::

    JPEGImages/<name>.jpg
    SegmentationClass/<name>.png        palette PNG, ids 0..20, 255 = boundary
    SegmentationClassAug/<name>.png     grayscale PNG (SBD, from mmseg's voc_aug converter)
    ImageSets/Segmentation/{train,val,aug}.txt

Splits: ``train``, ``val`` (SegmentationClass), ``aug`` (SegmentationClassAug) and ``train_aug`` =
train + aug, which is MaskCLIP's ``voc12aug_20`` training set.  Label 0 (background) is ignored and
1..20 become 0..19 (mmseg's ``reduce_zero_label``).
"""
from __future__ import annotations

from pathlib import Path

from .base import DatasetError, Sample, SegmentationDataset, read_split_file, require_dir
from .classes import VOC20

SPLITS = {
    "train": (("train", "SegmentationClass"),),
    "val": (("val", "SegmentationClass"),),
    "aug": (("aug", "SegmentationClassAug"),),
    "train_aug": (("train", "SegmentationClass"), ("aug", "SegmentationClassAug")),
}


def resolve_root(root: Path) -> Path:
    root = Path(root)
    if not (root / "JPEGImages").is_dir() and (root / "VOC2012" / "JPEGImages").is_dir():
        root = root / "VOC2012"
    require_dir(root, "VOC2012 root")
    require_dir(root / "JPEGImages", "VOC2012 JPEGImages")
    return root


def voc_samples(root: Path, split: str) -> list[Sample]:
    if split not in SPLITS:
        raise DatasetError(f"unknown VOC split {split!r}; choose from {sorted(SPLITS)}")
    root = resolve_root(root)
    samples: list[Sample] = []
    for list_name, ann_dir in SPLITS[split]:
        require_dir(root / ann_dir, f"VOC2012 {ann_dir}")
        for n in read_split_file(root / "ImageSets" / "Segmentation" / f"{list_name}.txt"):
            samples.append(Sample(n, root / "JPEGImages" / f"{n}.jpg", root / ann_dir / f"{n}.png"))
    return samples


def voc20(root: Path, split: str, label_space: str = "full", on_missing: str = "error"):
    raw_to_class = {0: 255, **{i: i - 1 for i in range(1, 21)}}
    return SegmentationDataset(
        "voc20", voc_samples(root, split), VOC20, raw_to_class, label_space, on_missing,
        description=f"VOC2012 {split} at {root}",
    )
