"""Shared dataset machinery: file lists, strict image/label reading, label spaces.

A dataset yields ``(image, label)`` pairs as numpy arrays: ``image`` H×W×3 uint8 RGB, ``label`` H×W
uint8 with class ids of its *label space* and ``ignore_index`` (255) for pixels that are not scored.
Transforms (``transforms.py``) turn them into tensors.  Every problem with a file raises
``DatasetError`` naming the path; files are only ever dropped with ``on_missing="skip"``, and then
the number dropped is logged and kept in ``dataset.skipped``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .classes import ClassSplit

log = logging.getLogger(__name__)

IGNORE_INDEX = 255


UNREADABLE_RECORD = "unreadable.txt"  # in a run folder: samples found unreadable (record_unreadable)
MAX_CONSECUTIVE_UNREADABLE = 16  # more than this in a row means a broken folder, not a few bad files


class DatasetError(RuntimeError):
    """A dataset folder, list file, image or label that cannot be used (message names the path)."""


def unreadable_names(path: str | os.PathLike) -> list[str]:
    """Sample names in a ``record_unreadable`` file, first occurrence order, duplicates dropped."""
    p = Path(path)
    if not p.is_file():
        return []
    names = [line.split("\t", 1)[0] for line in p.read_text(encoding="utf-8", errors="replace").splitlines()]
    return list(dict.fromkeys(n for n in names if n))


class DatasetSpecError(DatasetError, ValueError):
    """An unknown dataset name or a bad dataset option (``--dataset``, a toy-world spec): a user error, reported
    in one line like every DatasetError, and still a ValueError for callers that validate arguments."""


@dataclass(frozen=True)
class Sample:
    name: str
    image: Path
    label: Path


def read_split_file(path: Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"split list not found: {path}")
    try:
        names = [ln.strip() for ln in path.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read split list {path}: {exc}") from exc
    names = [n.split()[0] for n in names if n]
    if not names:
        raise DatasetError(f"split list is empty: {path}")
    return names


def require_dir(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"{what} folder not found: {path}")
    return path


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 H×W×3; grayscale/RGBA/palette images are converted, undecodable files raise."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im.convert("RGB"))
    except FileNotFoundError as exc:
        raise DatasetError(f"image not found: {path}") from exc
    except Exception as exc:  # PIL raises many types for truncated / corrupt files
        raise DatasetError(f"cannot decode image {path}: {exc}") from exc
    return np.ascontiguousarray(arr)


def read_label(path: Path) -> np.ndarray:
    """Label map as uint8 H×W.  Palette ('P', VOC SegmentationClass) and grayscale ('L') PNGs only:
    an RGB colour label would silently give wrong ids, so it raises."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("P", "L"):
                raise DatasetError(
                    f"label {path} has mode {im.mode!r}; expected a palette or 8-bit grayscale PNG "
                    "of class ids (run MMSegmentation's converter for this dataset)"
                )
            arr = np.asarray(im)
    except DatasetError:
        raise
    except FileNotFoundError as exc:
        raise DatasetError(f"label not found: {path}") from exc
    except Exception as exc:
        raise DatasetError(f"cannot decode label {path}: {exc}") from exc
    return np.ascontiguousarray(arr.astype(np.uint8, copy=False))


def build_lut(raw_to_class: dict[int, int], ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """int16 lookup of 256 raw ids: class id, ``ignore_index``, or -1 for ids that must not occur."""
    lut = np.full(256, -1, dtype=np.int16)
    lut[ignore_index] = ignore_index
    for raw, cls in raw_to_class.items():
        lut[raw] = cls
    return lut


class LabelSpace:
    """The vocabulary of a dataset in its label space; needs ``split`` (ClassSplit) and ``label_space``."""

    split: ClassSplit
    label_space: str

    @property
    def class_indices(self) -> tuple[int, ...]:
        """Indices into ``split.class_names`` of this label space's classes."""
        return self.split.seen if self.label_space == "seen" else tuple(range(self.split.num_classes))

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.split.class_names[i] for i in self.class_indices)

    @property
    def prompt_names(self) -> tuple[str, ...]:
        return tuple(self.split.prompt_names[i] for i in self.class_indices)

    @property
    def unseen_indices(self) -> tuple[int, ...]:
        """Unseen classes in this label space (none in the seen space)."""
        return () if self.label_space == "seen" else self.split.unseen

    @property
    def num_classes(self) -> int:
        return len(self.class_indices)


