"""Latency of the predictor behind the demo: RN50 with random weights (same FLOPs as the real ones), CPU.

(a) bare image tower: MaskCLIP's dense forward (stem → layer4 → v_proj → c_proj) on the preprocessed image,
    nothing else — the floor of any request with a new image;
(b) warm request: a new image with a vocabulary whose text embeddings are cached
    (``set_image`` + ``predict`` + the full-size label map) — target ≤ 1.2 × (a); (a) and (b) alternate
    so that both see the same background load, and the ratio is the median of the per-pair ratios;
(c) fully cached request: same image, same vocabulary (head + label map only);
(d) new vocabulary of 10 classes, image cached: per prompt set (learned: 3 views + global prompt,
    n_ctx 32; MaskCLIP's 85 templates; the 3 part-based views). Its text part (``Prediction.timings``) is
    also given as a ratio to the FLOP floor: the text tower's FLOPs for exactly these sentences (every
    token through every block, plus causal attention and the projection) at the fp32 GEMM rate measured
    just before and just after it (a (2048 × W) @ (W × 4W) product) — target ≤ 1.5 × for the 85 templates;
(e) the same 10 classes plus one new class, right after (d) (the 10 are cached per class): ratio to (d)'s
    cost, median of the per-repetition ratios — target ≤ 0.15 ×;
(f) a restart: a fresh predictor on the same disk cache folder, the 10 classes of a vocabulary seen by the
    previous one (one run per prompt set).

Each figure is the median of ``--repeats`` runs after one warm-up. The image is 683×512 (MaskCLIP's short
side 512, so the predictor does not resize it). On a shared machine, only ratios measured within one run
mean much; the load average before and after is printed.

    python benchmarks/predictor_latency.py [--repeats 5] [--threads 2] [--device cpu] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
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


def gemm_gflops(width: int, device: torch.device, rows: int = 2048, repeats: int = 3) -> float:
    """Measured fp32 rate of a (rows × W) @ (W × 4W) product: the text tower's typical GEMM."""
    a = torch.randn(rows, width, device=device)
    b = torch.randn(width, 4 * width, device=device)
    a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * rows * width * 4 * width * repeats / (time.perf_counter() - t0) / 1e9


def sentence_lengths(pred: "mvpseg.Predictor", name: str, classes: tuple[str, ...]) -> list[int]:
    """Token count (SOT … EOT) of every sentence the prompt set runs through the text tower for ``classes``."""
    ps, clip = pred.prompt_set(name), pred.clip
    if isinstance(ps, mvpseg.LearnedPrompts):
        eot = ps._frozen_tokens(clip, classes)[2]
        return (eot + 1).tolist() * ps.ctx.shape[0]
    tokens = clip.tokenize([t.format(n) for tpls in ps.views for t in tpls for n in classes])
    return (tokens.argmax(-1) + 1).tolist()


