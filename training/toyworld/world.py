"""Toy world: a procedural, seeded world of images with pixel labels and captions.

Why it exists: pretrained CLIP weights cannot be downloaded here, and with random weights nothing
shows that prompt learning *works*. This world is small enough to pretrain a tiny CLIP on CPU
(``training/pretrain_toyclip.py``) and still has what makes open-vocabulary segmentation hard:

* **Objects built from shared parts.** A creature has a body (oval | box), a head (round | pointy)
  and limbs (tail | wings). The four creatures use a parity code over those three slots, so every
  part value is shared by two creatures and no single part identifies a creature; the colour is
  shared by four classes. A class is "<colour> <creature>", e.g. ``"red cat"``: names are real
  words composed compositionally, so an unseen class such as ``"green cat"`` is spelt with words
  the text encoder saw in other classes (and, as in real CLIP, in pretraining captions).
* **Stuff**: large textured regions (grass, water, sand, brick) in the same four colours.
* **Background** (class 0) with **clutter**: loose creature parts and unrelated shapes in class
  colours, labelled background, so a part seen alone is *not* an object.
* Varied scale, rotation, mirroring, position (partly out of frame), occlusion, colour jitter, noise.

Zero-shot split (like the paper's VOC/COCO splits): ``UNSEEN_NAMES`` appear in pretraining captions
but never in prompt-learning masks or vocabularies; ``ToyWorld(split="train")`` marks their pixels
``IGNORE_INDEX``.

Every sample is a pure function of ``(seed, split, index)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np
import torch

from . import draw

IGNORE_INDEX = 255
BACKGROUND = "background"

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (196, 52, 44), "blue": (48, 84, 204), "green": (52, 158, 64), "yellow": (222, 196, 48),
}
# name -> (body, head, limbs). Parity code: any two slots identify the creature, no single one does.
CREATURES: dict[str, tuple[str, str, str]] = {
    "cat": ("oval", "round", "tail"), "bird": ("oval", "pointy", "wings"),
    "owl": ("box", "round", "wings"), "fox": ("box", "pointy", "tail"),
}
# stuff name -> (colour, texture kind)
STUFF: dict[str, tuple[str, str]] = {
    "grass": ("green", "stripes_v"), "water": ("blue", "waves"),
    "sand": ("yellow", "speckle"), "brick": ("red", "bricks"),
}
OBJECT_NAMES: list[str] = [f"{c} {k}" for k in CREATURES for c in COLOURS]
CLASS_NAMES: list[str] = [BACKGROUND, *OBJECT_NAMES, *STUFF]
# A Latin square over (colour, creature): every word of an unseen name occurs in seen names.
UNSEEN_NAMES: tuple[str, ...] = ("green cat", "red bird", "yellow owl", "blue fox", "sand")
UNSEEN: list[int] = [CLASS_NAMES.index(n) for n in UNSEEN_NAMES]
# Alternative zero-shot splits (spec key ``unseen=``), each another Latin square plus one stuff class, so a
# prompt-learning recipe can be checked on classes it was not developed on. "a" is the default above.
UNSEEN_SPLITS: dict[str, tuple[str, ...]] = {
    "a": UNSEEN_NAMES,
    "b": ("red cat", "yellow bird", "blue owl", "green fox", "water"),
    # Added for the second addendum (docs/history/recipe-addenda.md), before any prompt was learned with it.
    "c": ("yellow cat", "blue bird", "green owl", "red fox", "brick"),
}
SEEN: list[int] = [i for i in range(len(CLASS_NAMES)) if i not in UNSEEN]
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2, "pretrain": 3}


@dataclass(frozen=True)
class WorldConfig:
    """Scene statistics. Sizes are in scene pixels (before ``zoom``) so a 64 px pretraining crop and a
    256 px evaluation image show objects at the same scale (the dense path has no positional embedding)."""

    image_size: int = 256
    object_size: tuple[float, float] = (22.0, 42.0)  # body length in px; a creature spans ~2× that
    objects: tuple[int, int] = (2, 6)  # inclusive range of objects per image
    stuff: tuple[int, int] = (1, 3)  # stuff regions (distinct classes)
    stuff_coverage: tuple[float, float] = (0.15, 0.45)  # fraction of the image per region
    clutter: tuple[int, int] = (2, 8)  # loose parts / distractor shapes
    clutter_scale: tuple[float, float] = (0.5, 1.0)  # clutter size relative to object_size
    centre_range: tuple[float, float] = (-0.1, 1.1)  # object centres, as a fraction of the image side
    colour_jitter: float = 30.0  # ± per channel, per instance
    max_angle: float = 0.4  # radians
    noise: float = 6.0  # std of additive Gaussian pixel noise
    # Magnification: every rendered pixel becomes a zoom×zoom block, so images are
    # (image_size·zoom)² and objects span zoom× more feature cells of a fixed-stride network, while the
    # scenes (and their random draws) stay exactly those of zoom 1.
    zoom: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.zoom, int) and self.zoom >= 1):
            raise ValueError(f"zoom must be an integer >= 1, got {self.zoom!r}")


# Named scene layouts for segmentation (the toy CLIP's pretraining crops are PRETRAIN_CONFIG below):
# * "sparse" (the default): 256 px, 2–6 objects; background ≈ 49 %, stuff ≈ 47 %, objects ≈ 4 % of
#   the labelled pixels — a Context-like world where small objects are a sliver of the pixels.
# * "crowded": the same objects, stuff, clutter and pixel scale in 128 px images with 4–10 objects
#   whose centres stay in the frame; background ≈ 38 %, stuff ≈ 32 %, objects ≈ 30 % (shares measured
#   on 100 val images). Chosen from these label statistics alone, before any prompt was learned on
#   it, so that a per-pixel loss weighs objects about as much as mIoU does (docs/toyworld.md).
WORLDS: dict[str, WorldConfig] = {
    "sparse": WorldConfig(),
    "crowded": WorldConfig(image_size=128, objects=(4, 10), centre_range=(0.0, 1.0)),
    # Designed for docs/recipe.md before any prompt was learned on it: between the two in object density,
    # fewer and larger stuff regions, less clutter; 192 px.
    "medium": WorldConfig(image_size=192, objects=(3, 8), stuff=(1, 2), stuff_coverage=(0.2, 0.5),
                          clutter=(1, 5), centre_range=(-0.05, 1.05)),
    # VOC-like (issues #24, #27, #28; designed from the paper's setting before any prompt was learned on it):
    # one or two creatures in a 96 px frame, kept mostly inside it, over stuff and clutter that VOC would call
    # background — use it with the spec's ``background=ignore,stuff=ignore`` so that only the 16 creature
    # classes are labelled, scored and named, and most classes are absent from any one image (what GPR filters).
    "voc": WorldConfig(image_size=96, objects=(1, 2), stuff=(1, 2), stuff_coverage=(0.2, 0.5), clutter=(0, 3),
                       centre_range=(0.2, 0.8)),
}

# Pretraining crops: same pixel scale, fewer things, objects kept mostly inside the small frame.
PRETRAIN_CONFIG = WorldConfig(image_size=64, objects=(0, 2), stuff=(0, 2), clutter=(0, 2), centre_range=(0.15, 0.85))


@dataclass
class Layer:
    """One painted element. ``pixels`` (H×W×3 float32) is only meaningful inside ``mask`` (H×W bool)."""

    label: int
    kind: str  # "background" | "stuff" | "object" | "clutter"
    mask: np.ndarray
    pixels: np.ndarray


@dataclass
class Scene:
    """Layers in painting order (first = bottom). ``rng_state`` seeds the final pixel noise."""

    size: int
    layers: list[Layer] = field(default_factory=list)
    noise: float = 0.0
    noise_seed: int = 0


class Rendered(NamedTuple):
    image: np.ndarray  # H×W×3 uint8 RGB
    label: np.ndarray  # H×W int64 class indices into CLASS_NAMES
    owner: np.ndarray  # H×W int64 index of the visible layer at each pixel


# ----------------------------------------------------------------------------------------------
# Scene sampling
# ----------------------------------------------------------------------------------------------


def _creature_layer(rng: np.random.Generator, cfg: WorldConfig, label: int) -> Layer:
    colour, creature = CLASS_NAMES[label].split(" ")
    shape = (cfg.image_size, cfg.image_size)
    size = rng.uniform(*cfg.object_size)
    # Centre may lie near the border: objects are sometimes cut by the frame.
    cx, cy = rng.uniform(*cfg.centre_range, 2) * cfg.image_size
    angle, flip = rng.uniform(-cfg.max_angle, cfg.max_angle), bool(rng.random() < 0.5)
    base = draw.jitter_colour(rng, COLOURS[colour], cfg.colour_jitter)
    pixels = np.zeros((*shape, 3), np.float32)
    mask = np.zeros(shape, bool)
    body, head, limbs = CREATURES[creature]
    # Limbs first (behind the body), head last; each part its own shade so parts stay visible.
    for part, gain in ((limbs, 0.78), (body, 1.0), (head, 1.18)):
        m = draw.fill_polygons(shape, [draw.place(p, size, angle, flip, cx, cy) for p in draw.PART_POLYGONS[part]])
        pixels[m] = np.clip(base * gain, 0, 255)
        mask |= m
    pixels[draw.outline(mask)] *= 0.45  # dark contour, as in a drawing
    eye = draw.place(np.array([[0.68 if head == "round" else 0.5, -0.34]]), size, angle, flip, cx, cy)[0]
    ex, ey = round(float(eye[0])), round(float(eye[1]))
    r = max(1, int(size / 14))
    ys, xs = np.ogrid[: shape[0], : shape[1]]
    eye_mask = ((xs - ex) ** 2 + (ys - ey) ** 2 <= r * r) & mask
    pixels[eye_mask] = 20.0
    return Layer(label, "object", mask, pixels)


def _clutter_layer(rng: np.random.Generator, cfg: WorldConfig) -> Layer:
    shape = (cfg.image_size, cfg.image_size)
    pool = {**draw.PART_POLYGONS, **draw.CLUTTER_POLYGONS}
    name = list(pool)[int(rng.integers(len(pool)))]
    size = rng.uniform(*cfg.object_size) * rng.uniform(*cfg.clutter_scale)
    cx, cy = rng.uniform(0, 1, 2) * cfg.image_size
    poly = [p - p.mean(0) for p in pool[name]] if name in draw.PART_POLYGONS else pool[name]
    mask = draw.fill_polygons(shape, [draw.place(p, size, rng.uniform(0, 2 * np.pi), False, cx, cy) for p in poly])
    # Half the clutter wears a class colour, so colour alone does not make an object.
    rgb = COLOURS[list(COLOURS)[int(rng.integers(len(COLOURS)))]] if rng.random() < 0.5 else tuple(rng.integers(30, 226, 3))
    pixels = np.broadcast_to(draw.jitter_colour(rng, rgb, cfg.colour_jitter), (*shape, 3)).copy()
    pixels[draw.outline(mask)] *= 0.45
    return Layer(0, "clutter", mask, pixels)


def sample_scene(rng: np.random.Generator, cfg: WorldConfig) -> Scene:
    """Draw a random scene: background, stuff regions, then objects and clutter in random order."""
    n = cfg.image_size
    shape = (n, n)
    grey = rng.uniform(90, 190) + rng.uniform(-25, 25, 3)  # low-saturation background colour
    scene = Scene(n, noise=cfg.noise, noise_seed=int(rng.integers(2**31)))
    scene.layers.append(Layer(0, "background", np.ones(shape, bool), draw.texture("plain", rng, shape, grey)))
    stuff_names = list(STUFF)
    for k in rng.permutation(len(stuff_names))[: int(rng.integers(cfg.stuff[0], cfg.stuff[1] + 1))]:
        name = stuff_names[int(k)]
        colour, kind = STUFF[name]
        cov = rng.uniform(*cfg.stuff_coverage)
        mask = draw.band_mask(rng, shape, cov) if rng.random() < 0.5 else draw.blob_mask(rng, shape, cov)
        pixels = draw.texture(kind, rng, shape, draw.jitter_colour(rng, COLOURS[colour], cfg.colour_jitter))
        scene.layers.append(Layer(CLASS_NAMES.index(name), "stuff", mask, pixels))
    n_obj = int(rng.integers(cfg.objects[0], cfg.objects[1] + 1))
    n_clu = int(rng.integers(cfg.clutter[0], cfg.clutter[1] + 1))
    kinds = rng.permutation(["object"] * n_obj + ["clutter"] * n_clu)
    for kind in kinds:
        if kind == "object":
            label = 1 + int(rng.integers(len(OBJECT_NAMES)))
            scene.layers.append(_creature_layer(rng, cfg, label))
        else:
            scene.layers.append(_clutter_layer(rng, cfg))
    return scene


def magnify(array: np.ndarray, zoom: int) -> np.ndarray:
    """Pixel replication: H×W(×C) → (H·zoom)×(W·zoom)(×C); labels stay exactly aligned with pixels."""
    return array if zoom == 1 else np.repeat(np.repeat(array, zoom, axis=0), zoom, axis=1)


def render(scene: Scene) -> Rendered:
    """Paint layers bottom to top; the label of a pixel is the label of the layer painted last."""
    n = scene.size
    image = np.zeros((n, n, 3), np.float32)
    owner = np.zeros((n, n), np.int64)
    for i, layer in enumerate(scene.layers):
        image[layer.mask] = layer.pixels[layer.mask]
        owner[layer.mask] = i
    labels = np.array([layer.label for layer in scene.layers], np.int64)
    if scene.noise > 0:
        image += np.random.default_rng(scene.noise_seed).normal(0.0, scene.noise, image.shape).astype(np.float32)
    return Rendered(np.clip(np.round(image), 0, 255).astype(np.uint8), labels[owner], owner)


def visible_classes(scene: Scene, rendered: Rendered, min_fraction: float = 0.4,
                    min_pixels: int = 30, min_stuff: float = 0.08) -> list[int]:
    """Classes a caption may name: objects with ≥ ``min_fraction`` of their area and ≥ ``min_pixels``
    pixels visible, stuff covering ≥ ``min_stuff`` of the image. Sorted class indices."""
    counts = np.bincount(rendered.owner.ravel(), minlength=len(scene.layers))
    out: set[int] = set()
    for i, layer in enumerate(scene.layers):
        big_object = layer.kind == "object" and counts[i] >= max(min_pixels, min_fraction * layer.mask.sum())
        big_stuff = layer.kind == "stuff" and counts[i] >= min_stuff * rendered.owner.size
        if big_object or big_stuff:
            out.add(layer.label)
    return sorted(out)


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of sample ``index`` of ``split``: independent of workers and iteration order."""
    return np.random.default_rng([seed, SPLITS[split], index])


