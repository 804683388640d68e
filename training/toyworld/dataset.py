"""The toy world behind the dataset interface (``world.py`` renders the samples).

The toy world has no files: ``--data-root`` is a spec such as ``"length=400,seed=0,world=crowded"``
(keys ``length``, ``seed``, ``image_size``, ``zoom`` (pixel magnification, ``WorldConfig.zoom``),
``world`` = a name in ``training.toyworld.WORLDS``,
``background`` = ``class`` | ``ignore``, ``stuff`` = ``class`` | ``ignore`` (ignore: stuff pixels become 255 and
the four stuff names leave the vocabulary, as VOC's background does), ``unseen`` = a key of ``training.toyworld.UNSEEN_SPLITS`` (the
zero-shot split, default ``a``); empty or ``-`` for the defaults: 200 images, seed 0, the 256 px
"sparse" world, background scored as class 0).  Labels arrive with every class visible; the label space
(full / seen) is applied here exactly as for the real datasets.

``background=ignore`` is the protocol of the paper's Table 1 on PASCAL VOC (sec. 4.1: "we ignore the
background class"; mmseg's ``reduce_zero_label``): background pixels become 255 (neither trained on nor
scored), "background" leaves the vocabulary and the other 20 classes shift down by one.  The default
keeps background as class 0, as PASCAL Context does.
"""
from __future__ import annotations

import numpy as np

from ..datasets.base import IGNORE_INDEX, DatasetSpecError, LabelSpace
from ..datasets.classes import ClassSplit

BACKGROUND_MODES = ("class", "ignore")
MAX_SIDE = 2048  # rendered pixels per image side (image_size × zoom)
MAX_LENGTH = 10_000_000  # images in a bounded world (fresh sampling is unbounded anyway)


def parse_spec(spec) -> dict:
    text = str(spec or "").strip()
    if text in ("", "-", "."):
        return {}
    from .world import UNSEEN_SPLITS, WORLDS

    out: dict = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        ok = sep and key not in out and (
            key in ("length", "seed", "image_size") and value.isdigit()
            or key == "zoom" and value.isdigit() and int(value) >= 1
            or key == "world" and value in WORLDS
            or key in ("background", "stuff") and value in BACKGROUND_MODES
            or key == "unseen" and value in UNSEEN_SPLITS)
        if not ok:
            raise DatasetSpecError(f"bad toyworld spec {text!r} at {part!r}: expected e.g. "
                             f"'length=400,seed=0,world=voc,background=ignore,stuff=ignore,zoom=2' (worlds: "
                             f"{', '.join(sorted(WORLDS))}; background: {' | '.join(BACKGROUND_MODES)}; "
                             f"unseen: {' | '.join(sorted(UNSEEN_SPLITS))}; "
                             f"each key once)")
        out[key] = value if key in ("world", "background", "stuff", "unseen") else int(value)
    # Bounds, so a typo cannot ask for a 100000 px world (≈ 10 GB per image) or an empty one.
    side = out.get("image_size", 256) * out.get("zoom", 1)
    if not 16 <= out.get("image_size", 256) or side > MAX_SIDE or out.get("zoom", 1) > 8:
        raise DatasetSpecError(f"bad toyworld spec {text!r}: image_size must be ≥ 16 and image_size × zoom ≤ {MAX_SIDE} "
                         f"(got {side}), zoom ≤ 8")
    if "length" in out and not 1 <= out["length"] <= MAX_LENGTH:
        raise DatasetSpecError(f"bad toyworld spec {text!r}: length must be in 1…{MAX_LENGTH}, got {out['length']}")
    return out


class ToyWorldDataset(LabelSpace):
    """The procedural toy world (no files) in the full or seen label space."""

    def __init__(self, spec, split: str, label_space: str = "full") -> None:
        from . import world as tw

        if label_space not in ("full", "seen"):
            raise ValueError(f"label_space must be 'full' or 'seen', got {label_space!r}")
        opts = parse_spec(spec)
        self.background = opts.pop("background", "class")
        self.stuff = opts.pop("stuff", "class")
        self.unseen_split = opts.pop("unseen", "a")
        if "world" in opts:
            opts["config"] = opts.pop("world")
        self.name = "toyworld"
        self.world = tw.ToyWorld(split=split, hide_unseen=False, **opts)
        self.pixel_scale = self.world.config.zoom  # training crops grow with it (DatasetProfile.train_transform)
        # World class id -> full-label-space id; background (world id 0) and the stuff classes drop out
        # (their pixels become IGNORE_INDEX) when ignored.
        dropped = ({tw.BACKGROUND} if self.background == "ignore" else set()) | \
            (set(tw.STUFF) if self.stuff == "ignore" else set())
        names = tuple(n for n in tw.CLASS_NAMES if n not in dropped)
        full = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        for i, n in enumerate(tw.CLASS_NAMES):
            if n not in dropped:
                full[i] = names.index(n)
        unseen = [names.index(n) for n in tw.UNSEEN_SPLITS[self.unseen_split] if n in names]
        self.split = ClassSplit(names, names, tuple(unseen))
        self.label_space = label_space
        self.ignore_index = IGNORE_INDEX
        self.skipped = 0
        self._lut = full if label_space == "full" else self.split.seen_label_map(IGNORE_INDEX)[full]

    # Renders any index: prompt learning draws fresh scenes (``TrainStream(fresh=True)``) from ``unbounded()``.
    procedural = True

    def unbounded(self) -> "ToyWorldDataset":
        """This dataset with every non-negative index valid (sample i is still a pure function of
        (seed, split, i)); ``length`` then no longer limits what training draws."""
        import copy

        out = copy.copy(self)
        out.world = copy.copy(self.world)
        out.world.length = 1 << 62
        return out

    def __len__(self) -> int:
        return len(self.world)

    def __getitem__(self, index: int):
        image, label = self.world[index]
        return np.ascontiguousarray(image, dtype=np.uint8), self._lut[label.astype(np.int64)]

    def __repr__(self) -> str:
        return (f"ToyWorldDataset({self.world.split}, {len(self)} images, {self.num_classes} classes, "
                f"label_space={self.label_space}, background={self.background}, stuff={self.stuff})")


def toyworld_dataset(spec, split: str, label_space: str = "full") -> ToyWorldDataset:
    return ToyWorldDataset(spec, split, label_space)
