"""Helpers for the demo's tests and benchmarks: small models without downloads, and serving a page on a
free local port until it answers.
"""
from __future__ import annotations

import socket
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

import mvpseg
from mvpseg.testing import tiny_clip, tiny_vit_clip

from .models import DemoModels, describe_prompts, load_student, toy_available


def save_random_prompts(path: Path, clip: mvpseg.FrozenCLIP, seed: int = 0, n_seg: int = 3,
                        n_ctx: int = 8) -> Path:
    """A learned-prompt checkpoint with random context vectors (no training needed) for ``clip``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        prompts = mvpseg.LearnedPrompts(clip.text_width, n_seg=n_seg, n_ctx=n_ctx)
    return mvpseg.save_prompts(path, prompts, clip)


def save_tiny_student(path: Path, clip: mvpseg.FrozenCLIP, prompts_path: Path, seed: int = 0) -> Path:
    """A random-weight MVP-SEG+ student (tiny ResNet, DeepLabv2 head) that fits ``clip``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = mvpseg.StudentNet(mvpseg.StudentConfig("resnet-tiny", "deeplabv2", embed_dim=clip.embed_dim)).eval()
    return mvpseg.save_student(path, net, mvpseg.load_prompts(prompts_path, clip), clip)


def small_models(folder: Path, *, toy: bool = False, student: bool = False, short_side: int = 128,
                 max_classes: int = 30, vit: bool = False) -> DemoModels:
    """DemoModels over the tiny random CLIP (``vit``: the tiny ViT CLIP; or the bundled toy CLIP when ``toy``
    and it exists) with one random learned prompt set named "learned" and, optionally, a random student."""
    folder.mkdir(parents=True, exist_ok=True)
    use_toy = toy and toy_available()
    clip = mvpseg.load_clip(mvpseg.TOY_CLIP_SPEC) if use_toy else tiny_vit_clip() if vit else tiny_clip()
    prompts_path = save_random_prompts(folder / "learned.safetensors", clip)
    predictor = mvpseg.build_predictor(clip, checkpoints={"learned": str(prompts_path)}, short_side=short_side)
    slot = load_student(str(save_tiny_student(folder / "student.safetensors", clip, prompts_path)) if student
                        else None, clip, clip.device, short_side)
    description = "bundled toy-world CLIP (toyclip)" if use_toy else "tiny random-weight CLIP (tests)"
    return DemoModels(predictor=predictor, clip_description=description, mode="toy" if use_toy else "random",
                      device=str(clip.device), learned_sets={"learned": describe_prompts(
                          mvpseg.load_prompts(prompts_path, clip)) + " (random, untrained)"},
                      notices=[] if use_toy else ["⚠️ **Random weights (tests)**: the segmentations are meaningless."],
                      student=slot, max_classes=max_classes)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until_serving(url: str, timeout: float = 60.0) -> None:
    """Polls ``/gradio_api/info`` (answered only once the app and its API are up)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/gradio_api/info", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not come up within {timeout:.0f} s")
        time.sleep(0.25)


@contextmanager
def serve(demo, host: str = "127.0.0.1") -> Iterator[str]:
    """Launches ``demo`` (a gr.Blocks from ``build_demo``) on a free port with the app's launch settings."""
    from .layout import launch_kwargs

    port = free_port(host)
    demo.launch(**launch_kwargs(host, port), prevent_thread_lock=True, quiet=True)
    url = f"http://{host}:{port}"
    try:
        wait_until_serving(url)
        yield url
    finally:
        demo.close()


def raw_queue_call(url: str, api_name: str, data: list, session_hash: str, timeout: float = 60.0) -> str:
    """Calls an endpoint the way a hand-made client does, without ``gradio_client`` (no upload step, no input
    filling): POST ``/gradio_api/queue/join`` then read the event stream; returns the stream's text."""
    import http.client
    import json
    from urllib.parse import urlparse

    u = urlparse(url)
    with urllib.request.urlopen(f"{url}/config", timeout=timeout) as r:
        config = json.loads(r.read())
    fn = next(d["id"] for d in config["dependencies"] if d.get("api_name") == api_name.lstrip("/"))
    body = json.dumps({"data": data, "fn_index": fn, "session_hash": session_hash, "event_data": None,
                       "trigger_id": None}).encode()
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("POST", "/gradio_api/queue/join", body=body, headers={"Content-Type": "application/json"})
        status = conn.getresponse().status
    finally:
        conn.close()
    if status != 200:
        raise RuntimeError(f"queue/join answered {status}")
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("GET", f"/gradio_api/queue/data?session_hash={session_hash}")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------- load tests
@dataclass
class LoadResult:
    """What a bounded concurrent load test saw: per request its latency, per returned file whether it arrived
    whole (the declared length, the bytes received and the server's file agree, and the image decodes)."""

    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # one line per failed request (or its incomplete files)
    files: int = 0

    @property
    def requests(self) -> int:
        return len(self.latencies) + len(self.failures)

    def percentile(self, q: float) -> float:
        import numpy as np

        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")


