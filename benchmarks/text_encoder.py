"""Speed of exact truncated text encoding vs full 77-token encoding on RN50's text tower (random weights have
the same FLOPs as the real ones). Prints the ratios measured in this run and the maximum deviation.

(a) learned prompts: k + 1 = 4 prompts × 20 classes with 32 context tokens (one truncated block);
(b) MaskCLIP's 85 templates × 20 class names (length-sorted chunks, each cut to its own longest sentence).

    python benchmarks/text_encoder.py [--repeats 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from anywhere

from mvpseg import ClipSpec, LearnedPrompts, load_clip
from mvpseg.handcrafted import MASKCLIP_TEMPLATES

NAMES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dining table", "dog",
         "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv monitor"]


def _time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def compare(results: dict[str, float], key: str, full_fn, cut_fn, repeats: int) -> str:
    """Times full vs truncated encoding; stores ``<key>_speedup`` / ``_max_abs_dev`` / ``_rel_dev``; returns the
    measured part of the report line."""
    t_full, full = _time(full_fn, repeats)
    t_cut, cut = _time(cut_fn, repeats)
    results[f"{key}_speedup"] = t_full / t_cut
    results[f"{key}_max_abs_dev"] = float((full - cut).abs().max())
    results[f"{key}_rel_dev"] = float((full - cut).norm() / full.norm())
    return (f"full {t_full:.3f}s, truncated {t_cut:.3f}s -> {results[f'{key}_speedup']:.2f}x; "
            f"max |diff| {results[f'{key}_max_abs_dev']:.2e}, rel {results[f'{key}_rel_dev']:.2e}")


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    clip = load_clip(ClipSpec("RN50", None), device=args.device)
    results = {}

    prompts = LearnedPrompts(clip.text_width, n_seg=3, n_ctx=32).to(clip.device)
    prefix, suffix, eot = prompts._frozen_tokens(clip, tuple(NAMES))
    p = prompts.ctx.shape[0]
    x = torch.cat([prefix.unsqueeze(0).expand(p, -1, -1, -1), prompts.ctx.detach().unsqueeze(1).expand(-1, 20, -1, -1),
                   suffix.unsqueeze(0).expand(p, -1, -1, -1)], 2).flatten(0, 1)
    eot = eot.repeat(p)
    line = compare(results, "learned", lambda: clip.encode_embeddings(x, eot, truncate=False),
                   lambda: clip.encode_embeddings(x, eot, truncate=True), args.repeats)
    print(f"(a) learned prompts, {x.shape[0]} prompts, n_ctx=32, longest {int(eot.max()) + 1} of {x.shape[1]} tokens: "
          + line)

    sentences = [t.format(n) for t in MASKCLIP_TEMPLATES for n in NAMES]
    tokens = clip.tokenize(sentences)
    emb = clip.token_embeddings(tokens)
    teot = tokens.argmax(-1)
    reps = max(1, args.repeats // 2)
    line = compare(results, "templates", lambda: clip.encode_embeddings(emb, teot, chunk_size=256, truncate=False),
                   lambda: clip.encode_embeddings(emb, teot, chunk_size=256, truncate=True), reps)
    mean_len = float(teot.float().mean()) + 1
    print(f"(b) 85 templates x 20 classes = {len(sentences)} sentences, mean length {mean_len:.1f} tokens: " + line)
    print(f"targets: (a) >= 1.9x: {'met' if results['learned_speedup'] >= 1.9 else 'NOT met'}; "
          f"(b) >= 5x: {'met' if results['templates_speedup'] >= 5 else 'NOT met'}")
    return results


if __name__ == "__main__":
    main()
