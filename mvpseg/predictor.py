"""The public inference API: ``set_image()`` caches dense image features, ``predict(vocabulary)`` caches text.

Changing only the vocabulary or only the prompt set reuses the cached image features. Text embeddings are
cached per (CLIP, prompt set, class name) (mvpseg/text_cache.py): a vocabulary seen before costs nothing,
and an edited one encodes only its new names. With ``text_cache_dir`` they also survive restarts.
"""
from __future__ import annotations

import logging
import re
import time
import unicodedata
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import CheckpointError, dense_mode_mismatch, learned_dense_mode
from .clip_backbone import FrozenCLIP
from .dense import pamr as pamr_refine
from .dense_settings import DenseSettings, SlidingLike
from .gpr_shifts import shifted_features, with_shifted_gpr
from .heads import MVPSegOutput, apply_prompts
from .image_io import ImageLike, prepare_image
from .prompts import PromptSet, TextViews
from .text_cache import ClassTextCache, DiskTextCache, LRUCache, TextKey, prompt_fingerprint

__all__ = ["LRUCache", "Prediction", "Predictor", "VocabularyError", "amp_autocast", "parse_vocabulary"]
log = logging.getLogger("mvpseg.predictor")

MAX_CLASSES = 200
MAX_NAME_CHARS = 60


