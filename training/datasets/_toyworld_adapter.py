"""``toyworld`` behind the dataset interface (``training/toyworld.py`` renders the samples).

The toy world has no files: ``--data-root`` is a spec such as ``"length=400,seed=0,world=crowded"``
(keys ``length``, ``seed``, ``image_size``, ``world`` = a name in ``training.toyworld.WORLDS``; empty or
``-`` for the defaults: 200 images, seed 0, the 256 px "sparse" world).  Labels arrive with every class
visible; the label space (full / seen) is applied here exactly as for the real datasets.
"""
from __future__ import annotations

import numpy as np

from .base import IGNORE_INDEX, LabelSpace
from .classes import ClassSplit


def parse_spec(spec) -> dict:
    text = str(spec or "").strip()
    if text in ("", "-", "."):
        return {}
    from training.toyworld import WORLDS

    out: dict = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        ok = sep and (key in ("length", "seed", "image_size") and value.isdigit()
                      or key == "world" and value in WORLDS)
        if not ok:
            raise ValueError(f"bad toyworld spec {text!r} at {part!r}: expected e.g. "
                             f"'length=400,seed=0,world=crowded' (worlds: {', '.join(sorted(WORLDS))})")
        out["config" if key == "world" else key] = value if key == "world" else int(value)
    return out


class ToyWorldDataset(LabelSpace):
    """The procedural toy world (no files) in the full or seen label space."""

    def __init__(self, spec, split: str, label_space: str = "full") -> None:
        from training import toyworld as tw

        if label_space not in ("full", "seen"):
            raise ValueError(f"label_space must be 'full' or 'seen', got {label_space!r}")
        self.name = "toyworld"
        self.world = tw.ToyWorld(split=split, hide_unseen=False, **parse_spec(spec))
        names = tuple(tw.CLASS_NAMES)
        self.split = ClassSplit(names, names, tuple(tw.UNSEEN))
        self.label_space = label_space
        self.ignore_index = IGNORE_INDEX
        self.skipped = 0
        if label_space == "seen":
            self._lut = self.split.seen_label_map(IGNORE_INDEX)
        else:
            self._lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
            self._lut[: len(names)] = np.arange(len(names))

    def __len__(self) -> int:
        return len(self.world)

    def __getitem__(self, index: int):
        image, label = self.world[index]
        return np.ascontiguousarray(image, dtype=np.uint8), self._lut[label.astype(np.int64)]

    def __repr__(self) -> str:
        return (f"ToyWorldDataset({self.world.split}, {len(self)} images, {self.num_classes} classes, "
                f"label_space={self.label_space})")


def toyworld_dataset(spec, split: str, label_space: str = "full") -> ToyWorldDataset:
    return ToyWorldDataset(spec, split, label_space)
