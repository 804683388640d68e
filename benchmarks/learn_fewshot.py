"""Few-shot prompt learning as the Learn tab runs it (issue #25), measured in one run.

Toy world, bundled toy CLIP, offline: ``--scenes`` labelled scenes (validation split, every class labelled),
learned with the Learn tab's defaults (``mvpseg.learning.learn_prompts``, its hard time budget included), then
evaluated on ``--eval`` held-out test-split scenes with the same 21 class names against "a photo of a {}." and
MaskCLIP's 85 templates — once from full masks, once from scribbles (the core of every labelled region, ≤ 10 %
of the pixels, as a few brush strokes would give). Per seed: seconds, mIoU of each, the gain over
"a photo of a {}." and how much of it the scribbles keep. With ``--rn50``: RN50 (random weights, real FLOPs)
seconds per learning iteration on CPU for an 8-class vocabulary, and its image tower per image.

    python benchmarks/learn_fewshot.py                    # 3 seeds, ≈ 2 min on 2 CPU cores
    python benchmarks/learn_fewshot.py --seeds 0 --rn50
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHORT_SIDE = 256


def scribbles(labels, max_share: float = 0.10):
    """The core of every labelled region (pixels deepest inside it by distance transform), thinned until
    at most ``max_share`` of the image is labelled; everything else 255."""
    import cv2
    import numpy as np

    out = np.full_like(labels, 255)
    depth = np.zeros(labels.shape, np.float32)
    for c in np.unique(labels):
        if c == 255:
            continue
        region = (labels == c).astype(np.uint8)
        d = cv2.distanceTransform(region, cv2.DIST_L2, 3)
        depth = np.maximum(depth, d / max(float(d.max()), 1e-6))  # relative depth: small regions keep a core too
    for thr in np.linspace(0.5, 0.98, 25):
        keep = depth >= thr
        if keep.mean() <= max_share:
            break
    out[keep] = labels[keep]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenes", type=int, default=10)
    p.add_argument("--eval", type=int, default=100, help="held-out test-split scenes")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rn50", action="store_true", help="also time RN50 (random weights) per iteration")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    import mvpseg
    from mvpseg.learning import FewShotSettings, LabelledImage, encode_examples, learn_prompts, segmentation_miou
    from training.toyworld import CLASS_NAMES, ToyWorld

    torch.set_num_threads(2)
    clip = mvpseg.load_clip(mvpseg.TOY_CLIP_SPEC)
    names = tuple(CLASS_NAMES)
    test = ToyWorld("test", length=args.eval, seed=0)
    held_out = encode_examples(clip, [LabelledImage(*map(np.asarray, test[i])) for i in range(len(test))],
                               SHORT_SIDE)
    sets = mvpseg.baseline_prompt_sets()
    ref = {n: segmentation_miou(clip, sets[n], held_out, names) for n in ("a-photo-of", "maskclip-85")}
    settings = FewShotSettings()
    print(f"toy CLIP, {args.scenes} labelled scenes, {len(held_out)} held-out scenes, {len(names)} classes; "
          f"settings: k={settings.n_seg}, n_ctx={settings.n_ctx}, {settings.iterations} iterations, budget "
          f"{settings.time_budget_s:.0f} s; torch threads {torch.get_num_threads()}")
    print(f"handcrafted on the held-out scenes: a photo of a {{}}. {ref['a-photo-of']:.1f} · 85 templates "
          f"{ref['maskclip-85']:.1f} mIoU")
    gains, kept, secs = [], [], []
    for seed in [int(s) for s in args.seeds.split(",")]:
        world = ToyWorld("val", length=args.scenes, seed=100 + seed)
        full = [LabelledImage(np.asarray(img), np.asarray(lab).astype(np.uint8)) for img, lab in
                (world[i] for i in range(args.scenes))]
        scrib = [LabelledImage(e.rgb, scribbles(e.labels)) for e in full]
        share = np.mean([(e.labels != 255).mean() for e in scrib])
        row = {}
        for kind, examples in (("full masks", full), ("scribbles", scrib)):
            r = learn_prompts(clip, examples, names, FewShotSettings(seed=seed), short_side=SHORT_SIDE)
            row[kind] = (segmentation_miou(clip, r.prompts, held_out, names), r.seconds, r.stopped)
        gain = row["full masks"][0] - ref["a-photo-of"]
        gains.append(gain)
        secs.append(row["full masks"][1])
        kept.append((row["scribbles"][0] - ref["a-photo-of"]) / gain if gain > 0 else float("nan"))
        print(f"seed {seed}: full masks {row['full masks'][0]:.1f} mIoU in {row['full masks'][1]:.0f} s "
              f"({row['full masks'][2]}), Δ vs a photo of a {{}}. {gain:+.1f}, vs 85 templates "
              f"{row['full masks'][0] - ref['maskclip-85']:+.1f} | scribbles ({share:.1%} of pixels) "
              f"{row['scribbles'][0]:.1f} in {row['scribbles'][1]:.0f} s, Δ {row['scribbles'][0] - ref['a-photo-of']:+.1f}"
              f" ({kept[-1]:.0%} of the gain kept)")
    print(f"mean Δ vs a photo of a {{}}.: {statistics.mean(gains):+.2f} (min {min(gains):+.2f}); scribbles keep "
          f"{statistics.mean(kept):.0%} of the gain; seconds per job: max {max(secs):.0f} (bound 120)")

    if args.rn50:
        from mvpseg.learning import PromptLearner
        from mvpseg.model import MVPSeg

        rn = mvpseg.load_clip(mvpseg.ClipSpec("RN50", None))
        rgb = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(
            Path(__file__).resolve().parent.parent / "assets" / "examples" / "grace_hopper.jpg").convert("RGB"))
        labels = np.zeros(rgb.shape[:2], np.uint8)
        t = time.perf_counter()
        data = encode_examples(rn, [LabelledImage(rgb, labels)], 512)
        tower = time.perf_counter() - t
        vocab = ("person", "uniform", "tie", "flag", "wall", "curtain", "medal", "sky")
        model = MVPSeg(rn, mvpseg.LearnedPrompts(rn.text_width, n_seg=3, n_ctx=settings.n_ctx))
        learner = PromptLearner(model, settings.recipe)
        learner.step(*data[0], vocab)
        t = time.perf_counter()
        for _ in range(3):
            learner.step(*data[0], vocab)
        per_iter = (time.perf_counter() - t) / 3
        print(f"RN50 (random weights), 512×600 image, 8 classes, k=3, n_ctx={settings.n_ctx}: image tower "
              f"{tower:.2f} s per image (once), {per_iter:.2f} s per learning iteration on CPU → "
              f"{settings.iterations} iterations ≈ {settings.iterations * per_iter:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
