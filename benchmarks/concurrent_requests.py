"""Concurrent requests against the demo (issue #31): failed requests, incomplete files, latency and RSS.

Starts the demo in this process on loopback with the bundled toy model (the tiny random CLIP when the toy
assets are missing), then runs ``--clients`` ``gradio_client`` clients × ``--requests`` ``/segment`` calls each,
all started together, twice: every client with the **same** inputs (visitors clicking one example: identical
outputs, the case that once truncated 5 % of the files) and every client with a **distinct** vocabulary. Each
returned file is downloaded and checked whole (declared length = bytes received = the server's file, and the
PNG decodes). Prints per phase: requests, failures, files checked, p50 / p95 latency and the server's RSS.

    python benchmarks/concurrent_requests.py                 # 16 × 10, ≈ 4 min on 2 CPU cores
    python benchmarks/concurrent_requests.py --clients 4 --requests 2
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "assets" / "examples" / "toy_test_294.png"
SAME_VOCAB = "background, red cat, brick, water"
POOL = ["red cat", "blue bird", "green owl", "brick", "water", "grass", "sky", "sand", "yellow fox", "robot"]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def calls(clients: int, requests: int, same: bool, sets: list[str]) -> list[list[tuple]]:
    """Argument tuples of ``/segment`` per client: one shared vocabulary, or a distinct one per client."""
    from gradio_client import handle_file

    out = []
    for c in range(clients):
        vocab = SAME_VOCAB if same else ", ".join(["background"] + [POOL[(c + j) % len(POOL)] for j in range(3)]
                                                  + [f"thing {c}"])
        out.append([(handle_file(str(EXAMPLE)), vocab, sets, [], "") for _ in range(requests)])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=10, help="calls per client")
    p.add_argument("--sets", default="a-photo-of", help="comma-separated prompt sets of each call")
    args = p.parse_args(argv)

    from demo import build_demo
    from demo.testing import load_test, serve, small_models

    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        models = small_models(Path(tmp), toy=True, short_side=256)
        demo = build_demo(models)
        print(f"model: {models.clip_description}; {args.clients} clients × {args.requests} calls, sets {sets}")
        with serve(demo) as url:
            for same in (True, False):
                before = rss_mb()
                r = load_test(url, calls(args.clients, args.requests, same, sets))
                print(f"{'same' if same else 'distinct'} inputs: {r.requests - len(r.failures)} of {r.requests} "
                      f"requests whole, {r.files} files checked, p50 {r.percentile(50):.2f} s, "
                      f"p95 {r.percentile(95):.2f} s, RSS {before:.0f} → {rss_mb():.0f} MB")
                for line in r.failures[:10]:
                    print("   ", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
