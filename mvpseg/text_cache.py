"""Text embeddings cached per class name, bounded in bytes, optionally kept on disk across restarts.

Every prompt set here encodes each class name on its own (a handcrafted template holds one name; a learned
prompt is the context vectors followed by one name), so a vocabulary's embeddings are its classes'
embeddings side by side and editing a vocabulary needs only the new names encoded. Entries are keyed by

    TextKey(CLIP text-tower fingerprint, precision, prompt-set fingerprint) + the class name,

so new CLIP weights, another device/precision or a changed prompt checkpoint never hit old entries.

The disk cache (``DiskTextCache``) writes one safetensors file per TextKey: tensors ``seg`` (K×N×D) and
``glob`` (N×D, with a global prompt), float32, and JSON metadata in the safetensors header (format, version,
the key, the N class names, a SHA-256 of it all). Files are written to a temporary name and renamed, so a
crash never leaves half a file; a file that fails any check (unreadable, another format or key, wrong
shapes, non-finite values, digest mismatch) is ignored with a log line and replaced on the next write.
Nothing is ever unpickled. The digest detects corruption and careless edits, it is not a signature.
"""
from __future__ import annotations

import hashlib
import json
import logging
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .prompts import PromptSet, TextViews
from .util import atomic_write, digest  # noqa: F401 (digest: its old path)

log = logging.getLogger("mvpseg.text_cache")

FORMAT, VERSION = "mvpseg-text-cache", 1


class LRUCache:
    """Least recently used entries dropped first once there are more than ``size`` of them or, with
    ``max_bytes``, once their ``sizeof`` sum exceeds it (the newest entry is always kept)."""

    def __init__(self, size: int | None = None, max_bytes: int | None = None,
                 sizeof: Callable[[object], int] | None = None) -> None:
        self.size, self.max_bytes = size, max_bytes
        self._sizeof = sizeof or (lambda value: 0)
        self._items: OrderedDict = OrderedDict()
        self.nbytes = 0

    def __contains__(self, key) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def peek(self, key, default=None):
        """The value of ``key`` (marked as recently used), or ``default``."""
        if key not in self._items:
            return default
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key, value) -> None:
        if key in self._items:
            self.nbytes -= self._sizeof(self._items.pop(key))
        self._items[key] = value
        self.nbytes += self._sizeof(value)
        while len(self._items) > 1 and ((self.size is not None and len(self._items) > self.size)
                                        or (self.max_bytes is not None and self.nbytes > self.max_bytes)):
            self.nbytes -= self._sizeof(self._items.popitem(last=False)[1])

    def get(self, key, compute: Callable[[], object]):
        """The cached value of ``key``, or ``compute()`` stored under it."""
        if key in self._items:
            return self.peek(key)
        value = compute()
        self.put(key, value)
        return value

    def drop(self, keep: Callable[[object], bool]) -> None:
        """Forget every key for which ``keep(key)`` is false."""
        for key in [k for k in self._items if not keep(k)]:
            self.nbytes -= self._sizeof(self._items.pop(key))


# ----------------------------------------------------------------------------- fingerprints
_PROMPT_FPS: "weakref.WeakKeyDictionary[PromptSet, tuple[tuple, str]]" = weakref.WeakKeyDictionary()


def prompt_fingerprint(prompts: PromptSet) -> str:
    """Digest of ``prompts.text_identity()``, recomputed only when one of its tensors was replaced or changed
    in place (the tensors' version counters), so a prompt set updated by a new checkpoint gets a new one."""
    values, tensors = prompts.text_identity()
    state = tuple((id(t), t._version) for _, t in sorted(tensors.items()))
    memo = _PROMPT_FPS.get(prompts)
    if memo is None or memo[0] != state:
        memo = (state, digest(values, tensors))
        _PROMPT_FPS[prompts] = memo
    return memo[1]


@dataclass(frozen=True)
class TextKey:
    """What a class's text embedding depends on besides its name."""

    clip: str  # FrozenCLIP.text_fingerprint: every text-tower tensor
    precision: str  # e.g. "cpu-float32", "cuda-bf16-autocast"
    prompts: str  # prompt_fingerprint

    @property
    def filename(self) -> str:
        return f"{self.clip}-{self.precision}-{self.prompts}.safetensors"


