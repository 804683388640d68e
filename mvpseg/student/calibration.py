"""Calibrated stacking of a student's seen classes: a penalty on the logits of the classes it was trained on.

A zero-shot student is trained on the ground truth of the seen classes and on pseudo labels of the unseen
ones, so where a pixel is ambiguous between a seen and an unseen class it leans to the seen one (on the toy
VOC-like layout, 71 % of an unseen class's pixels went to a similar seen class; docs/history/distill-study.md).
Calibrated stacking (Chao et al., ECCV 2016; SPNet's calibration in zero-shot segmentation) lowers the seen
classes' logits by a constant p at test time:

    z'_c = z_c − p · [c is seen]

p is chosen *without unseen labels*, on the student's training images, where a pixel is known to belong to
some unseen class (the transductive setting's mark, ``UNLABELED`` in ``training/pseudo_labels.py``) but not
to which. For each candidate p (``PENALTY_GRID``):

    S(p) = mean over seen classes c with training pixels of recall_c(p)   (argmax == c on c's pixels)
    U(p) = fraction of unseen-marked pixels whose argmax is *some* unseen class
    p*   = argmax_p  H(p) = 2 S U / (S + U)       (ties: the smaller p)

H mirrors the harmonic mean of seen and unseen mIoU that the field reports (hIoU). U counts a pixel given
to the wrong unseen class as a hit, since the training marks do not say which unseen class it is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

PENALTY_GRID: tuple[float, ...] = tuple(i / 8 for i in range(33))  # 0, 0.125, …, 4 (logit units)


def check_penalty(value) -> float:
    """A seen-class penalty as a float; ``ValueError`` unless it is a finite number ≥ 0."""
    try:
        penalty = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"the seen-class penalty must be a number, got {value!r}") from None
    if not (math.isfinite(penalty) and penalty >= 0):
        raise ValueError(f"the seen-class penalty must be finite and ≥ 0, got {value!r}")
    return penalty


def stack_seen(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Logits B×C×… with the seen channels lowered by ``penalty``; ``seen``: C booleans."""
    if penalty == 0:
        return logits
    shape = (1, -1) + (1,) * (logits.dim() - 2)
    return logits - penalty * seen.to(device=logits.device, dtype=logits.dtype).view(shape)


def seen_mask(num_classes: int, unseen: Sequence[int]) -> torch.Tensor:
    """C booleans: True for every class outside ``unseen`` (a scored background included)."""
    mask = torch.ones(num_classes, dtype=torch.bool)
    mask[list(unseen)] = False
    return mask


@dataclass(frozen=True)
class CalibrationCounts:
    """Pixel counts over calibration images, per candidate penalty (P = len(penalties), C classes).

    seen_correct: P×C pixels of seen class c predicted c; seen_total: C pixels of each seen class;
    unseen_hit: P unseen-marked pixels predicted as some unseen class; unseen_total: unseen-marked pixels.
    """

    penalties: tuple[float, ...]
    seen_correct: torch.Tensor
    seen_total: torch.Tensor
    unseen_hit: torch.Tensor
    unseen_total: torch.Tensor

    def __add__(self, other: "CalibrationCounts") -> "CalibrationCounts":
        if self.penalties != other.penalties:
            raise ValueError("calibration counts over different penalty grids")
        return CalibrationCounts(self.penalties, self.seen_correct + other.seen_correct,
                                 self.seen_total + other.seen_total, self.unseen_hit + other.unseen_hit,
                                 self.unseen_total + other.unseen_total)

    def as_tensor(self) -> torch.Tensor:
        """All counts in one float64 vector (for one all-reduce across processes)."""
        return torch.cat([self.seen_correct.flatten(), self.seen_total, self.unseen_hit,
                          self.unseen_total.view(1)]).double()

    def from_tensor(self, flat: torch.Tensor) -> "CalibrationCounts":
        """The inverse of ``as_tensor`` (the same shapes as ``self``)."""
        p, c = self.seen_correct.shape
        parts = torch.split(flat.cpu().long(), [p * c, c, p, 1])
        return CalibrationCounts(self.penalties, parts[0].view(p, c), parts[1], parts[2], parts[3][0])


def empty_counts(num_classes: int, penalties: Sequence[float] = PENALTY_GRID) -> CalibrationCounts:
    p = len(penalties)
    zero = torch.zeros((), dtype=torch.long)
    return CalibrationCounts(tuple(float(x) for x in penalties), torch.zeros(p, num_classes, dtype=torch.long),
                             torch.zeros(num_classes, dtype=torch.long), torch.zeros(p, dtype=torch.long), zero)


