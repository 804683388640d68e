"""Helpers for the demo's tests and benchmarks: small models without downloads, and serving a page on a
free local port until it answers.
"""
from __future__ import annotations

import socket
import time
import urllib.request
from contextlib import contextmanager
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