@dataclass(frozen=True)
class ClassText:
    """One class under one prompt set: seg K×D and glob D (None without a global prompt)."""

    seg: torch.Tensor
    glob: torch.Tensor | None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.seg, self.glob) if t is not None)

    def to(self, device: torch.device) -> "ClassText":
        return ClassText(self.seg.to(device), None if self.glob is None else self.glob.to(device))


def split_views(views: TextViews) -> dict[str, ClassText]:
    """TextViews of C classes → {name: ClassText} (compact copies: an entry never pins a whole vocabulary)."""
    return {name: ClassText(views.seg[:, c].clone(), None if views.glob is None else views.glob[c].clone())
            for c, name in enumerate(views.class_names)}


def join_views(items: Sequence[ClassText], names: tuple[str, ...], view_names: tuple[str, ...]) -> TextViews:
    seg = torch.stack([i.seg for i in items], dim=1)
    glob = None if items[0].glob is None else torch.stack([i.glob for i in items])
    return TextViews(seg, glob, tuple(view_names), names)


# ----------------------------------------------------------------------------- disk
class DiskTextCache:
    """One safetensors file per TextKey under ``directory``, read lazily, rewritten atomically when classes
    are added; at most ``max_bytes_per_file`` of embeddings per file (the oldest classes are dropped)."""

    def __init__(self, directory: str | Path, max_bytes_per_file: int = 64 << 20) -> None:
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes_per_file = max_bytes_per_file
        self._files: dict[TextKey, dict[str, ClassText]] = {}

    def path(self, key: TextKey) -> Path:
        return self.directory / key.filename

    def entries(self, key: TextKey) -> dict[str, ClassText]:
        """The classes stored for ``key`` (CPU float32), {} when there is no valid file."""
        if key not in self._files:
            self._files[key] = self._read(key)
        return self._files[key]

    def add(self, key: TextKey, items: dict[str, ClassText]) -> None:
        """Adds classes to ``key``'s file and rewrites it; a failed write is logged, never raised."""
        stored = self.entries(key)
        for name, item in items.items():
            stored.pop(name, None)
            stored[name] = ClassText(item.seg.detach().float().cpu().contiguous(),
                                     None if item.glob is None else item.glob.detach().float().cpu().contiguous())
        while len(stored) > 1 and sum(i.nbytes for i in stored.values()) > self.max_bytes_per_file:
            stored.pop(next(iter(stored)))
        try:
            self._write(key, stored)
        except (OSError, RuntimeError, ValueError) as e:
            log.warning("could not write the text cache file %s: %s", self.path(key), e)

    # -- file format
    @staticmethod
    def _payload(key: TextKey, stored: dict[str, ClassText]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        items = list(stored.values())
        tensors = {"seg": torch.stack([i.seg for i in items], dim=1).contiguous()}
        if items[0].glob is not None:
            tensors["glob"] = torch.stack([i.glob for i in items]).contiguous()
        meta = {"format": FORMAT, "version": str(VERSION), "clip": key.clip, "precision": key.precision,
                "prompts": key.prompts, "classes": json.dumps(list(stored), ensure_ascii=False)}
        return tensors, meta

    @staticmethod
    def _sha256(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
        h = hashlib.sha256(json.dumps({k: meta[k] for k in sorted(meta) if k != "sha256"}).encode())
        for name in sorted(tensors):
            t = tensors[name]
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        return h.hexdigest()

    def _write(self, key: TextKey, stored: dict[str, ClassText]) -> None:
        from safetensors.torch import save_file

        if not stored:
            return
        tensors, meta = self._payload(key, stored)
        meta["sha256"] = self._sha256(tensors, meta)
        atomic_write(self.path(key), lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    def _read(self, key: TextKey) -> dict[str, ClassText]:
        path = self.path(key)
        if not path.is_file():
            return {}
        try:
            return self._parse(key, path)
        except Exception as e:  # noqa: BLE001 - any unreadable or foreign file is only a cache miss
            log.warning("ignoring text cache file %s: %s", path, e)
            return {}

    def _parse(self, key: TextKey, path: Path) -> dict[str, ClassText]:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            if meta.get("format") != FORMAT or meta.get("version") != str(VERSION):
                raise ValueError(f"not an {FORMAT} v{VERSION} file")
            for field in ("clip", "precision", "prompts"):
                if meta.get(field) != getattr(key, field):
                    raise ValueError(f"written for another {field} ({meta.get(field)!r})")
            if names not in ({"seg"}, {"seg", "glob"}):
                raise ValueError(f"holds tensors {sorted(names)}")
            tensors = {n: f.get_tensor(n) for n in names}
        classes = json.loads(meta.get("classes", "null"))
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes) or \
                len(set(classes)) != len(classes):
            raise ValueError("malformed class list")
        seg, glob = tensors["seg"], tensors.get("glob")
        if seg.dtype != torch.float32 or seg.dim() != 3 or seg.shape[1] != len(classes) or not classes:
            raise ValueError(f"seg has dtype {seg.dtype} and shape {tuple(seg.shape)} for {len(classes)} classes")
        if glob is not None and (glob.dtype != torch.float32 or tuple(glob.shape) != (len(classes), seg.shape[2])):
            raise ValueError(f"glob has shape {tuple(glob.shape)}")
        if meta.get("sha256") != self._sha256(tensors, meta):
            raise ValueError("content does not match its SHA-256 (corrupted or edited)")
        if not all(torch.isfinite(t).all() for t in tensors.values()):
            raise ValueError("non-finite values")
        return {name: ClassText(seg[:, c].clone(), None if glob is None else glob[c].clone())
                for c, name in enumerate(classes)}


# ----------------------------------------------------------------------------- the cache
def _nbytes(value: object) -> int:
    if isinstance(value, ClassText):
        return value.nbytes
    if isinstance(value, TextViews):
        return sum(t.numel() * t.element_size() for t in (value.seg, value.glob) if t is not None)
    return 0


class ClassTextCache:
    """Per-class text embeddings in memory (LRU, ``max_bytes``), backed by an optional ``DiskTextCache``.

    ``stats``: ``encodes`` (calls of the encoder), ``classes_encoded``, ``memory_hits`` and ``disk_hits``
    (classes served without encoding).
    """

    def __init__(self, max_bytes: int = 256 << 20, disk: DiskTextCache | None = None) -> None:
        self.memory = LRUCache(max_bytes=max_bytes, sizeof=_nbytes)
        self.disk = disk
        self.stats = {"encodes": 0, "classes_encoded": 0, "memory_hits": 0, "disk_hits": 0}

    def get(self, key: TextKey, names: tuple[str, ...], encode: Callable[[tuple[str, ...]], TextViews],
            view_names: tuple[str, ...], device: torch.device, per_class: bool = True) -> TextViews:
        """The TextViews of ``names``: cached classes from memory, then disk; the rest encoded in one call.
        ``per_class=False`` (a prompt set whose classes are not encoded independently): whole vocabularies,
        in memory only."""
        if not per_class:
            hit = self.memory.peek((key, names))
            if hit is None:
                hit = encode(names)
                self.stats["encodes"] += 1
                self.stats["classes_encoded"] += len(names)
                self.memory.put((key, names), hit)
            return hit
        found: dict[str, ClassText] = {}
        for name in names:
            hit = self.memory.peek((key, name))
            if hit is not None:
                found[name] = hit
                self.stats["memory_hits"] += 1
        if self.disk is not None and len(found) < len(names):
            stored = self.disk.entries(key)
            for name in names:
                if name not in found and name in stored:
                    found[name] = stored[name].to(device)
                    self.memory.put((key, name), found[name])
                    self.stats["disk_hits"] += 1
        missing = tuple(n for n in names if n not in found)
        if missing:
            views = encode(missing)
            new = split_views(views)
            self.stats["encodes"] += 1
            self.stats["classes_encoded"] += len(missing)
            if len(missing) == len(names):  # nothing to join: hand back the encoder's own result
                self._store(key, new)
                return views
            view_names = views.view_names
            found.update(new)
            self._store(key, new)
        return join_views([found[n] for n in names], names, view_names)

    def _store(self, key: TextKey, new: dict[str, ClassText]) -> None:
        for name, item in new.items():
            self.memory.put((key, name), item)
        if self.disk is not None:
            self.disk.add(key, new)

    def clear(self) -> None:
        self.memory.drop(keep=lambda key: False)
