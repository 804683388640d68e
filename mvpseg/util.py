"""Small helpers every layer shares: atomic file writing, file modes, content digests.

A leaf module (it imports nothing from mvpseg), so that the checkpoint format, the text cache, the CLIP loader,
the training scripts and the demo can all use one implementation without importing each other.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

import torch


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``os.umask`` can only be read by
    setting it, which races with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def publish_mode(path: str | os.PathLike) -> None:
    """Gives a file made by ``tempfile.mkstemp`` (always 0600) the mode a plain ``open`` would have given it
    (0666 minus the umask), so saved prompts, states and caches are readable like any other output."""
    os.chmod(path, 0o666 & ~current_umask())


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Calls ``write(tmp_path)`` on a unique temporary file beside ``path``, then renames it over ``path``:
    readers never see a half-written file, concurrent writers never share a temporary name, and a failed
    write leaves ``path`` as it was and no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        publish_mode(tmp)  # mkstemp made it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, write: Callable[[BinaryIO], None] | bytes,
                       fsync: bool = True) -> None:
    """``atomic_write`` for a file object: ``write(f)``, or the bytes themselves; ``fsync`` makes the content
    durable before the rename (training states; the demo's throw-away outputs skip it)."""

    def to_file(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            if isinstance(write, (bytes, bytearray, memoryview)):
                f.write(write)
            else:
                write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())

    atomic_write(path, to_file)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``atomic_write_bytes`` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def digest(values: Iterable[object] = (), tensors: dict[str, torch.Tensor] | None = None, size: int = 16) -> str:
    """SHA-1 (hex, ``size`` characters) of plain values (their repr) and tensors (name, dtype, shape, bytes)."""
    h = hashlib.sha1()
    for v in values:
        h.update(repr(v).encode() + b"\0")
    for name, t in sorted((tensors or {}).items()):
        t = t.detach()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()[:size]
