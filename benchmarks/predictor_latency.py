"""Latency of the predictor behind the demo: RN50 with random weights (same FLOPs as the real ones), CPU.

(a) bare image tower: MaskCLIP's dense forward (stem → layer4 → v_proj → c_proj) on the preprocessed image,
    nothing else — the floor of any request with a new image;
(b) warm request: a new image with a vocabulary whose text embeddings are cached
    (``set_image`` + ``predict`` + the full-size label map) — target ≤ 1.2 × (a); (a) and (b) alternate
    so that both see the same background load, and the ratio is the median of the per-pair ratios;
(c) fully cached request: same image, same vocabulary (head + label map only);
(d) new vocabulary of 10 classes, image cached: per prompt set (learned: 3 views + global prompt,
    n_ctx 32; MaskCLIP's 85 templates; the 3 part-based views).

Each figure is the median of ``--repeats`` runs after one warm-up. The image is 683×512 (MaskCLIP's short
side 512, so the predictor does not resize it).

    python benchmarks/predictor_latency.py [--repeats 5] [--threads 2] [--device cpu] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a plain script from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402

import mvpseg  # noqa: E402

# 10-class vocabularies: a fixed one (kept cached) and distinct fresh ones (never cached) per repetition.
CACHED = ("person", "dog", "cat", "car", "bus", "tree", "sky", "road", "building", "grass")
POOL = ("aeroplane bicycle bird boat bottle chair cow dining-table horse motorbike potted-plant sheep sofa train "
        "tv-monitor bag bed bench book box cabinet ceiling cup curtain door fence floor flower food fruit ground "
        "keyboard light mountain mouse paper plate platform river rock roof shelf sign snow table track truck wall "
        "water window wood clock vase lamp pillow towel mirror sink bridge tent umbrella kite skateboard surfboard "
        "banana apple orange pizza cake donut carrot broccoli sandwich laptop phone remote microwave oven toaster "
        "refrigerator scissors teddy-bear toothbrush hair-drier tie suitcase frisbee skis snowboard ball glove "
        "racket bowl knife spoon fork wine-glass hydrant stop-sign meter elephant bear zebra giraffe").split()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[int], object], i: int, device: torch.device) -> float:
    t0 = time.perf_counter()
    fn(i)
    sync(device)
    return time.perf_counter() - t0


def median_seconds(fn: Callable[[int], object], repeats: int, device: torch.device) -> tuple[float, list[float]]:
    """Median wall time of fn(i) over ``repeats`` calls, after one warm-up call fn(-1)."""
    timed(fn, -1, device)
    times = [timed(fn, i, device) for i in range(repeats)]
    return statistics.median(times), times


def fresh_vocabulary(i: int) -> tuple[str, ...]:
    start = (10 * (i + 1)) % len(POOL)
    return tuple(n.replace("-", " ") for n in (POOL + POOL)[start:start + 10])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--clip", default="RN50")
    p.add_argument("--out", default=None, help="write the results as JSON here too")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = mvpseg.resolve_device(args.device)
    torch.manual_seed(0)
    clip = mvpseg.load_clip(mvpseg.ClipSpec(args.clip, None), device)
    pred = mvpseg.build_predictor(clip, baselines=True)
    pred.add_prompt_set("learned", mvpseg.LearnedPrompts(clip.text_width, n_seg=3, n_ctx=32))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (512, 683, 3), dtype=np.uint8) for _ in range(args.repeats + 1)]
    results: dict = {"clip": f"{args.clip} (random weights)", "device": str(device), "threads": args.threads,
                     "repeats": args.repeats, "image": "683x512", "cpu": platform.processor() or platform.machine(),
                     "load_average_before": os.getloadavg()[0]}

    # (a) the bare dense image-tower forward on the preprocessed image, and (b) a warm request with a new
    # image and a cached vocabulary, interleaved so that both see the same background load; the ratio is
    # the median of the per-repetition ratios.
    x = clip.normalize(torch.from_numpy(images[0]).to(device).permute(2, 0, 1)[None].float() / 255.0)
    pred.set_image(images[0])
    pred.predict(CACHED, "learned")  # puts the vocabulary in the text cache

    def bare(i: int) -> None:
        with torch.no_grad():
            clip.dense_features(x)

    def warm(i: int) -> None:
        pred.set_image(images[i + 1])
        _ = pred.predict(CACHED, "learned").label_map

    before = dict(pred.stats)
    bare(-1)
    warm(-1)  # warm-up; every measured call then sees an image the predictor has not encoded yet
    pairs = [(timed(bare, i, device), timed(warm, i, device)) for i in range(args.repeats)]
    assert pred.stats["text_encodes"] == before["text_encodes"], "the vocabulary should have been cached"
    results["a_image_tower_s"] = statistics.median(a for a, _ in pairs)
    results["b_warm_request_s"] = statistics.median(b for _, b in pairs)
    results["b_over_a"] = statistics.median(b / a for a, b in pairs)
    results["pairs_s"] = [[round(a, 4), round(b, 4)] for a, b in pairs]

    # (c) same image, same vocabulary
    results["c_cached_request_s"], _ = median_seconds(lambda i: pred.predict(CACHED, "learned").label_map,
                                                      args.repeats, device)

    # (d) a new 10-class vocabulary per prompt set, image cached
    for name in ("learned", "maskclip-85", "parts"):
        offset = {"learned": 0, "maskclip-85": 100, "parts": 200}[name]
        results[f"d_new_vocabulary_{name}_s"], _ = median_seconds(
            lambda i: pred.predict(fresh_vocabulary(i + offset), name).label_map, args.repeats, device)
    results["load_average_after"] = os.getloadavg()[0]

    print(f"{results['clip']} on {device}, {args.threads} threads, median of {args.repeats} (load average "
          f"{results['load_average_before']:.1f} → {results['load_average_after']:.1f})")
    print(f"(a) bare image tower (dense forward)          {results['a_image_tower_s']:8.3f} s")
    print(f"(b) new image, cached vocabulary (10 classes)  {results['b_warm_request_s']:8.3f} s   "
          f"= {results['b_over_a']:.2f} × (a)   target ≤ 1.2×")
    print(f"(c) same image, same vocabulary               {results['c_cached_request_s']:8.3f} s")
    for name in ("learned", "maskclip-85", "parts"):
        print(f"(d) new 10-class vocabulary, {name:12s}     {results[f'd_new_vocabulary_{name}_s']:8.3f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
