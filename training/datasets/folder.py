"""Your own data: a folder of images, masks and a class list (``--dataset folder --data-root DIR``).

Layout::

    DIR/images/<name>.{jpg,jpeg,png,bmp,tif,tiff,webp}   any RGB / gray image; sub-folders allowed
    DIR/masks/<name>.png          8-bit single-channel ('L' or palette) class ids, 255 = ignore
    DIR/classes.txt               class names in id order, zero-shot split, prompt names (class_file.py)
    DIR/splits/{train,val}.txt    optional: one <name> per line (any other split: splits/<split>.txt)
    DIR/profile.json              optional: settings below

``<name>`` is the image's path under ``images/`` without its extension (``aachen/x_000019`` for
``images/aachen/x_000019.png``), so Cityscapes-style trees work.  Splits ``train`` and ``val`` are
read from ``splits/`` when that folder exists; otherwise a seeded split is used: an image is in
``val`` when sha1("<split_seed>:<name>") read as a fraction of 2^160 is below ``val_fraction``
(0.2; seed 0).  That rule depends on the image's own name only, so adding or removing images never
moves the others between splits (with at least one image kept on each side).  Split ``all`` is every image.

**Label ids** (mmseg's ``reduce_zero_label``, generalised): with ``label_offset = K`` the mask id of
the class on line *i* of classes.txt is *i + K*, and ids below K are ignored like 255.  ADE20K's masks
(0 = "other", classes from 1) need ``K = 1``: ``--reduce-zero-label`` or ``--label-offset 1`` on the
command line, or ``"label_offset": 1`` in profile.json.  Cityscapes ``*_labelTrainIds.png`` need none
(give ``"mask_suffix": "_gtFine_labelTrainIds.png", "image_suffix": "_leftImg8bit.png"``: as in
mmseg, ``<name>`` is then the image file name minus ``image_suffix`` and the mask is ``<name> + mask_suffix``).
Any other id in a mask stops the run with an error naming the file (``--skip-missing`` only drops
*missing* files, never wrong ones).

**Data-root spec.** The command-line switches travel in the data root so that they are recorded with
the run: ``--data-root DIR --label-offset 1`` is ``--data-root "DIR::label_offset=1"`` (both forms work).

**Profile** (crop and scales, ``FolderProfile``): chosen from the images' median size, MaskCLIP's
VOC/COCO settings for photos and the native size for small images —

* short side > 512 px: random resize of img_scale (2048, 512) × U(0.5, 2), crop 512;
* otherwise: random resize of the native size × U(0.5, 2), crop = the median short side;
* evaluation and validation: keep-ratio resize to (2048, 512) that never enlarges an image.

``--crop-size`` / ``--train-scale`` (training) and ``--eval-scale`` (evaluation) override them, and
profile.json may set ``crop_size``, ``train_scale`` ([long, short] or null = native), ``ratio_range``
and ``photometric`` (false for data whose classes are named by colour, e.g. the toy world's export).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from statistics import median

import numpy as np

from .base import DatasetError, Sample, SegmentationDataset, read_split_file, require_dir
from .class_file import read_class_file

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SPEC_SEPARATOR = "::"
PHOTO_SHORT_SIDE = 512  # MaskCLIP's VOC / COCO-Stuff short side; smaller images keep their size
SIZE_PROBE = 256  # images whose header is read to choose the profile (evenly spaced over the list)
# profile.json keys -> accepted value check (the message says what is expected)
_PROFILE_KEYS = {
    "label_offset": ("an integer 0..254", lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 255),
    "image_suffix": ("a file-name ending such as '_leftImg8bit.png'", lambda v: isinstance(v, str) and "." in v),
    "mask_suffix": ("a file-name ending such as '.png'", lambda v: isinstance(v, str) and v.endswith(".png")),
    "val_fraction": ("a number in (0, 1)", lambda v: isinstance(v, (int, float)) and 0 < v < 1),
    "split_seed": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "crop_size": ("a positive integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0),
    "train_scale": ("[long, short] or null (native size)",
                    lambda v: v is None or (isinstance(v, list) and len(v) == 2
                                            and all(isinstance(x, int) and x > 0 for x in v))),
    "ratio_range": ("[low, high] with 0 < low <= high",
                    lambda v: isinstance(v, list) and len(v) == 2
                    and all(isinstance(x, (int, float)) for x in v) and 0 < v[0] <= v[1]),
    "photometric": ("true or false", lambda v: isinstance(v, bool)),
}
TRAIN_KEYS = ("crop_size", "train_scale", "ratio_range", "photometric")


def compose_spec(root: str | Path, label_offset: int | None = None) -> str:
    """``DIR`` plus command-line options as a data-root spec (``DIR::label_offset=1``)."""
    return str(root) if label_offset is None else f"{root}{SPEC_SEPARATOR}label_offset={int(label_offset)}"


def parse_spec(spec: str | Path) -> tuple[Path, dict]:
    """``"DIR"`` or ``"DIR::label_offset=K"`` / ``"DIR::reduce_zero_label"`` → (DIR, options)."""
    text = str(spec)
    root, sep, rest = text.partition(SPEC_SEPARATOR)
    opts: dict = {}
    for part in (p.strip() for p in rest.split(",") if p.strip()) if sep else ():
        key, eq, value = part.partition("=")
        if key == "reduce_zero_label" and (not eq or value in ("1", "true", "True")):
            opts["label_offset"] = 1
        elif key == "label_offset" and value.isdigit() and int(value) < 255:
            opts["label_offset"] = int(value)
        else:
            raise DatasetError(f"bad folder data-root option {part!r} in {text!r}: expected "
                               "'DIR::label_offset=K' or 'DIR::reduce_zero_label'")
    return Path(root.rstrip("/") or "/"), opts


def read_profile_file(path: Path) -> dict:
    """The optional ``profile.json`` (plain JSON, checked key by key; unknown keys are errors)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise DatasetError(f"{path} must hold a JSON object of settings")
    for key, value in data.items():
        if key not in _PROFILE_KEYS:
            raise DatasetError(f"{path}: unknown setting {key!r}; known: {', '.join(_PROFILE_KEYS)}")
        what, ok = _PROFILE_KEYS[key]
        if not ok(value):
            raise DatasetError(f"{path}: {key} must be {what}, got {value!r}")
    return data


