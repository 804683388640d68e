"""Training targets of the MVP-SEG+ knowledge-transfer stage (MaskCLIP+'s transductive zero-shot schedule).

**Which pixels are "unseen pixels".** In the transductive zero-shot setting the training images of the
unseen classes are available but their annotation is not. Following MaskCLIP+ (``LoadAnnotations(
suppress_labels=unseen)``), a training pixel is an *unseen pixel* iff its ground-truth class is one of the
dataset's unseen classes (``dataset.unseen_indices``, the paper's split). ``HideUnseen`` replaces those
ground-truth ids with the marker ``UNLABELED`` *before* augmentation, so the unseen class identity never
reaches the training step: only the fact that the pixel belongs to *some* unseen class survives (exactly
the information MaskCLIP+ uses). Every other pixel keeps its ground truth: seen classes keep their id and
``ignore_index`` (255: VOC boundaries and background, COCO-Stuff unlabelled, crop padding) stays ignored.

**Targets.** Unseen pixels get pseudo labels, seen and ignored pixels never change:

* *teacher phase* (iterations ``< switch_iter``, the first 1/10 by default): the argmax, over the unseen
  classes only, of MVP-SEG's final masks (frozen CLIP + learned prompts, Eq. 8) on the same augmented crop;
* *self-training phase* (the rest): the argmax over the unseen classes of the student's own detached
  logits of the same forward pass (MaskCLIP+ ``assign_label`` with the decode head's features).

Scores are upsampled bilinearly to the label size before the argmax, as in MaskCLIP+.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mvpseg.gpr_shifts import shifted_features, with_shifted_gpr
from mvpseg.model import MVPSeg
from mvpseg.prompts import TextViews

UNLABELED = 254  # marker of unseen pixels in label maps (MaskCLIP+ uses -1); never a class id here
IGNORE_INDEX = 255
TEACHER, SELF_TRAINING = "teacher", "self"


def default_switch_iter(max_iters: int, fraction: float = 0.1) -> int:
    """The paper: 'the first 1/10 training iterations adopt MVP-SEG guided learning'."""
    return int(round(max_iters * fraction))


def phase_at(iteration: int, switch_iter: int) -> str:
    """Phase of 0-based ``iteration``: the first ``switch_iter`` iterations are teacher-guided.

    (MaskCLIP+'s 1-based counter gives 1999 guided iterations out of 20k; we use exactly 2000.)
    """
    return TEACHER if iteration < switch_iter else SELF_TRAINING


def hide_unseen(label: np.ndarray, unseen: Sequence[int]) -> np.ndarray:
    """H×W uint8 ground truth → the same with every unseen-class id replaced by ``UNLABELED``."""
    out = np.asarray(label).astype(np.uint8, copy=True)
    if len(unseen):
        out[np.isin(label, np.asarray(unseen))] = UNLABELED
    return out


class HideUnseen(torch.utils.data.Dataset):
    """Wraps a full-label-space dataset: ``(image, label)`` with unseen-class pixels marked ``UNLABELED``.

    ``cache=True`` keeps every returned sample in memory (per DataLoader worker): for small datasets and the
    procedural toy world, whose samples cost more to render than to train on.
    """

    def __init__(self, dataset, unseen: Sequence[int], cache: bool = False) -> None:
        n = len(dataset.class_names)
        if n >= UNLABELED:
            raise ValueError(f"{n} classes collide with the UNLABELED marker {UNLABELED}")
        if any(not 0 <= u < n for u in unseen):
            raise ValueError(f"unseen indices {list(unseen)} outside [0, {n})")
        self.dataset, self.unseen = dataset, tuple(int(u) for u in unseen)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cache is not None and index in self._cache:
            return self._cache[index]  # transforms copy before writing, so sharing the arrays is safe
        image, label = self.dataset[index]
        item = (image, hide_unseen(label, self.unseen))
        if self._cache is not None:
            self._cache[index] = item
        return item


def check_no_leak(targets: torch.Tensor, unseen_ids: torch.Tensor) -> None:
    """Refuses a batch whose labels still carry an unseen class id (MaskCLIP+'s ``label_sanity_check``)."""
    if unseen_ids.numel() and bool(torch.isin(targets, unseen_ids).any()):
        raise RuntimeError("ground-truth leakage: an unseen class id reached the training targets")


@torch.no_grad()
def assign_unseen(labels: torch.Tensor, scores: torch.Tensor, unseen_ids: torch.Tensor) -> torch.Tensor:
    """Fills the unseen pixels of ``labels`` with the best unseen class of ``scores``.

    labels: B×H×W int64 with ``UNLABELED`` at unseen pixels; scores: B×U×h×w, channel j scoring class
    ``unseen_ids[j]`` (any monotone score: logits, log-probabilities); unseen_ids: U int64.
    Returns a new B×H×W tensor equal to ``labels`` except at unseen pixels, which hold unseen class ids.
    """
    out = labels.clone()
    mask = labels == UNLABELED
    if not bool(mask.any()):
        return out
    if scores.shape[1] != unseen_ids.numel():
        raise ValueError(f"{scores.shape[1]} score channels for {unseen_ids.numel()} unseen classes")
    if tuple(scores.shape[-2:]) != tuple(labels.shape[-2:]):
        scores = F.interpolate(scores.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    best = unseen_ids.to(labels.device)[scores.argmax(dim=1)]
    out[mask] = best[mask]
    return out


@torch.no_grad()
def teacher_scores(teacher: MVPSeg, images: torch.Tensor, unseen_text: TextViews, use_gpr: bool = True
                   ) -> torch.Tensor:
    """MVP-SEG on CLIP-normalised images B×3×H×W, scored against the unseen classes only → B×U×h×w.

    Returns ``τ1 Σ_i m^i + log g`` (``log g`` only with GPR): per pixel it differs from log m_c (Eq. 8) by a
    constant, and bilinear upsampling commutes with adding a per-class constant, so the argmax after
    upsampling equals the argmax of MVP-SEG's final masks at label size.
    """
    out = teacher.head(teacher.image_features(images), unseen_text)
    # GPR as the teacher's checkpoint reads it (mvpseg/gpr_shifts.py: over shifted copies where it says so)
    out = with_shifted_gpr(out, lambda k: shifted_features(teacher.clip, images, k), unseen_text.glob,
                           teacher.prompts, teacher.gamma)
    scores = out.fused_logits.float()
    if use_gpr and out.gpr_logits is not None:
        scores = scores + F.logsigmoid(out.gpr_logits.float())[:, :, None, None]
    return scores