def text_flops(clip: "mvpseg.FrozenCLIP", lengths: list[int]) -> float:
    """Every token through every block (QKV, output, MLP), causal attention, the final projection."""
    blocks = clip.model.transformer.resblocks
    w, mlp = clip.text_width, blocks[0].mlp.c_fc.out_features
    dense = len(blocks) * 2 * (4 * w * w + 2 * w * mlp) * sum(lengths)
    attention = len(blocks) * 2 * 2 * w * sum(n * (n + 1) / 2 for n in lengths)
    return dense + attention + 2 * w * clip.embed_dim * len(lengths)


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

    # (d) a new 10-class vocabulary per prompt set, image cached, its text part against the FLOP floor;
    # (e) right after it, the same 10 classes plus one new one
    for name in ("learned", "maskclip-85", "parts"):
        offset = {"learned": 0, "maskclip-85": 100, "parts": 200}[name]
        cold, cold_text, floor_ratio, add_one, add_ratio = [], [], [], [], []
        for i in range(-1, args.repeats):  # i = -1: warm-up, not recorded
            vocab = fresh_vocabulary(i + offset)
            flops = text_flops(clip, sentence_lengths(pred, name, vocab))
            rate0 = gemm_gflops(clip.text_width, device)
            t0 = time.perf_counter()
            r = pred.predict(vocab, name)
            _ = r.label_map
            sync(device)
            t1 = time.perf_counter()
            rate = (rate0 + gemm_gflops(clip.text_width, device)) / 2
            extra = vocab + (f"{vocab[0]} toy",)
            t2 = time.perf_counter()
            _ = pred.predict(extra, name).label_map
            sync(device)
            t3 = time.perf_counter()
            if i >= 0:
                cold.append(t1 - t0)
                cold_text.append(r.timings["text"])
                floor_ratio.append(r.timings["text"] / (flops / (rate * 1e9)))
                add_one.append(t3 - t2)
                add_ratio.append((t3 - t2) / (t1 - t0))
        results[f"d_new_vocabulary_{name}_s"] = statistics.median(cold)
        results[f"d_new_vocabulary_{name}_text_s"] = statistics.median(cold_text)
        results[f"d_{name}_text_gflop"] = flops / 1e9
        results[f"d_{name}_text_over_floor"] = statistics.median(floor_ratio)
        results[f"e_add_one_class_{name}_s"] = statistics.median(add_one)
        results[f"e_add_one_class_{name}_over_d"] = statistics.median(add_ratio)

    # (f) a restart on the disk cache: a fresh predictor, 10 classes the previous one stored
    with tempfile.TemporaryDirectory() as folder:
        sets = {n: pred.prompt_set(n) for n in ("learned", "maskclip-85", "parts")}
        first = mvpseg.Predictor(clip, sets, text_cache_dir=folder)
        first.set_image(images[0])
        for name in sets:
            first.predict(fresh_vocabulary(50 + 7 * len(name)), name)
        second = mvpseg.Predictor(clip, sets, text_cache_dir=folder)
        second.set_image(images[0])
        for name in sets:
            r = second.predict(fresh_vocabulary(50 + 7 * len(name)), name)
            results[f"f_restart_disk_{name}_text_s"] = r.timings["text"]
        assert second.stats["text_encodes"] == 0, "the restarted predictor should have read every class from disk"
    results["load_average_after"] = os.getloadavg()[0]

    print(f"{results['clip']} on {device}, {args.threads} threads, median of {args.repeats} (load average "
          f"{results['load_average_before']:.1f} → {results['load_average_after']:.1f})")
    print(f"(a) bare image tower (dense forward)          {results['a_image_tower_s']:8.3f} s")
    print(f"(b) new image, cached vocabulary (10 classes)  {results['b_warm_request_s']:8.3f} s   "
          f"= {results['b_over_a']:.2f} × (a)   target ≤ 1.2×")
    print(f"(c) same image, same vocabulary               {results['c_cached_request_s']:8.3f} s")
    results["gemm_gflops_last"] = gemm_gflops(clip.text_width, device)
    for name in ("learned", "maskclip-85", "parts"):
        print(f"(d) new 10-class vocabulary, {name:12s}     {results[f'd_new_vocabulary_{name}_s']:8.3f} s   "
              f"text {results[f'd_new_vocabulary_{name}_text_s']:.3f} s "
              f"({results[f'd_{name}_text_gflop']:.0f} GFLOP) = {results[f'd_{name}_text_over_floor']:.2f} × floor"
              + ("   target ≤ 1.5×" if name == "maskclip-85" else ""))
    for name in ("learned", "maskclip-85", "parts"):
        print(f"(e) + one class to the cached 10, {name:12s}{results[f'e_add_one_class_{name}_s']:8.3f} s   "
              f"= {results[f'e_add_one_class_{name}_over_d']:.3f} × (d)   target ≤ 0.15×")
    for name in ("learned", "maskclip-85", "parts"):
        print(f"(f) restart, 10 classes from disk, {name:12s} text {results[f'f_restart_disk_{name}_text_s']:.4f} s")
    print(f"fp32 GEMM rate at the end: {results['gemm_gflops_last']:.0f} GFLOP/s")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