def folder_settings(spec: str | Path) -> tuple[Path, dict]:
    """(DIR, settings) of a data-root spec: profile.json's settings, the spec's options winning (the command
    line over the folder's file)."""
    root, cli_opts = parse_spec(spec)
    return root, {**read_profile_file(root / "profile.json"), **cli_opts}


def list_images(image_dir: Path, image_suffix: str | None) -> dict[str, Path]:
    """name → image path for every image under ``image_dir`` (recursive, hidden files skipped)."""
    found: dict[str, Path] = {}
    for p in sorted(image_dir.rglob("*")):
        rel = p.relative_to(image_dir)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        if image_suffix is not None:
            if not p.name.endswith(image_suffix):
                continue
            name = rel.as_posix()[: -len(image_suffix)]
        elif p.suffix.lower() in IMAGE_EXTENSIONS:
            name = rel.with_suffix("").as_posix()
        else:
            continue
        if name in found:
            raise DatasetError(f"two images named {name!r}: {found[name]} and {p} (masks are matched by name)")
        found[name] = p
    return found


def in_val(name: str, seed: int, fraction: float) -> bool:
    """The seeded split rule: sha1("<seed>:<name>") as a fraction of 2^160 below ``fraction``."""
    return _hash_fraction(name, seed) < fraction


def _hash_fraction(name: str, seed: int) -> float:
    return int(hashlib.sha1(f"{seed}:{name}".encode()).hexdigest(), 16) / float(1 << 160)


def seeded_split(names: list[str], split: str, seed: int = 0, fraction: float = 0.2) -> list[str]:
    """``train`` / ``val`` of ``names`` by ``in_val``, keeping at least one image on each side."""
    if len(names) < 2:
        raise DatasetError(f"an automatic train/val split needs at least 2 images, found {len(names)}; "
                           "add splits/train.txt and splits/val.txt")
    val = {n for n in names if in_val(n, seed, fraction)}
    ranked = sorted(names, key=lambda n: _hash_fraction(n, seed))
    if not val:
        val = {ranked[0]}  # the image closest to the rule
    elif len(val) == len(names):
        val.discard(ranked[-1])
    return [n for n in names if (n in val) == (split == "val")]