class SegmentationDataset(LabelSpace):
    """A list of (image, label) files with a raw-id → class-id mapping and a label space.

    ``label_space="full"``: labels index ``split.class_names``.  ``label_space="seen"`` (prompt
    learning): labels index the seen classes only, unseen pixels become ``ignore_index`` and the
    vocabulary (``class_names``/``prompt_names``) holds no unseen name.
    """

    def __init__(
        self,
        name: str,
        samples: Sequence[Sample],
        split: ClassSplit,
        raw_to_class: dict[int, int],
        label_space: str = "full",
        on_missing: str = "error",
        ignore_index: int = IGNORE_INDEX,
        description: str = "",
    ) -> None:
        if label_space not in ("full", "seen"):
            raise ValueError(f"label_space must be 'full' or 'seen', got {label_space!r}")
        if on_missing not in ("error", "skip"):
            raise ValueError(f"on_missing must be 'error' or 'skip', got {on_missing!r}")
        self.name = name
        self.split = split
        self.label_space = label_space
        self.ignore_index = ignore_index
        self.description = description
        raw_lut = build_lut(raw_to_class, ignore_index)
        if label_space == "seen":
            seen = split.seen_label_map(ignore_index).astype(np.int16)
            valid = raw_lut >= 0
            raw_lut = np.where(valid, seen[np.clip(raw_lut, 0, 255)], -1).astype(np.int16)
        self._lut = raw_lut
        self.on_missing = on_missing
        self.unreadable: set[int] = set()  # indices found corrupt while reading (on_missing="skip")
        self.unreadable_record: Path | None = None  # where found-corrupt sample names persist (record_unreadable)
        self.samples, self.skipped = self._check_files(list(samples), on_missing)
        if not self.samples:
            raise DatasetError(f"{name}: no samples left ({description})")

    def _check_files(self, samples: list[Sample], on_missing: str) -> tuple[list[Sample], int]:
        missing = [s for s in samples if not (s.image.is_file() and s.label.is_file())]
        if not missing:
            return samples, 0
        paths = [str(p) for s in missing[:5] for p in (s.image, s.label) if not p.is_file()]
        msg = (
            f"{self.name}: {len(missing)} of {len(samples)} samples have missing files, "
            f"e.g. {', '.join(paths)}"
        )
        if on_missing == "error":
            raise DatasetError(msg + " (use on_missing='skip' / --skip-missing to drop them)")
        log.warning("%s; skipping them", msg)
        bad = {id(s) for s in missing}
        return [s for s in samples if id(s) not in bad], len(missing)

    # -- items --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.samples)

    def map_label(self, raw: np.ndarray, path: Path) -> np.ndarray:
        out = self._lut[raw]
        if (out < 0).any():
            bad = np.unique(raw[out < 0])[:10].tolist()
            raise DatasetError(f"label {path} contains ids {bad} not valid for {self.name}")
        return out.astype(np.uint8)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image H×W×3 uint8, label H×W uint8). With ``on_missing="skip"`` a sample that cannot be read
        (corrupt file, size mismatch, invalid ids: found only when drawn) is replaced by the next readable one,
        logged once: the replacement is a function of the index, so ``--resume`` replays the same order and
        gets past it the same way instead of dying on it again."""
        if self.on_missing != "skip":
            return self._read(index)
        tries = min(len(self), MAX_CONSECUTIVE_UNREADABLE)
        for k in range(tries):
            i = (index + k) % len(self)
            if i in self.unreadable:  # known bad (this run or, via the record, an earlier one): not read again
                continue
            try:
                return self._read(i)
            except DatasetError as e:
                self.unreadable.add(i)
                log.warning("%s: skipping an unreadable sample (%s)", self.name, e)
                self._record(i, e)
        raise DatasetError(f"{self.name}: {tries} consecutive samples from index {index} are "
                           "unreadable; check the dataset folder")

    def record_unreadable(self, path: str | os.PathLike) -> int:
        """Persists the samples found unreadable to ``path`` (one ``name<TAB>reason`` line each, appended by
        whichever DataLoader worker finds it) and skips those already listed there without reading them, so
        a resumed run neither retries nor dies on them. Returns how many listed names are in this dataset."""
        self.unreadable_record = Path(path)
        index = {s.name: i for i, s in enumerate(self.samples)}
        listed = [index[n] for n in unreadable_names(self.unreadable_record) if n in index]
        self.unreadable.update(listed)
        return len(listed)

    def _record(self, index: int, error: Exception) -> None:
        if self.unreadable_record is None:
            return
        reason = " ".join(str(error).split())
        try:  # one short O_APPEND write per line: lines from several workers do not interleave
            self.unreadable_record.parent.mkdir(parents=True, exist_ok=True)
            with open(self.unreadable_record, "a", encoding="utf-8") as f:
                f.write(f"{self.samples[index].name}\t{reason}\n")
        except OSError as e:
            log.warning("could not record the unreadable sample in %s: %s", self.unreadable_record, e)

    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        s = self.samples[index]
        image = read_image(s.image)
        raw = read_label(s.label)
        if raw.shape != image.shape[:2]:
            raise DatasetError(
                f"label {s.label} is {raw.shape[1]}x{raw.shape[0]} but image {s.image} is "
                f"{image.shape[1]}x{image.shape[0]}"
            )
        return image, self.map_label(raw, s.label)

    def verify(self) -> None:
        """Decode every file once (slow); raises on the first bad one."""
        for i in range(len(self)):
            self[i]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name}, {len(self)} images, {self.num_classes} classes, "
            f"label_space={self.label_space}, skipped={self.skipped})"
        )