def amp_autocast(device: torch.device, enabled: bool = True):
    """bfloat16 autocast on CUDA (frozen towers at inference), a no-op context elsewhere."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


class VocabularyError(ValueError):
    """The vocabulary is empty, too large, or has duplicate / over-long / empty names."""


def parse_vocabulary(vocabulary: str | Sequence[str], max_classes: int = MAX_CLASSES,
                     max_chars: int = MAX_NAME_CHARS) -> tuple[str, ...]:
    """"cat, dog\\nsky" or a list → ('cat', 'dog', 'sky'): trimmed, inner spaces collapsed, validated."""
    items = re.split(r"[,;\n]", vocabulary) if isinstance(vocabulary, str) else list(vocabulary)
    names = []
    for item in items:
        if not isinstance(item, str):
            raise VocabularyError(f"class names must be text, got {type(item).__name__}")
        # zero-width, NUL and other control/format characters are invisible: they would make "cat" and
        # "c\u200bat" two different classes that look the same, so they are dropped before anything else
        name = " ".join("".join(ch for ch in item if unicodedata.category(ch) not in ("Cc", "Cf")).split())
        if name:
            names.append(name)
    if not names:
        raise VocabularyError("the vocabulary is empty: type at least one class name, e.g. 'cat, dog, sky'")
    if len(names) > max_classes:
        raise VocabularyError(f"{len(names)} classes is too many (limit {max_classes})")
    seen: dict[str, str] = {}
    for name in names:
        if len(name) > max_chars:
            raise VocabularyError(f"class name '{name[:30]}…' is {len(name)} characters (limit {max_chars})")
        key = name.lower()
        if key in seen:
            raise VocabularyError(f"'{name}' appears twice in the vocabulary")
        seen[key] = name
    return tuple(names)


def check_token_budget(clip, prompt_set, names: Sequence[str], set_name: str) -> None:
    """Refuses a name that does not fit the prompt set's share of CLIP's token context, saying how many tokens
    are left: names are short in characters but not always in tokens (e.g. non-Latin scripts)."""
    budget_of = getattr(prompt_set, "name_token_budget", None)
    encode = getattr(clip.tokenizer, "encode", None)
    if budget_of is None or encode is None:
        return
    budget = budget_of(clip)
    for n in names:
        used = len(encode(n))
        if used > budget:
            raise VocabularyError(f"class name '{n}' is {used} tokens, but prompt set '{set_name}' leaves room for "
                                  f"{budget}: shorten it or use fewer words")


@dataclass
class Prediction:
    """The result of ``Predictor.predict``. Low-resolution tensors are kept; full-size maps are computed on
    first access (numpy, original image size H×W) so that a big image with a big vocabulary stays cheap.

    classes: C names; view_names: K names; gpr_scores: C (None without a global prompt); label_map: H×W int.
    """

    classes: tuple[str, ...]
    view_names: tuple[str, ...]
    prompt_set: str
    image_size: tuple[int, int]  # (H, W) of the original image
    output: MVPSegOutput  # at feature resolution, batch of one
    work_size: tuple[int, int]  # (H, W) the image was resized to for the CLIP tower
    timings: dict[str, float] = field(default_factory=dict)
    # PAMR: the (normalised) work-size image 1×3×h×w the label map's logits are refined with; None = off
    pamr_image: torch.Tensor | None = None
    dense: DenseSettings | None = None  # the dense settings of the features behind this prediction

    def _up(self, x: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        return F.interpolate(x, size=self.image_size, mode=mode, align_corners=False if mode == "bilinear" else None)

    @cached_property
    def gpr_scores(self) -> np.ndarray | None:
        g = self.output.gpr_scores
        return None if g is None else g[0].float().cpu().numpy()

    @cached_property
    def view_masks(self) -> np.ndarray:
        """K×C×H×W cosine masks (what each prompt view attends to)."""
        return self._up(self.output.view_masks[0].float()).cpu().numpy()

    @cached_property
    def fused(self) -> np.ndarray:
        """C×H×W fused class probabilities m^f (Eq. 4)."""
        return self._up(self.output.fused_logits.float()).softmax(1)[0].cpu().numpy()

    @cached_property
    def final(self) -> np.ndarray:
        """C×H×W final masks m^f·g (Eq. 8)."""
        out = self._up(self.output.fused_logits.float()).softmax(1)[0]
        g = self.output.gpr_scores
        return (out if g is None else out * g[0, :, None, None].float()).cpu().numpy()

    @cached_property
    def logits(self) -> torch.Tensor:
        """1×C×h×w at the work size: log m_c (bilinear on the logits), refined by PAMR when it is on.

        PAMR is applied as SCLIP/NACLIP do, to the upsampled logits with the image, before the argmax. It is a
        per-pixel convex combination of neighbours, so a per-pixel offset common to all classes (log_softmax's
        normaliser) passes through unchanged: refining log m_c picks the same labels as refining the raw logits
        plus log g_c."""
        logits = self.output.log_final(self.work_size).float()  # 1×C×h×w, monotone in m_c
        if self.pamr_image is not None:
            logits = pamr_refine(self.pamr_image, logits)
        return logits

    @cached_property
    def label_map(self) -> np.ndarray:
        """H×W int32 index into ``classes``: argmax of ``logits`` (work size, PAMR when on) and a
        nearest-neighbour upscale beyond it (memory stays bounded for huge images)."""
        logits = self.logits
        # max(dim).indices == argmax(dim) (first maximum on ties), but on CPU argmax over the channel dim of
        # an NCHW tensor is ~20× slower (measured: 221 ms vs 9 ms for 10×512×683).
        labels = logits.max(1, keepdim=True).indices.float()
        if tuple(self.work_size) != tuple(self.image_size):
            labels = F.interpolate(labels, size=self.image_size, mode="nearest")
        return labels[0, 0].to(torch.int32).cpu().numpy()


class Predictor:
    """Open-vocabulary segmentation with any registered prompt set.

    Args:
        clip: the frozen CLIP.
        prompt_sets: name → PromptSet (learned or handcrafted); the first is the default.
        gamma: GPR spatial softmax scale (Eq. 6).
        short_side / max_long_side: the image is resized so its short side is ``short_side`` (MaskCLIP: 512)
            unless the long side would exceed ``max_long_side``.
        text_cache_size: unused, kept for compatibility (the text cache is bounded by ``text_cache_bytes``).
        amp: run the CLIP towers in bfloat16 autocast on CUDA.
        text_cache_bytes: memory for per-class text embeddings (least recently used dropped first; RN50:
            4 KB per class and view, so 256 MB hold ~16 k class × prompt-set entries of 4 views).
        text_cache_dir: also keep text embeddings in this folder (safetensors, one file per CLIP × prompt
            set), reused across restarts; None: memory only. A folder that cannot be created is logged and
            ignored.
        dense: dense-feature mode and sliding window (default: the CLIP's, ``clip.dense``); ``set_dense``
            changes them later (the cached image features are recomputed, the text cache is kept).
        pamr: refine the label map's logits with PAMR (``mvpseg.dense.pamr``) before the argmax.
    """

    def __init__(self, clip: FrozenCLIP, prompt_sets: dict[str, PromptSet], gamma: float = 10.0,
                 short_side: int = 512, max_long_side: int = 2048, text_cache_size: int = 32,
                 amp: bool = True, text_cache_bytes: int = 256 << 20,
                 text_cache_dir: str | Path | None = None, dense: DenseSettings | None = None,
                 pamr: bool = False) -> None:
        if not prompt_sets:
            raise ValueError("a predictor needs at least one prompt set")
        self.clip = clip
        self.gamma = gamma
        self.short_side, self.max_long_side = short_side, max_long_side
        self.amp = amp
        self._prompt_sets: dict[str, PromptSet] = {}
        disk = None
        if text_cache_dir is not None:
            try:
                disk = DiskTextCache(text_cache_dir)
            except OSError as e:
                log.warning("text cache folder %s is not usable (%s): text embeddings stay in memory",
                            text_cache_dir, e)
        self.text_cache = ClassTextCache(text_cache_bytes, disk)
        for name, ps in prompt_sets.items():
            self.add_prompt_set(name, ps)
        self.dense: DenseSettings | None = dense or clip.dense
        self.pamr = bool(pamr)
        self._features: torch.Tensor | None = None
        self._features_dense: DenseSettings | None = None  # the settings self._features were computed with
        self._shifted: dict[int, list[torch.Tensor]] = {}  # k → features of the k × k shifted copies (GPR shifts)
        self._input: torch.Tensor | None = None  # normalised work-size image 1×3×h×w (re-encoding, PAMR)
        self._image_size: tuple[int, int] | None = None
        self._work_size: tuple[int, int] | None = None
        # text_encodes: text-tower runs (one per request with any new class); text_classes_encoded: class names
        # encoded by them (a vocabulary edit adds only its new names)
        self.stats = {"image_encodes": 0, "text_encodes": 0, "text_classes_encoded": 0}
        self.image_seconds = 0.0

    # ----------------------------------------------------------------- prompt sets
    @property
    def prompt_set_names(self) -> tuple[str, ...]:
        return tuple(self._prompt_sets)

    def prompt_set(self, name: str) -> PromptSet:
        if name not in self._prompt_sets:
            raise KeyError(f"unknown prompt set '{name}'; available: {', '.join(self._prompt_sets)}")
        return self._prompt_sets[name]

    def add_prompt_set(self, name: str, prompts: PromptSet) -> None:
        """Registers (or replaces) a prompt set. Cached text is keyed by the prompts' content, not by name:
        a replaced set never sees the old one's embeddings (they age out of the cache)."""
        self._prompt_sets[name] = prompts.to(self.clip.device).eval()

    # ----------------------------------------------------------------- dense settings
    def set_dense(self, mode: str | None = None, sliding: SlidingLike = None) -> DenseSettings:
        """Selects the dense-feature mode (None: the tower's default) and sliding window (None: whole image),
        validated for this tower (ValueError names the valid ones). The cached image features are keyed on
        them: the next ``predict`` re-encodes the current image if they changed; cached text is unaffected."""
        self.dense = self.clip.dense_settings(mode, sliding)
        return self.dense

    # ----------------------------------------------------------------- image
    @torch.no_grad()
    def set_image(self, image: ImageLike) -> None:
        """Loads (any size or mode), resizes to the work size and caches the dense features 1×D×h×w."""
        t0 = time.perf_counter()
        rgb, x, work_size = prepare_image(image, self.short_side, self.max_long_side, self.clip.device)
        self._features = self._features_dense = None  # nothing half-set if encoding fails
        self._input, self._image_size, self._work_size = self.clip.normalize(x), rgb.shape[:2], work_size
        self._encode(t0)

    @torch.no_grad()
    def _encode(self, t0: float) -> None:
        """Dense features of the current image under ``self.dense``; ``image_seconds`` covers them (and the
        image preparation when called from ``set_image``), so it reflects the mode and sliding window used."""
        with amp_autocast(self.clip.device, self.amp):
            feats = self.clip.dense_features(self._input, self.dense)
        self._features, self._features_dense, self._shifted = feats.float(), self.dense, {}
        self.stats["image_encodes"] += 1
        self.image_seconds = time.perf_counter() - t0

    @property
    def has_image(self) -> bool:
        return self._input is not None

    @property
    def features_current(self) -> bool:
        """Whether the cached image features were computed under the current dense settings."""
        return self._features is not None and self._features_dense == self.dense

    @property
    def image_features(self) -> torch.Tensor:
        """1×D×h×w features of the current image under the current dense settings (re-encoded if these
        changed since ``set_image``)."""
        if self._input is None:
            raise RuntimeError("call set_image() before predict()")
        if not self.features_current:
            self._encode(time.perf_counter())
        return self._features

    @torch.no_grad()
    def _shifted_features(self, k: int) -> list[torch.Tensor]:
        """The current image's k × k shifted copies' features (mvpseg.gpr_shifts), cached with the image's own
        (after ``image_features``, so under the current dense settings)."""
        if k not in self._shifted:
            with amp_autocast(self.clip.device, self.amp):
                self._shifted[k] = [f.float() for f in shifted_features(self.clip, self._input, k, self.dense)]
        return self._shifted[k]

    def dense_conflict(self, name: str) -> str:
        """Why prompt set ``name`` cannot run under the current dense mode ("" when it can): learned prompts
        only fit the mode they were learned with (checked at load against the CLIP's mode; ``set_dense`` may
        have changed it since). Handcrafted sets fit every mode."""
        meta = self._learned_meta(name)
        if meta is None or self.dense is None:
            return ""
        return dense_mode_mismatch(meta, self.clip, self.dense.mode, what=f"prompt set '{name}'",
                                   now="the dense mode is now")

    def learned_dense_mode(self, name: str) -> str | None:
        """The dense mode prompt set ``name`` was learned with (None: handcrafted, fits every mode)."""
        meta = self._learned_meta(name)
        return None if meta is None else learned_dense_mode(meta, self.clip)

    def _learned_meta(self, name: str):
        """The checkpoint metadata of a learned prompt set (None for a handcrafted one)."""
        meta = getattr(self.prompt_set(name), "meta", None)
        return meta if hasattr(meta, "dense_mode") else None

    # ----------------------------------------------------------------- text
    def text_key(self, prompts: str) -> TextKey:
        """The cache key of a prompt set's text embeddings under this CLIP, device and precision."""
        device = self.clip.device
        precision = f"{device.type}-{str(self.clip.model.token_embedding.weight.dtype).replace('torch.', '')}"
        if self.amp and device.type == "cuda":
            precision += "-bf16-autocast"
        return TextKey(self.clip.text_fingerprint, precision, prompt_fingerprint(self.prompt_set(prompts)))

    @torch.no_grad()
    def text_features(self, vocabulary: tuple[str, ...], prompts: str) -> TextViews:
        """K×C×D (+ C×D global) text embeddings, cached per class: only names not seen before with this
        prompt set are encoded, all in one call."""
        ps = self.prompt_set(prompts)

        def encode(names: tuple[str, ...]) -> TextViews:  # only names not cached yet reach here
            check_token_budget(self.clip, ps, names, prompts)
            with amp_autocast(self.clip.device, self.amp):
                views = ps.encode(self.clip, names).detach()
            self.stats["text_encodes"] += 1
            self.stats["text_classes_encoded"] += len(names)
            return views

        return self.text_cache.get(self.text_key(prompts), tuple(vocabulary), encode, tuple(ps.view_names),
                                   self.clip.device, per_class=getattr(ps, "per_class_text", True))

    # ----------------------------------------------------------------- predict
    @torch.no_grad()
    def predict(self, vocabulary: str | Sequence[str], prompts: str | None = None) -> Prediction:
        """Segments the current image into ``vocabulary`` with prompt set ``prompts`` (default: the first)."""
        names = parse_vocabulary(vocabulary)
        name = prompts or self.prompt_set_names[0]
        ps = self.prompt_set(name)
        conflict = self.dense_conflict(name)
        if conflict:
            raise CheckpointError(conflict)
        feats = self.image_features
        t0 = time.perf_counter()
        text = self.text_features(names, name)
        t1 = time.perf_counter()
        out = with_shifted_gpr(apply_prompts(feats, text, ps, self.gamma), self._shifted_features, text.glob, ps,
                               self.gamma)
        t2 = time.perf_counter()
        return Prediction(names, text.view_names, name, self._image_size, out, self._work_size,
                          {"text": t1 - t0, "head": t2 - t1}, self._input if self.pamr else None, self.dense)