class ToyWorld(torch.utils.data.Dataset):
    """Segmentation dataset over the toy world, with the conventions of a real one.

    ``dataset[i]`` → ``(image, label)``: ``image`` H×W×3 uint8 RGB, ``label`` H×W int64 indices into
    ``class_names`` with ``ignore_index`` (255) for pixels that must not be scored or trained on.
    In ``split="train"`` unseen classes are hidden (their pixels become 255) unless
    ``hide_unseen=False``; other splits keep every label. Class 0 is ``"background"`` and is scored,
    as in PASCAL Context-60. ``config`` is a ``WorldConfig`` or the name of one in ``WORLDS``.
    """

    class_names: list[str] = CLASS_NAMES
    unseen: list[int] = UNSEEN
    seen: list[int] = SEEN
    ignore_index: int = IGNORE_INDEX

    def __init__(self, split: str = "val", length: int = 200, seed: int = 0,
                 config: WorldConfig | str | None = None, image_size: int | None = None,
                 hide_unseen: bool | None = None, zoom: int | None = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if isinstance(config, str) and config not in WORLDS:
            raise ValueError(f"unknown toy world {config!r}; choose from {sorted(WORLDS)}")
        cfg = WORLDS[config] if isinstance(config, str) else (config or WorldConfig())
        self.config = replace(cfg, image_size=image_size) if image_size else cfg
        if zoom is not None:
            self.config = replace(self.config, zoom=zoom)
        self.split, self.length, self.seed = split, int(length), int(seed)
        self.hide_unseen = (split == "train") if hide_unseen is None else bool(hide_unseen)

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> Scene:
        """The scene of sample ``index`` (layers, for inspection and tests)."""
        if not 0 <= index < self.length:
            raise IndexError(index)
        return sample_scene(sample_rng(self.seed, self.split, index), self.config)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        r = render(self.scene(index))
        label = r.label
        if self.hide_unseen:
            label = np.where(np.isin(label, self.unseen), self.ignore_index, label)
        return magnify(r.image, self.config.zoom), magnify(label, self.config.zoom)


def export_examples(out_dir: str, count: int = 3, seed: int = 0) -> list[str]:
    """Write ``toy_<k>.png`` demo images: the first ``count`` test-split scenes that show an unseen
    object (so the demo can show zero-shot classes). Returns the paths."""
    from pathlib import Path

    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds = ToyWorld("test", 10_000, seed=seed)
    unseen_objects = [c for c in UNSEEN if CLASS_NAMES[c] in OBJECT_NAMES]
    paths: list[str] = []
    for i in range(len(ds)):
        image, label = ds[i]
        if np.isin(label, unseen_objects).sum() >= 150:
            paths.append(str(out / f"toy_{len(paths) + 1}.png"))
            Image.fromarray(image).save(paths[-1])
            if len(paths) == count:
                break
    return paths


