"""Speed of the dense-feature modes, whole image vs sliding window, as ratios against maskclip-vit.

open_clip ViT-B-16 with random weights (same FLOPs as the real ones, nothing downloaded) on one 4:3 image whose
short side is ``--size`` (448 → 448×608): seconds per image for ``dense_features`` (whole image, positional
embedding interpolated) and ``sliding_dense_features`` (224-px windows, stride 112, the papers' setting), each
divided by maskclip-vit's time for the same inference in this run. RN50 "maskclip" is measured for reference
(sliding stride 96: ResNet windows must move by multiples of 32 px).

    python benchmarks/dense_modes.py [--repeats 3] [--threads 2] [--size 448]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from anywhere

import open_clip  # noqa: E402

from mvpseg.dense import dense_features, sliding_dense_features  # noqa: E402

VIT_MODES = ("maskclip-vit", "sclip", "clearclip", "naclip")


def _round_robin(fns: dict[str, object], repeats: int) -> dict[str, list[float]]:
    """Wall times of every function, interleaved: one warm-up round, then ``repeats`` rounds calling each once, so
    load from other jobs drifting over the run hits all modes alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(repeats):
            for key, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=448, help="short side in pixels (multiple of 32)")
    args = ap.parse_args(argv)
    if args.size % 32:
        ap.error("--size must be a multiple of 32")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    h, w = args.size, round(args.size * 4 / 3 / 32) * 32
    image = torch.randn(1, 3, h, w)
    vit = open_clip.create_model("ViT-B-16", pretrained=None).eval().visual
    rn = open_clip.create_model("RN50", pretrained=None).eval().visual
    runs = [("ViT-B-16", vit, m, 112) for m in VIT_MODES] + [("RN50", rn, "maskclip", 96)]
    fns = {}
    for tower, visual, mode, stride in runs:
        fns[(tower, mode, "whole")] = lambda v=visual, m=mode: dense_features(v, image, m)
        fns[(tower, mode, "sliding")] = lambda v=visual, m=mode, s=stride: sliding_dense_features(v, image, m, 224, s)
    print(f"image {h}×{w}, {args.threads} thread(s), {args.repeats} interleaved rounds after a warm-up; medians")
    times = _round_robin(fns, args.repeats)
    results: dict[str, dict[str, float]] = {}
    print(f"{'tower/mode':24s} {'whole s':>8s} {'× mcvit':>8s} {'sliding s':>10s} {'× mcvit':>8s} {'slide/whole':>12s}")
    for tower, _, mode, stride in runs:
        r = {"stride": stride}
        for kind in ("whole", "sliding"):
            own, base = times[(tower, mode, kind)], times[("ViT-B-16", "maskclip-vit", kind)]
            r[f"{kind}_s"] = statistics.median(own)
            r[f"{kind}_ratio"] = statistics.median(a / b for a, b in zip(own, base))  # same-round ratios
        r["sliding_over_whole"] = statistics.median(
            a / b for a, b in zip(times[(tower, mode, "sliding")], times[(tower, mode, "whole")]))
        results[f"{tower}/{mode}"] = r
        print(f"{tower + '/' + mode:24s} {r['whole_s']:8.3f} {r['whole_ratio']:8.2f} {r['sliding_s']:10.3f} "
              f"{r['sliding_ratio']:8.2f} {r['sliding_over_whole']:12.2f}"
              + ("" if stride == 112 else f"   (sliding 224/{stride})"))
    return results


if __name__ == "__main__":
    main()