def _group_best(scores: torch.Tensor, members: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of C×N ``scores``: the max over the rows in ``members`` and its class id (−inf / −1 if none)."""
    ids = members.nonzero().flatten()
    if ids.numel() == 0:
        n = scores.shape[1]
        return scores.new_full((n,), float("-inf")), torch.full((n,), -1, dtype=torch.long, device=scores.device)
    best, arg = scores[ids].max(0)
    return best, ids[arg]


@torch.no_grad()
def calibration_counts(logits: torch.Tensor, labels: torch.Tensor, seen: torch.Tensor, unseen_marker: int,
                       penalties: Sequence[float] = PENALTY_GRID) -> CalibrationCounts:
    """Counts of one batch. ``logits`` B×C×H×W at the labels' size; ``labels`` B×H×W: a seen class id, or
    ``unseen_marker`` on pixels of some unseen class; anything else (ignore) is skipped. ``seen``: C booleans.

    A penalty only moves the seen group against the unseen one, so the argmax of ``z − p·seen`` is the best
    seen class where (best seen − p) beats the best unseen score, else the best unseen class (ties to the
    lower class id, as ``argmax``): one max per group, then one comparison per penalty."""
    if logits.shape[-2:] != labels.shape[-2:] or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    num_classes = logits.shape[1]
    seen = seen.to(logits.device)
    labels = labels.to(logits.device).long()
    unseen_px = labels == unseen_marker
    seen_px = (labels >= 0) & (labels < num_classes) & ~unseen_px
    seen_px &= seen[labels.clamp(0, num_classes - 1)]  # an unmarked unseen id is not a seen pixel
    keep = (seen_px | unseen_px).flatten()
    flat = logits.permute(1, 0, *range(2, logits.dim())).reshape(num_classes, -1)[:, keep].float()  # C×N
    s_best, s_cls = _group_best(flat, seen)
    u_best, u_cls = _group_best(flat, ~seen)
    is_seen = seen_px.flatten()[keep]
    label = labels.flatten()[keep]
    gap = s_best - u_best  # the seen group wins at penalty p iff gap > p (or gap == p and its id is lower)
    right = is_seen & (s_cls == label)  # a seen pixel is correct iff the seen group wins (with its label)
    correct = torch.zeros(len(penalties), num_classes, dtype=torch.long)
    hit = torch.zeros(len(penalties), dtype=torch.long)
    for i, p in enumerate(penalties):
        seen_wins = (gap > float(p)) | ((gap == float(p)) & (s_cls < u_cls))
        correct[i] = torch.bincount(label[right & seen_wins], minlength=num_classes).cpu()
        hit[i] = int((~is_seen & ~seen_wins).sum())
    total = torch.bincount(labels[seen_px], minlength=num_classes).cpu()
    return CalibrationCounts(tuple(float(x) for x in penalties), correct, total, hit,
                             torch.tensor(int(unseen_px.sum()), dtype=torch.long))


@dataclass(frozen=True)
class SeenPenaltyChoice:
    """The chosen penalty and the table behind it: rows of (penalty, S, U, H)."""

    penalty: float
    table: tuple[tuple[float, float, float, float], ...]

    def as_record(self) -> dict:
        return {"penalty": self.penalty, "rule": "argmax H(S, U) on training images (mvpseg.student.calibration)",
                "table": [{"penalty": p, "seen_recall": s, "unseen_group_recall": u, "h": h}
                          for p, s, u, h in self.table]}


def choose_seen_penalty(counts: CalibrationCounts) -> SeenPenaltyChoice:
    """p* = argmax_p 2SU/(S+U) over ``counts.penalties`` (ties: the smaller p). Raises ``ValueError`` when the
    images have no seen or no unseen-marked pixel, where the rule has nothing to balance."""
    present = counts.seen_total > 0
    if not bool(present.any()) or int(counts.unseen_total) == 0:
        raise ValueError("calibration needs training pixels of seen classes and unseen-marked pixels; found "
                         f"{int(counts.seen_total.sum())} seen and {int(counts.unseen_total)} unseen-marked")
    recall = counts.seen_correct[:, present].double() / counts.seen_total[present].double()
    s = recall.mean(1)
    u = counts.unseen_hit.double() / float(counts.unseen_total)
    h = torch.where(s + u > 0, 2 * s * u / (s + u).clamp_min(1e-12), torch.zeros_like(s))
    rows = tuple((p, float(a), float(b), float(c)) for p, a, b, c in zip(counts.penalties, s, u, h))
    order = sorted(range(len(rows)), key=lambda i: (-round(rows[i][3], 9), rows[i][0]))
    return SeenPenaltyChoice(rows[order[0]][0], rows)
