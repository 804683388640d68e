"""The MVP-SEG+ student behind the predictor API: ``set_image()`` then ``predict(vocabulary)``.

It returns the same ``Prediction`` as ``Predictor`` (label map at the original image size, class
probabilities, …), so the demo can show MVP-SEG and MVP-SEG+ side by side. The student has one "view"
(its own logits) and no GPR. ``set_image`` caches the student's pixel embeddings, so a new vocabulary
costs the text tower (cached per vocabulary) and one matrix product.

The name "background" in a vocabulary selects the student's learned background embedding when it has one
(Context-style students); otherwise it is a class name like any other.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch

from ..clip_backbone import ClipSpec, FrozenCLIP, load_clip
from ..heads import MVPSegOutput
from ..image_io import ImageLike, prepare_image
from ..predictor import Prediction, amp_autocast, parse_vocabulary
from ..prompts import PromptSet
from ..text_cache import LRUCache
from .calibration import check_penalty, stack_seen
from .checkpoint import LoadedStudent, load_student
from .net import StudentNet, fuse_views

BACKGROUND = "background"


class StudentPredictor:
    """Open-vocabulary segmentation with a distilled student.

    Args:
        student: the trained network (put in eval mode here).
        clip: the frozen CLIP whose text tower embeds new vocabularies (its image tower is not used).
        prompts: the prompt set the student was distilled with (its views are fused as in Eq. 4).
        name: the label of this model in ``Prediction.prompt_set`` (the demo shows it).
        short_side / max_long_side: inference resize, as ``Predictor`` (MaskCLIP+: short side 512).
        amp: bfloat16 autocast on CUDA.
        seen_penalty / seen_classes: calibrated stacking (``mvpseg.student.calibration``): the logits of the
            vocabulary entries named in ``seen_classes`` (the student's labelled training classes, matched
            case-insensitively) are lowered by ``seen_penalty``; ``from_checkpoint`` reads both from the student.
    """

    def __init__(self, student: StudentNet, clip: FrozenCLIP, prompts: PromptSet, name: str = "mvp-seg+",
                 short_side: int = 512, max_long_side: int = 2048, text_cache_size: int = 32,
                 amp: bool = True, pamr: bool = False, seen_penalty: float = 0.0,
                 seen_classes: Sequence[str] = ()) -> None:
        self.student = student.to(clip.device).eval()
        self.pamr = bool(pamr)  # refine label maps with PAMR (mvpseg.dense.pamr), as Predictor(pamr=True)
        self._input: torch.Tensor | None = None
        self.clip = clip
        self.prompts = prompts.to(clip.device).eval()
        self.name = name
        self.seen_penalty = check_penalty(seen_penalty)
        self.seen_classes = frozenset(n.strip().lower() for n in seen_classes)
        self.short_side, self.max_long_side = short_side, max_long_side
        self.amp = amp
        self._text_cache = LRUCache(text_cache_size)  # vocabulary → C×D fused embeddings
        self._features: torch.Tensor | None = None
        self._image_size: tuple[int, int] | None = None
        self._work_size: tuple[int, int] | None = None
        self.stats = {"image_encodes": 0, "text_encodes": 0}
        self.image_seconds = 0.0

    @classmethod
    def from_checkpoint(cls, path: str | Path, clip: ClipSpec | FrozenCLIP | None = None,
                        device: str | torch.device = "cpu", **kwargs) -> "StudentPredictor":
        """Loads a student checkpoint; without ``clip`` the CLIP recorded in its metadata is loaded."""
        if clip is None:
            from .checkpoint import clip_spec_of, read_student_meta

            clip = clip_spec_of(read_student_meta(path))
        frozen = clip if isinstance(clip, FrozenCLIP) else load_clip(clip, device)
        # the student's own backbone makes the image features: only the CLIP's text tower must match
        loaded: LoadedStudent = load_student(path, frozen, check_dense=False)
        kwargs.setdefault("seen_penalty", loaded.meta.seen_penalty)
        kwargs.setdefault("seen_classes", loaded.meta.seen_classes)
        return cls(loaded.net, frozen, loaded.prompts, **kwargs)

    @property
    def prompt_set_names(self) -> tuple[str, ...]:
        return (self.name,)

    @property
    def has_image(self) -> bool:
        return self._features is not None

    @torch.no_grad()
    def set_image(self, image: ImageLike) -> None:
        """Loads (any size or mode), resizes to the work size and caches the student features 1×D×h×w."""
        t0 = time.perf_counter()
        rgb, x, work_size = prepare_image(image, self.short_side, self.max_long_side, self.student.device)
        self._input = self.student.normalize(x)
        with amp_autocast(self.student.device, self.amp):
            feats = self.student.features(self._input)
        self._features, self._image_size, self._work_size = feats.float(), rgb.shape[:2], work_size
        self.stats["image_encodes"] += 1
        self.image_seconds = time.perf_counter() - t0

    @torch.no_grad()
    def class_embeddings(self, vocabulary: tuple[str, ...]) -> torch.Tensor:
        """C×D fused text embeddings of ``vocabulary`` (cached)."""
        def encode() -> torch.Tensor:
            with amp_autocast(self.clip.device, self.amp):
                emb = fuse_views(self.prompts.encode(self.clip, vocabulary).detach())
            self.stats["text_encodes"] += 1
            return emb

        return self._text_cache.get(vocabulary, encode)

    def background_index(self, names: Sequence[str]) -> int | None:
        if not self.student.has_background:
            return None
        lowered = [n.lower() for n in names]
        return lowered.index(BACKGROUND) if BACKGROUND in lowered else None

    def seen_flags(self, names: Sequence[str]) -> torch.Tensor:
        """C booleans: which vocabulary entries are the student's seen training classes."""
        return torch.tensor([n.strip().lower() in self.seen_classes for n in names], dtype=torch.bool)

    @torch.no_grad()
    def predict(self, vocabulary: str | Sequence[str], prompts: str | None = None) -> Prediction:
        """Segments the current image into ``vocabulary``; ``prompts`` is accepted for API parity with
        ``Predictor`` and must be None or this predictor's name."""
        if self._features is None:
            raise RuntimeError("call set_image() before predict()")
        if prompts not in (None, self.name):
            raise KeyError(f"unknown prompt set '{prompts}'; this student predictor has only '{self.name}'")
        names = parse_vocabulary(vocabulary)
        t0 = time.perf_counter()
        emb = self.class_embeddings(names)
        t1 = time.perf_counter()
        logits = self.student.classify(self._features, emb, self.background_index(names)).float()
        logits = stack_seen(logits, self.seen_flags(names), self.seen_penalty)
        out = MVPSegOutput(view_masks=logits[:, None], fused_logits=logits, global_mask=None, gpr_logits=None)
        t2 = time.perf_counter()
        return Prediction(names, ("student",), self.name, self._image_size, out, self._work_size,
                          {"text": t1 - t0, "head": t2 - t1}, self._input if self.pamr else None)
