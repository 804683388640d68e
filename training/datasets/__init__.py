"""Datasets for prompt learning / evaluation behind one small interface.

``build_dataset(name, root, split, label_space)`` returns an object with ``class_names``,
``prompt_names``, ``unseen_indices`` (in its label space), ``ignore_index``, ``__len__`` and
``__getitem__ -> (image H×W×3 uint8, label H×W uint8)``.  ``PROFILES[name]`` holds the MaskCLIP
crop/scale settings used to build transforms.  ``folder`` is any folder of images, masks and a class
list (``folder.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .base import (IGNORE_INDEX, UNREADABLE_RECORD, DatasetError, DatasetSpecError, SegmentationDataset,
                   unreadable_names)
from .classes import COCOSTUFF171, CONTEXT60, VOC20, ClassSplit
from .cocostuff import cocostuff171
from .context import context60
from .transforms import EvalTransform, TrainTransform
from .voc import voc20


@dataclass(frozen=True)
class DatasetProfile:
    """Per-dataset defaults from MaskCLIP's mmseg configs."""

    name: str
    factory: Callable[..., object]
    train_split: str
    eval_split: str
    train_scale: tuple[int, int] | None  # mmcv img_scale for the random resize (None: native size)
    crop_size: int
    eval_scale: tuple[int, int] | None  # mmcv img_scale for whole-image inference (None: native size)
    classes: ClassSplit | None = None
    ratio_range: tuple[float, float] = (0.5, 2.0)
    photometric: bool = True

    def train_transform(self, dataset: object = None, **overrides) -> TrainTransform:
        """The profile's training pipeline. A dataset rendered at a pixel magnification (``pixel_scale``, the
        toy world's ``zoom``) gets a crop that many times larger, so a crop covers the same scene area."""
        crop = self.crop_size * int(getattr(dataset, "pixel_scale", 1))
        kw = dict(scale=self.train_scale, crop_size=crop, ratio_range=self.ratio_range,
                  photometric=self.photometric)
        kw.update(overrides)
        return TrainTransform(**kw)

    def eval_transform(self, **overrides) -> EvalTransform:
        kw = dict(scale=self.eval_scale)
        kw.update(overrides)
        return EvalTransform(**kw)


@dataclass(frozen=True)
class FolderProfile(DatasetProfile):
    """``--dataset folder``: the training crop / scale come from the dataset (``FolderDataset.train_defaults``,
    chosen from its image sizes and ``profile.json``); evaluation never enlarges an image."""

    def train_transform(self, dataset: object = None, **overrides) -> TrainTransform:
        kw = dict(getattr(dataset, "train_defaults", {}))
        kw.update(overrides)  # the command line (--crop-size, --train-scale) wins over the folder's defaults
        return super().train_transform(None, **kw)

    def eval_transform(self, **overrides) -> EvalTransform:
        return super().eval_transform(**{"upscale": False, **overrides})


def _folder(root, split, label_space="full", on_missing="error"):
    from .folder import folder_dataset

    return folder_dataset(root, split, label_space, on_missing)


def _toyworld(root, split, label_space="full", on_missing="error"):
    from ..toyworld.dataset import toyworld_dataset

    return toyworld_dataset(root, split, label_space)


PROFILES: dict[str, DatasetProfile] = {
    "voc20": DatasetProfile("voc20", voc20, "train_aug", "val", (2048, 512), 512, (2048, 512), VOC20),
    # mmseg's Context configs use img_scale=(520, 520): under mmcv's keep-ratio rule the long side is 520.
    "context60": DatasetProfile(
        "context60", context60, "train", "val", (520, 520), 480, (520, 520), CONTEXT60
    ),
    "cocostuff171": DatasetProfile(
        "cocostuff171", cocostuff171, "train", "val", (2048, 512), 512, (2048, 512), COCOSTUFF171
    ),
    # Toy world: colour names classes ("red cat"), so no photometric distortion; object sizes are in
    # pixels (matched to the toy CLIP's pretraining crops), so images keep their native size whatever
    # the world's image_size.
    "toyworld": DatasetProfile("toyworld", _toyworld, "train", "val", None, 128, None,
                               ratio_range=(1.0, 1.0), photometric=False),
    # Your own data (folder.py): these are the fallbacks; a folder's image sizes and profile.json decide.
    "folder": FolderProfile("folder", _folder, "train", "val", (2048, 512), 512, (2048, 512)),
}
ALIASES = {"voc": "voc20", "context": "context60", "pascal_context": "context60",
           "cocostuff": "cocostuff171", "coco_stuff": "cocostuff171"}


def get_profile(name: str) -> DatasetProfile:
    key = ALIASES.get(name, name)
    if key not in PROFILES:
        raise DatasetSpecError(f"unknown dataset {name!r}; choose from {sorted(PROFILES)}")
    return PROFILES[key]


def ignores_background(name: str, root: str | Path) -> bool:
    """Whether the dataset's protocol ignores its background, as VOC's zero-shot setting does (the paper's
    Table 1, sec. 4.1): PASCAL VOC; a toy world with ``background=ignore``; a folder whose ids below
    ``label_offset`` (mmseg's ``reduce_zero_label``) are ignored. Context and COCO-Stuff label theirs.
    The default recipe turns calibrated GPR on where this holds (docs/recipe.md)."""
    key = get_profile(name).name
    if key == "voc20":
        return True
    if key == "toyworld":
        from ..toyworld.dataset import parse_spec as toy_spec

        return toy_spec(root).get("background") == "ignore"
    if key == "folder":
        from .folder import folder_settings

        return int(folder_settings(root)[1].get("label_offset", 0)) > 0
    return False


def build_dataset(name: str, root: str | Path, split: str | None = None, label_space: str = "full",
                  on_missing: str = "error", train: bool = False):
    """Build a dataset by name; ``split=None`` picks the profile's train or eval split."""
    prof = get_profile(name)
    if prof.name != "folder" and "::label_offset=" in str(root):
        raise DatasetSpecError(f"--label-offset / --reduce-zero-label apply to --dataset folder only, not {name!r}")
    if split is None:
        split = prof.train_split if train else prof.eval_split
    return prof.factory(Path(root), split, label_space=label_space, on_missing=on_missing)


__all__ = [
    "DatasetSpecError", "ignores_background", "UNREADABLE_RECORD", "unreadable_names",
    "ALIASES", "COCOSTUFF171", "CONTEXT60", "ClassSplit", "DatasetError", "DatasetProfile", "FolderProfile",
    "EvalTransform", "IGNORE_INDEX", "PROFILES", "SegmentationDataset", "TrainTransform", "VOC20",
    "build_dataset", "get_profile",
]
