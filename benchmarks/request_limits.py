"""Memory and time of the demo under oversized and hostile requests (issue #18), measured in one run.

Starts the demo on loopback (tiny random CLIP: the limits do not depend on the model), then sends

* ``--bodies`` oversized JSON bodies of ``--body-mb`` MB each — a base64 ``data:`` image, the request that once
  raised the server's RSS by ≈ 1.9 GB per 400 MB — half with ``Content-Length``, half streamed without it;
* ``--bad-rounds`` rounds of the bad-input rows of ``tests/test_bad_inputs.py`` that reach the model;

and prints the server process's RSS growth against the bytes sent (the ratio the issue measured at ≈ 4.8
before the limit), the time to the 413 answer, and that a normal request still succeeds afterwards.

    python benchmarks/request_limits.py            # ≈ 1 min on 2 CPU cores
"""
from __future__ import annotations

import argparse
import http.client
import os
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "assets" / "examples" / "toy_test_294.png"


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def oversized(url: str, megabytes: int, chunked: bool) -> tuple[str, float]:
    """Sends one JSON body of ``megabytes`` MB (generated lazily); returns (answer, seconds to it)."""
    head, tail, block = b'{"data": ["data:image/png;base64,', b'"]}', b"A" * (1 << 20)
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    t0 = time.perf_counter()

    def pieces():
        yield head
        for _ in range(megabytes):
            yield block
        yield tail

    try:
        headers = {"Content-Type": "application/json"}
        if not chunked:
            headers["Content-Length"] = str(len(head) + megabytes * len(block) + len(tail))
        conn.request("POST", "/gradio_api/queue/join", body=pieces(), headers=headers, encode_chunked=chunked)
        resp = conn.getresponse()
        answer = str(resp.status)
        resp.read()
    except (BrokenPipeError, ConnectionResetError):
        answer = "closed"  # the server stopped reading and closed the socket: nothing more was buffered
    finally:
        conn.close()
    return answer, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bodies", type=int, default=8)
    p.add_argument("--body-mb", type=int, default=200)
    p.add_argument("--bad-rounds", type=int, default=3)
    a = p.parse_args(argv)

    import torch
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from demo import build_demo
    from demo.limits import MAX_BODY_BYTES
    from demo.testing import serve, small_models

    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO / "tests"))
    from test_bad_inputs import APP_ROWS, IMAGE_FILES  # the same hostile inputs as the tests

    folder = Path(tempfile.mkdtemp(prefix="mvpseg_limits_"))
    for name, data in IMAGE_FILES.items():
        (folder / name).write_bytes(data)
    demo = build_demo(small_models(folder / "models"))
    with serve(demo) as url:
        client = Client(url, verbose=False)
        client.predict(handle_file(str(EXAMPLE)), "cat, dog", ["maskclip-85", "learned"], [], "", api_name="/segment")
        start = rss_mb()
        answers, seconds = [], []
        for i in range(a.bodies):
            answer, s = oversized(url, a.body_mb, chunked=bool(i % 2))
            answers.append(answer)
            seconds.append(s)
        after_bodies = rss_mb()
        refused = 0
        t0 = time.perf_counter()
        for _ in range(a.bad_rounds):
            for name, image, vocab, sets, files, hub, expected in APP_ROWS:
                if files:
                    continue
                try:
                    client.predict(handle_file(str(folder / image)) if image else None, vocab, sets, [], hub,
                                   api_name="/segment")
                except AppError:
                    refused += 1
        bad_seconds = time.perf_counter() - t0
        after_bad = rss_mb()
        out = client.predict(handle_file(str(EXAMPLE)), "cat, dog", ["maskclip-85"], [], "", api_name="/segment")
        alive = Path(out[0]).is_file()
    sent_mb = a.bodies * a.body_mb
    print(f"limit: {MAX_BODY_BYTES / 2**20:.0f} MB per request body")
    print(f"oversized bodies: {a.bodies} × {a.body_mb} MB ({sent_mb} MB sent); answers {sorted(set(answers))}; "
          f"time to answer median {sorted(seconds)[len(seconds) // 2]:.2f} s, max {max(seconds):.2f} s")
    print(f"RSS: {start:.0f} MB before, {after_bodies:.0f} MB after the bodies "
          f"(growth {after_bodies - start:+.0f} MB = {(after_bodies - start) / sent_mb:.4f} × the bytes sent; "
          "before the limit: ≈ 4.8 ×)")
    print(f"bad-input rows: {refused} refused in {bad_seconds:.1f} s; RSS {after_bad:.0f} MB "
          f"({after_bad - after_bodies:+.0f} MB); a normal request afterwards: {'ok' if alive else 'FAILED'}")
    return 0 if alive else 1


if __name__ == "__main__":
    sys.exit(main())
