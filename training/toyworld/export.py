"""``python -m training.toyworld export DIR --n N``: toy-world scenes written as a folder dataset.

Gives a ``--dataset folder`` tree (``training/datasets/folder.py``) that anyone can make offline, for the
"train on your own data" walk-through in docs/datasets.md::

    DIR/images/{train,val}_NNNN.png      RGB (PNG: lossless, the classes are named by colour)
    DIR/masks/{train,val}_NNNN.png       class ids of classes.txt, 255 = ignore
    DIR/classes.txt                      the 21 toy-world classes, the zero-shot split marked ``unseen``
    DIR/splits/{train,val}.txt           N − N/5 scenes of the world's train split, N/5 of its val split
    DIR/profile.json                     the toyworld profile: crop 128·zoom, native size, no photometric
                                         distortion (it would change the colour that names a class)

Scene *i* of a split is the one ``--dataset toyworld --data-root "seed=S,world=W"`` yields at index *i*,
with every class visible (the folder dataset hides unseen pixels itself while prompts are learned).
"""
from __future__ import annotations


import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ..datasets import PROFILES
from ..datasets.class_file import format_class_lines
from .dataset import ToyWorldDataset


def export_folder(out_dir: str | Path, n: int, seed: int = 0, world: str = "sparse", unseen: str = "a",
                  zoom: int = 1) -> dict[str, int]:
    """Writes ``n`` scenes (a fifth of them, at least one, for validation) as a folder dataset; returns
    {split: images written}."""
    if n < 2:
        raise SystemExit("--n must be at least 2 (one training and one validation scene)")
    out = Path(out_dir)
    if (out / "classes.txt").exists() or (out / "images").exists():
        raise SystemExit(f"{out} already holds a dataset (classes.txt or images/); choose a new folder")
    spec = f"seed={seed},world={world},unseen={unseen},zoom={zoom}"
    n_val = max(1, n // 5)
    counts = {"train": n - n_val, "val": n_val}
    split = None
    for part in ("images", "masks", "splits"):
        (out / part).mkdir(parents=True, exist_ok=True)
    for name, count in counts.items():
        ds = ToyWorldDataset(f"{spec},length={count}", name, label_space="full")
        split = ds.split
        stems = []
        for i in range(count):
            image, label = ds[i]
            stem = f"{name}_{i:04d}"
            Image.fromarray(image).save(out / "images" / f"{stem}.png")
            Image.fromarray(np.asarray(label, dtype=np.uint8), mode="L").save(out / "masks" / f"{stem}.png")
            stems.append(stem)
        (out / "splits" / f"{name}.txt").write_text("".join(s + "\n" for s in stems))
    (out / "classes.txt").write_text("\n".join(format_class_lines(split)) + "\n")
    prof = PROFILES["toyworld"]
    (out / "profile.json").write_text(json.dumps({
        "crop_size": prof.crop_size * zoom, "train_scale": None,
        "ratio_range": list(prof.ratio_range), "photometric": prof.photometric}, indent=2) + "\n")
    return counts


def main(argv: list[str] | None = None) -> int:
    from .world import UNSEEN_SPLITS, WORLDS

    p = argparse.ArgumentParser(prog="python -m training.toyworld export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="new folder for images/, masks/, classes.txt, splits/, profile.json")
    p.add_argument("--n", type=int, default=100, help="scenes in all (a fifth, at least one, for validation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world", default="sparse", choices=sorted(WORLDS))
    p.add_argument("--unseen", default="a", choices=sorted(UNSEEN_SPLITS), help="zero-shot split")
    p.add_argument("--zoom", type=int, default=1, help="pixel magnification (the zoom-2 toy CLIP needs 2)")
    a = p.parse_args(argv)
    counts = export_folder(a.out, a.n, a.seed, a.world, a.unseen, a.zoom)
    print(f"wrote {counts['train']} training and {counts['val']} validation scenes to {a.out}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
