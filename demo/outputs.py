"""The page's output files: encoded once, written atomically, handed to Gradio as paths it serves as they are.

Why (issue #31): for a numpy or PIL output Gradio 6 (``processing_utils.save_pil_to_cache``) encodes the picture
and *rewrites* ``<cache>/<sha256 of the bytes>/image.png`` in place on every request (``Path.write_bytes``:
open with truncation, then write). Visitors who click the same example get byte-identical outputs, hence the
same path; when one request rewrites it while another's download (starlette ``FileResponse``: size from
``stat``, then 64 KB reads) is under way, the download reads a truncated file and the connection closes short
of its ``Content-Length`` (h11 "Too little data for declared Content-Length"). Measured with Gradio 6.31 in
``tests/test_outputs.py``: a reader racing the rewrite sees fewer bytes than declared in a few % of reads.
Upstream: ``gradio/processing_utils.py::save_pil_to_cache`` (``save_file_to_cache`` beside it already stages
the copy and ``os.replace``-s it into place); the same error is reported by other Gradio apps (IAHispano/Applio
#576).

The workaround stays in the app and uses only Gradio's public contract: handlers return *file paths*, and a path
already inside the component's cache folder is served as it is (no copy, no second encoding). Each picture is
written to a content-addressed path under the cache folder through a unique temporary file and ``os.replace``,
so a reader always opens a complete file (an old inode or the new one, with identical bytes); a path that
already exists is only touched (``delete_cache`` ages files by ctime), never rewritten. Encoding is ours, too:
lossless PNG at zlib level 1, ≈ 3× faster than Pillow's default level for ≈ 10 % more bytes (``benchmarks/
page_latency.py``).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from mvpseg.util import atomic_write_bytes

PNG_LEVEL = 1  # zlib level: lossless either way; 1 encodes ≈ 3× faster than 6 for ≈ 10 % larger files
PREFIX = "mvpseg-"  # our folders in Gradio's cache, beside Gradio's own


def encode_png(rgb: np.ndarray, level: int = PNG_LEVEL) -> bytes:
    """H×W×3 uint8, or H×W uint8/uint16 (a label map of class ids) → PNG bytes, lossless."""
    arr = np.ascontiguousarray(rgb)
    if arr.dtype != np.uint8 and not (arr.dtype == np.uint16 and arr.ndim == 2):
        raise TypeError(f"expected uint8 pixels (or a uint16 label map), got {arr.dtype} {arr.shape}")
    if arr.ndim == 3:
        arr = arr[..., ::-1]  # OpenCV writes BGR
    ok, buf = cv2.imencode(".png", arr, [cv2.IMWRITE_PNG_COMPRESSION, int(level)])
    if not ok:
        raise ValueError(f"could not encode a {rgb.shape} picture as PNG")
    return buf.tobytes()


def write_atomic(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that no reader ever sees a partial file (``mvpseg.util.atomic_write``: a
    unique temporary file in the same folder, renamed over ``path``); no fsync: these files are throw-away."""
    atomic_write_bytes(path, data, fsync=False)


class OutputFiles:
    """Content-addressed, atomically written output files under ``cache_dir`` (the Gradio component's
    ``GRADIO_CACHE``, so that Gradio serves them without copying)."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.cache_dir = Path(cache_dir)
        self.written = 0  # files written (a cache hit only touches the existing file)

    def put(self, data: bytes, name: str) -> str:
        """Stores ``data`` as ``<cache>/mvpseg-<sha256>/<name>``; returns the absolute path. Identical bytes
        share one file, which is never rewritten in place."""
        folder = self.cache_dir / (PREFIX + hashlib.sha256(data).hexdigest())
        path = folder / Path(name).name
        try:
            # present: only its ctime is renewed (Gradio's delete_cache ages files by ctime); the mtime, hence the
            # Last-Modified/ETag a browser revalidates its cached copy with, stays as it was
            os.utime(path, ns=(time.time_ns(), os.stat(path).st_mtime_ns))
            return str(path.resolve())
        except FileNotFoundError:
            pass
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
        self.written += 1
        return str(path.resolve())

    def png(self, rgb: np.ndarray | None, name: str = "image.png") -> str | None:
        """A picture (H×W×3 uint8, or an H×W label map) as a PNG file path; None stays None (an empty panel)."""
        return None if rgb is None else self.put(encode_png(rgb), name)

    def json(self, obj: Any, name: str = "result.json") -> str:
        """A JSON document as a file path (UTF-8, keys in the given order)."""
        return self.put(json.dumps(obj, indent=1, ensure_ascii=False).encode("utf-8"), name)
