"""Tiny datasets written in the on-disk layouts of MMSegmentation/MaskCLIP (for tests).

Each image is a flat background with a few coloured rectangles; the label map holds the raw ids of
the layout (VOC: 0 = background, 1..20, 255 boundary; Context: 0..59; COCO-Stuff: 0..170 + 255).
The writers return {split: [(name, set of raw ids in the written label)]} so tests can check what a loader sees.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def voc_palette() -> list[int]:
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def _scene(rng: np.random.Generator, h: int, w: int, bg: int, ids: list[int], boundary: int | None):
    label = np.full((h, w), bg, np.uint8)
    image = np.empty((h, w, 3), np.uint8)
    image[:] = rng.integers(0, 256, 3)
    for k, cid in enumerate(ids):
        y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        y1, x1 = y0 + h // 3 + k, x0 + w // 3 + k
        label[y0:y1, x0:x1] = cid
        image[y0:y1, x0:x1] = (np.array([37, 91, 151]) * (cid + 1)) % 256
        if boundary is not None:
            label[y0, x0:x1] = boundary
    image = np.clip(image.astype(np.int16) + rng.integers(-8, 9, image.shape), 0, 255)
    return image.astype(np.uint8), label


def _save(image: np.ndarray, label: np.ndarray, img_path: Path, lbl_path: Path, palette=None):
    img_path.parent.mkdir(parents=True, exist_ok=True)
    lbl_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(img_path, quality=95)
    lab = Image.fromarray(label, mode="L")
    if palette is not None:
        lab = lab.convert("P")
        lab.putpalette(palette)
    lab.save(lbl_path)


def make_voc(root: Path, h: int = 40, w: int = 56, seed: int = 0,
             class_sets: dict | None = None) -> dict:
    """VOCdevkit/VOC2012 with train (SegmentationClass, palette), val, and aug (SegmentationClassAug)."""
    rng = np.random.default_rng(seed)
    voc = Path(root) / "VOCdevkit" / "VOC2012"
    class_sets = class_sets or {
        "train": [[1, 15], [17, 8], [13, 20]],  # aeroplane+person, sheep+cat, horse+tvmonitor
        "val": [[1, 16], [18, 3], [8, 9, 17]],
        "aug": [[5, 19], [2]],
    }
    out = {}
    for split, sets in class_sets.items():
        names = []
        ann = "SegmentationClassAug" if split == "aug" else "SegmentationClass"
        for i, ids in enumerate(sets):
            name = f"2007_{split}{i:03d}"
            image, label = _scene(rng, h, w, 0, ids, boundary=255)
            pal = None if split == "aug" else voc_palette()
            _save(image, label, voc / "JPEGImages" / f"{name}.jpg", voc / ann / f"{name}.png", pal)
            names.append((name, set(np.unique(label).tolist())))
        lst = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
        lst.parent.mkdir(parents=True, exist_ok=True)
        lst.write_text("".join(n + "\n" for n, _ in names))
        out[split] = names
    return out


def make_context(root: Path, h: int = 36, w: int = 48, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    base = Path(root) / "VOCdevkit" / "VOC2010"
    sets = {"train": [[20, 37], [15, 59], [3]], "val": [[1, 23], [49, 50]]}
    out = {}
    for split, groups in sets.items():
        names = []
        for i, ids in enumerate(groups):
            name = f"2008_{split}{i:03d}"
            image, label = _scene(rng, h, w, 0, ids, boundary=None)
            _save(image, label, base / "JPEGImages" / f"{name}.jpg",
                  base / "SegmentationClassContext" / f"{name}.png")
            names.append((name, set(np.unique(label).tolist())))
        lst = base / "ImageSets" / "SegmentationContext" / f"{split}.txt"
        lst.parent.mkdir(parents=True, exist_ok=True)
        lst.write_text("".join(n + "\n" for n, _ in names))
        out[split] = names
    return out


def make_cocostuff(root: Path, h: int = 32, w: int = 44, seed: int = 2) -> dict:
    rng = np.random.default_rng(seed)
    base = Path(root) / "coco_stuff164k"
    sets = {"train2017": [[0, 19], [23, 156], [160, 105]], "val2017": [[29, 0], [137, 170]]}
    out = {}
    for split, groups in sets.items():
        names = []
        for i, ids in enumerate(groups):
            name = f"{i + 1:012d}"
            image, label = _scene(rng, h, w, 255, ids, boundary=None)
            _save(image, label, base / "images" / split / f"{name}.jpg",
                  base / "annotations" / split / f"{name}_labelTrainIds.png")
            names.append((name, set(np.unique(label).tolist())))
        out[split] = names
    return out


def write_tiny_clip(folder: Path, seed: int = 0) -> list[str]:
    """Saves mvpseg's tiny random-weight CLIP (config JSON + safetensors weights) to ``folder`` and
    returns the CLI arguments that load it (``--clip … --model-config … --pretrained …``)."""
    from safetensors.torch import save_file

    from mvpseg.testing import tiny_clip, tiny_config_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clip = tiny_clip(seed=seed)
    weights = folder / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()}, str(weights))
    cfg = tiny_config_file(folder)
    return ["--clip", "mvpseg-tiny", "--model-config", str(cfg), "--pretrained", str(weights)]


def make_folder(root: Path, n: int = 6, h: int = 40, w: int = 56, seed: int = 3,
                classes: str = "background\ncat\ndog unseen\ngrass | green grass\n",
                offset: int = 0, ext: str = ".png") -> dict:
    """A ``--dataset folder`` tree (training/datasets/folder.py): images/, masks/ (ids + ``offset``),
    classes.txt; no splits/ (the seeded split applies).  Returns {name: set of raw ids in its mask}."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text(classes)
    n_classes = len([ln for ln in classes.splitlines() if ln.strip()])
    out = {}
    for i in range(n):
        ids = [int(c) + offset for c in rng.choice(np.arange(1, n_classes), size=2, replace=False)]
        image, label = _scene(rng, h, w, offset, ids, boundary=255)
        if offset:
            label[-3:] = 0  # unlabelled pixels, as ADE20K's id 0
        name = f"img{i:02d}"
        _save(image, label, root / "images" / f"{name}{ext}", root / "masks" / f"{name}.png")
        out[name] = set(np.unique(label).tolist())
    return out


def make_selection_voc(root: Path) -> tuple[Path, list[str]]:
    """The small VOC tree of the model-selection and GPR-fit tests (20 training images of two or three classes,
    one validation image) under ``root``/data, and a tiny CLIP: (root, its CLI arguments)."""
    sets = {"train": [[1 + i % 14, 1 + (5 * i + 3) % 14] + ([16 + i % 5] if i % 3 == 0 else []) for i in range(20)],
            "val": [[1, 16]], "aug": [[2, 3]]}
    make_voc(Path(root) / "data", class_sets=sets)
    return Path(root), write_tiny_clip(Path(root) / "clip")