def fetch_whole(url: str, path: str | None, timeout: float = 60.0) -> tuple[int, str]:
    """Downloads one served file; returns (bytes, "" or why it is not whole). Whole means: the body has the
    declared ``Content-Length``, the server-side file (same machine) has that size, and a picture decodes."""
    import io

    from PIL import Image

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            declared = int(r.headers.get("Content-Length", -1))
            body = r.read()
    except Exception as e:  # a truncated body surfaces here (IncompleteRead) or as a reset connection
        return 0, f"download failed: {type(e).__name__}: {e}"
    if declared != len(body):
        return len(body), f"received {len(body)} of {declared} declared bytes"
    if path and Path(path).is_file() and Path(path).stat().st_size != len(body):
        return len(body), f"received {len(body)} bytes, the server's file has {Path(path).stat().st_size}"
    if Path(path or url).suffix.lower() in (".png", ".webp", ".jpg", ".jpeg"):
        try:
            Image.open(io.BytesIO(body)).load()
        except Exception as e:
            return len(body), f"does not decode: {e}"
    return len(body), ""


def file_refs(value) -> Iterator[tuple[str, str | None]]:
    """(url, server path) of every file in an endpoint's output (``download_files=False``)."""
    if isinstance(value, dict):
        if isinstance(value.get("url"), str) and "/file=" in value["url"]:
            yield value["url"], value.get("path")
        for v in value.values():
            yield from file_refs(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from file_refs(v)


def load_test(url: str, calls: "list[list[tuple]]", api_name: str = "/segment", timeout: float = 120.0) -> LoadResult:
    """One ``gradio_client`` client per entry of ``calls`` (a list of argument tuples each), all started
    together on threads; each makes its calls in turn and downloads every file it gets back. Loopback only:
    ``url`` must be a local server."""
    import threading

    from gradio_client import Client

    host = urllib.parse.urlparse(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"load tests run against loopback only, not {host}")
    result, lock = LoadResult(), threading.Lock()
    start = threading.Barrier(len(calls))

    def client_loop(args_list: list[tuple]) -> None:
        client = Client(url, verbose=False, download_files=False)
        start.wait()
        for args in args_list:
            t0 = time.perf_counter()
            try:
                out = client.predict(*args, api_name=api_name)
            except Exception as e:
                with lock:
                    result.failures.append(f"request failed: {type(e).__name__}: {e}")
                continue
            problems = []
            for file_url, path in file_refs(out):
                _, why = fetch_whole(file_url, path, timeout)
                with lock:
                    result.files += 1
                if why:
                    problems.append(f"{Path(path or file_url).name}: {why}")
            with lock:
                if problems:
                    result.failures.append("; ".join(problems))
                else:
                    result.latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client_loop, args=(c,), daemon=True) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout * max(len(c) for c in calls))
    return result


# ---------------------------------------------------------------------------------------------- browser
# Debian's chromium, headless, as root, offline: no sandbox, no GPU, none of its background connections
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_path() -> str | None:
    """The system's chromium ($CHROMIUM_PATH, then PATH, then /usr/bin/chromium), or None."""
    import os
    import shutil

    return next((p for p in (os.environ.get("CHROMIUM_PATH"), shutil.which("chromium"),
                             shutil.which("chromium-browser"), "/usr/bin/chromium") if p and Path(p).is_file()), None)


@contextmanager
def browser_page(url: str, width: int = 1400, height: int = 1000, timeout_ms: int = 120_000):
    """A Playwright page of the system's chromium on the demo at ``url``, once its Segment button is there."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(timeout_ms)
            page.goto(url)
            page.wait_for_selector("#segment")
            yield page
        finally:
            browser.close()
