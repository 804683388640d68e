"""Cost of one MVP-SEG prompt-learning step on CPU, RN50 with random weights (same FLOPs as the real ones).

(a) VOC seen vocabulary (15 classes × 4 prompts, n_ctx 32), batch 2 of 512² crops: the step of
    ``training/train_prompts.py`` (image tower once under no_grad, one text pass for all 60 prompts
    with the shared-prefix encoder, head, Eq. 10 loss, backward, SGD) against a CoOp-style step that
    is identical except that the text tower encodes the full 77-token prompts.  Target: ≥ 1.8×
    faster.  The same step with mvpseg's plain truncated encoder (``--text-encoder plain``) is shown
    too.
(b) Text tower alone (forward + backward) for the COCO-Stuff seen vocabulary (156 × 4 prompts), both
    encoders, with and without activation checkpointing (``--text-checkpointing``).

Every variant runs in a fresh subprocess; on CPU peak memory is the process's resident set size
sampled every 2 ms during the first step minus the RSS just before it (model weights don't count;
later steps reuse memory the allocator kept, so their RSS growth understates the need); on CUDA it
is the allocator's peak above what was allocated before the step.  Times are the median of the
steps after the first.

    python benchmarks/train_step.py [--steps 2] [--rounds 2] [--threads 2] [--skip-text-memory] [--out FILE.json]
    python benchmarks/train_step.py --device cuda --batch 8      # the same on a GPU (allocator peaks)
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a plain script from anywhere

VARIANTS = ("step-mvpseg", "step-plain", "step-coop", "text-shared", "text-shared-ckpt", "text-plain",
            "text-plain-ckpt")


class RSSPeak:
    """Samples this process's RSS (from /proc/self/statm) in a background thread."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def __enter__(self) -> "RSSPeak":
        self.base = self.peak = self.rss()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss())

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def worker(variant: str, steps: int, batch: int, crop: int, device: str = "cpu") -> dict:
    import torch

    from mvpseg import ClipSpec, LearnedPrompts, MVPSeg, load_clip
    from mvpseg.clip_backbone import FrozenCLIP
    from training.datasets import COCOSTUFF171, VOC20
    from training.shared_prefix import SharedPrefixEncoder

    torch.manual_seed(0)
    clip = load_clip(ClipSpec("RN50", None), device=device)
    prompts = LearnedPrompts(clip.text_width, n_seg=3, n_ctx=32, use_global=True).to(device)
    model = MVPSeg(clip, prompts)
    ckpt = variant.endswith("ckpt")
    clip.set_text_checkpointing(ckpt)
    shared = SharedPrefixEncoder(clip, activation_checkpointing=ckpt)
    if variant == "step-coop":  # same step, but every prompt runs through all 77 positions
        clip.encode_embeddings = functools.partial(FrozenCLIP.encode_embeddings, clip, truncate=False)

    def encode(vocab):
        if variant in ("step-mvpseg", "text-shared", "text-shared-ckpt"):
            return shared.encode(prompts, vocab)
        return model.text_features(vocab)

    if variant.startswith("text"):
        vocab = COCOSTUFF171.seen_prompt_names

        def step():
            text = encode(vocab)
            (text.seg.sum() + text.glob.sum()).backward()
            prompts.ctx.grad = None
    else:
        vocab = VOC20.seen_prompt_names
        opt = torch.optim.SGD(model.trainable_parameters(), lr=2e-4, momentum=0.9, weight_decay=5e-4)
        g = torch.Generator().manual_seed(0)
        images = torch.rand(batch, 3, crop, crop, generator=g).to(device)
        labels = torch.randint(0, len(vocab), (batch, crop // 64, crop // 64), generator=g)
        labels = labels.repeat_interleave(64, 1).repeat_interleave(64, 2)
        labels[:, :8] = 255
        labels = labels.to(device)

        def step():
            with torch.no_grad():
                feats = model.image_features(clip.normalize(images))
            out = model.head(feats, encode(vocab))
            loss = model.losses(out, labels)["total"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    cuda = device.startswith("cuda")
    times, peaks = [], []
    if not cuda:
        with RSSPeak() as mem:
            step()  # first step: memory (the allocator is still empty), not timed
        peaks.append(mem.delta_mb)
    else:
        step()  # warm-up (token cache, allocator, kernels)
    for _ in range(steps):
        if cuda:  # exact allocator peak above what is allocated before the step
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            peaks.append((torch.cuda.max_memory_allocated() - base) / 2**20)
            continue
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    n_prompts = len(vocab) * 4
    longest = int(clip.tokenize([f"{'X ' * 32}{n}." for n in vocab]).argmax(-1).max()) + 1
    if variant == "step-coop":
        positions = n_prompts * 77
    elif "shared" in variant or variant == "step-mvpseg":
        positions = 4 * 33 + n_prompts * (longest - 33)
    else:
        positions = n_prompts * longest
    return {"variant": variant, "prompts": n_prompts, "token_positions": positions,
            "median_s": statistics.median(times), "times_s": times, "peak_mb": max(peaks),
            "threads": torch.get_num_threads(), "device": device,
            "memory": "CUDA allocator peak" if cuda else "sampled RSS peak"}


def run_variant(variant: str, args) -> dict:
    steps = args.text_steps if variant.startswith("text") else args.steps
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": path}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--steps", str(steps),
           "--batch", str(args.batch), "--crop", str(args.crop), "--threads", str(args.threads),
           "--device", args.device]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per process for (a) (after one untimed)")
    ap.add_argument("--rounds", type=int, default=2, help="processes per (a) variant, run alternately")
    ap.add_argument("--text-steps", type=int, default=1, help="measured steps for (b) (slow on CPU)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--crop", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu (the issue's setting) or cuda")
    ap.add_argument("--skip-text-memory", action="store_true", help="only (a)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(worker(args.worker, args.steps, args.batch, args.crop, args.device)))
        return {}

    load = os.getloadavg()[0]
    variants = VARIANTS[:3] if args.skip_text_memory else VARIANTS
    res: dict[str, dict] = {}
    # (a) variants alternate over --rounds fresh processes so that load from other jobs hits all alike
    order = [v for _ in range(args.rounds) for v in variants[:3]] + list(variants[3:])
    for v in order:
        r = run_variant(v, args)
        if v in res:
            res[v]["times_s"] += r["times_s"]
            res[v]["peak_mb"] = max(res[v]["peak_mb"], r["peak_mb"])
            res[v]["median_s"] = statistics.median(res[v]["times_s"])
        else:
            res[v] = r
        print(f"  {v}: step times {[round(t, 2) for t in r['times_s']]} s, peak +{r['peak_mb']:.0f} MB, "
              f"{r['token_positions']} text token positions", flush=True)
    ours, plain, coop = res["step-mvpseg"], res["step-plain"], res["step-coop"]
    speedup = coop["median_s"] / ours["median_s"]
    print(f"(a) one step, RN50 random weights, batch {args.batch} × {args.crop}², {ours['prompts']} prompts, "
          f"{args.device}, {args.threads} threads (1-min load average before: {load:.2f}); memory: {ours['memory']}")
    print(f"    shared-prefix (default):  {ours['median_s']:.2f} s, peak +{ours['peak_mb']:.0f} MB")
    print(f"    plain truncated encoder:  {plain['median_s']:.2f} s, peak +{plain['peak_mb']:.0f} MB")
    print(f"    CoOp-style (77 tokens):   {coop['median_s']:.2f} s, peak +{coop['peak_mb']:.0f} MB")
    print(f"    speedup vs CoOp {speedup:.2f}x (target >= 1.8x: {'met' if speedup >= 1.8 else 'NOT met'}); "
          f"plain truncated vs CoOp {coop['median_s'] / plain['median_s']:.2f}x")
    summary = {"speedup": speedup, "load_avg_1min": load, "threads": args.threads, "device": args.device, **res}
    if not args.skip_text_memory:
        print(f"(b) text tower fwd+bwd, COCO-Stuff seen vocabulary, {res['text-plain']['prompts']} prompts")
        for enc in ("shared", "plain"):
            a, b = res[f"text-{enc}"], res[f"text-{enc}-ckpt"]
            print(f"    {enc}: {a['median_s']:.1f} s, peak +{a['peak_mb']:.0f} MB; with activation checkpointing "
                  f"{b['median_s']:.1f} s, peak +{b['peak_mb']:.0f} MB")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
