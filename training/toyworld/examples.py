"""Writes the demo's example images into ``assets/examples/`` (run once; the outputs are committed).

* Toy-world scenes (``training.toyworld.world``, test split, seed 0) for the bundled toy model, each with a
  vocabulary of its visible classes plus one class that is absent (to show what GPR suppresses).
* A real photograph for real CLIP weights: Grace Hopper (US Navy photo, public domain) as shipped in
  matplotlib's sample data.

    python -m training.toyworld.examples
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

OUT = Path(__file__).resolve().parents[2] / "assets" / "examples"
# Test-split indices of scenes with several creatures, chosen by eye for variety. Each example's vocabulary is
# computed from the scene's labels: the classes in it, plus the first stuff class that is *not* in it, so that
# the page's GPR chart shows a class being suppressed (issue #28). (The vocabularies written before were typed
# by hand and named classes the scenes do not hold.)
TOY_SCENES = (294, 165, 42)


def scene_vocabulary(labels: np.ndarray) -> str:
    """The classes of a label map in world order, then the first stuff class absent from it."""
    from .world import CLASS_NAMES, STUFF

    present = [CLASS_NAMES[k] for k in np.unique(np.asarray(labels)) if k < len(CLASS_NAMES)]
    absent = next(s for s in STUFF if s not in present)
    return ", ".join([*present, absent])
PHOTO_VOCABULARY = "face, hat, glasses, uniform, flag, sky, dog"


def main() -> None:
    from .world import ToyWorld

    OUT.mkdir(parents=True, exist_ok=True)
    world = ToyWorld("test", length=300, seed=0)
    index = []
    for i in TOY_SCENES:
        image, labels = world[i]
        vocabulary = scene_vocabulary(labels)
        name = f"toy_test_{i}.png"
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(OUT / name, optimize=True)
        index.append({"file": name, "vocabulary": vocabulary, "model": "toy"})
    import matplotlib

    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if photo.is_file():
        shutil.copyfile(photo, OUT / "grace_hopper.jpg")
        index.append({"file": "grace_hopper.jpg", "vocabulary": PHOTO_VOCABULARY, "model": "pretrained"})
    (OUT / "examples.json").write_text(json.dumps(index, indent=2) + "\n")
    print(f"wrote {len(index)} examples to {OUT}")


if __name__ == "__main__":
    main()