def image_sizes(paths: list[Path], probe: int = SIZE_PROBE) -> list[tuple[int, int]]:
    """(h, w) from the headers of up to ``probe`` evenly spaced images (nothing is decoded)."""
    from PIL import Image

    step = max(1, len(paths) // probe)
    sizes = []
    for p in paths[::step][:probe]:
        try:
            with Image.open(p) as im:
                sizes.append((im.height, im.width))
        except Exception:  # an unreadable file is reported, with its path, when it is read for training
            continue
    return sizes


def size_defaults(sizes: list[tuple[int, int]]) -> dict:
    """``TrainTransform`` keywords from image sizes (H, W): MaskCLIP's photo settings, native size for small images."""
    if not sizes:
        return {}
    short = int(median(min(s) for s in sizes))
    if short > PHOTO_SHORT_SIDE:
        return {"scale": (2048, PHOTO_SHORT_SIDE), "crop_size": PHOTO_SHORT_SIDE}
    return {"scale": None, "crop_size": short}


class FolderDataset(SegmentationDataset):
    """A folder dataset (module docstring) in the full or seen label space.

    Items are ``(image H×W×3 uint8, label H×W uint8)`` like every dataset; ``train_defaults`` holds
    the profile settings chosen for this folder (``FolderProfile.train_transform`` uses them).
    """

    def __init__(self, spec: str | Path, split: str, label_space: str = "full", on_missing: str = "error") -> None:
        root, settings = folder_settings(spec)
        root = require_dir(root, "dataset")
        image_dir = require_dir(root / "images", "images")
        mask_dir = require_dir(root / "masks", "masks")
        classes = read_class_file(root / "classes.txt")
        self.root, self.label_offset = root, int(settings.get("label_offset", 0))
        if self.label_offset + classes.num_classes > 255:
            raise DatasetError(f"{root / 'classes.txt'}: {classes.num_classes} classes from id {self.label_offset} "
                               "pass 254 (255 is the ignore id)")
        mask_suffix = settings.get("mask_suffix", ".png")
        images = list_images(image_dir, settings.get("image_suffix"))
        if not images:
            raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {image_dir}")
        names = self._split_names(root, split, sorted(images), settings, on_missing)
        samples = [Sample(n, images.get(n, image_dir / f"{n}{settings.get('image_suffix', '.jpg')}"),
                          mask_dir / f"{n}{mask_suffix}") for n in names]
        raw_to_class = {i + self.label_offset: i for i in range(classes.num_classes)}
        raw_to_class.update({r: 255 for r in range(self.label_offset)})  # below the offset: ignored
        super().__init__("folder", samples, classes, raw_to_class, label_space, on_missing,
                         description=f"{split} split of {root}")
        chosen = size_defaults(image_sizes([s.image for s in self.samples]))
        for key in TRAIN_KEYS:  # profile.json wins over the sizes' choice
            if key in settings:
                value = settings[key]
                chosen["scale" if key == "train_scale" else key] = tuple(value) if isinstance(value, list) else value
        self.train_defaults = chosen  # TrainTransform keywords

    @staticmethod
    def _split_names(root: Path, split: str, names: list[str], settings: dict, on_missing: str) -> list[str]:
        if split == "all":
            return names
        split_dir = root / "splits"
        if split_dir.is_dir():
            listed = read_split_file(split_dir / f"{split}.txt")
            known = set(names)
            absent = [n for n in listed if n not in known]
            if absent and on_missing == "error":
                raise DatasetError(f"{split_dir / f'{split}.txt'} names {len(absent)} images not under "
                                   f"{root / 'images'}, e.g. {', '.join(absent[:5])} (--skip-missing drops them)")
            return listed  # absent ones have a non-existent path: the base class counts them as skipped
        if split not in ("train", "val"):
            raise DatasetError(f"unknown split {split!r} for {root}: without a splits/ folder only train, val "
                               "and all exist")
        return seeded_split(names, split, int(settings.get("split_seed", 0)),
                            float(settings.get("val_fraction", 0.2)))

    def map_label(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """Raw mask ids → label-space ids; ids that are no class of classes.txt raise naming the file."""
        out = self._lut[raw]
        if (out < 0).any():
            bad = np.unique(raw[out < 0])[:10].tolist()
            first, last = self.label_offset, self.label_offset + self.split.num_classes - 1
            raise DatasetError(f"mask {path} contains ids {bad} outside classes.txt ({self.split.num_classes} "
                               f"classes: ids {first}..{last}, 255 = ignore"
                               + (f", below {first} = ignore" if first else "") + ")")
        return out.astype(np.uint8)


def folder_dataset(root, split: str, label_space: str = "full", on_missing: str = "error") -> FolderDataset:
    """The ``PROFILES['folder']`` factory (``root`` is a data-root spec: ``DIR`` or ``DIR::label_offset=K``)."""
    return FolderDataset(root, split, label_space, on_missing)
