"""How well GPR's class scores g_c (Eq. 6) tell present from absent classes, per image: ROC-AUC (the ranking)
and separation, mean g(present) − mean g(absent) (the suppression Eq. 8 applies), for seen and unseen classes
separately. A class is present in an image when any of its pixels is labelled there.

The statistics are sums, so DDP shards add up: each score's logit (g's pre-sigmoid value; the AUC of a
monotone transform is the same) falls into one of ``BINS`` bins over [−LIMIT, LIMIT], which resolves scores
that all sit near g = 1 (0.998 against 0.994 are logits 6.2 and 5.1), and the sums of g give the means.
"""
from __future__ import annotations

import math

import numpy as np
import torch

LIMIT = 30.0
BINS = 6000  # 0.01 of a logit per bin


def _bin(logits: torch.Tensor) -> torch.Tensor:
    x = logits.detach().float().clamp(-LIMIT, LIMIT)
    return ((x + LIMIT) / (2 * LIMIT) * (BINS - 1)).round().long()


def auc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a present class > score of an absent one) + ½ P(tie) from two histograms over the same bins
    (ties: the same bin); NaN when either side is empty."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])  # absent scores in lower bins
    return float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))


class GPRStats:
    """Accumulates, for seen (0) and unseen (1) classes, histograms of present / absent GPR logits and the sums
    and counts of g."""

    def __init__(self, num_classes: int, unseen: tuple[int, ...] = ()) -> None:
        self.group = torch.zeros(num_classes, dtype=torch.long)
        self.group[list(unseen)] = 1
        self.hist = torch.zeros(2, 2, BINS, dtype=torch.float64)  # [seen/unseen, absent/present, bin]
        self.sums = torch.zeros(2, 2, 2, dtype=torch.float64)  # [group, absent/present, (Σ g, count)]

    def update(self, gpr_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> None:
        """gpr_logits: C (one image) or B×C; labels: H×W or B×H×W class indices."""
        logits = gpr_logits.detach().float().reshape(-1, gpr_logits.shape[-1]).cpu()
        labels = labels.reshape(logits.shape[0], -1).cpu()
        c = logits.shape[1]
        for img_logits, img_labels in zip(logits, labels):
            valid = img_labels[img_labels != ignore_index].long()
            present = torch.bincount(valid, minlength=c)[:c] > 0
            idx = (self.group, present.long())
            self.hist.index_put_((*idx, _bin(img_logits)), torch.ones(c, dtype=torch.float64), accumulate=True)
            g = img_logits.sigmoid().double()
            self.sums.index_put_((*idx, torch.zeros(c, dtype=torch.long)), g, accumulate=True)
            self.sums.index_put_((*idx, torch.ones(c, dtype=torch.long)), torch.ones(c, dtype=torch.float64),
                                 accumulate=True)

    def all_reduce(self) -> None:
        """Sums the statistics over processes (no-op without an initialised process group), as
        ``ConfusionMatrix.all_reduce`` does."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dev = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
            for name in ("hist", "sums"):
                t = getattr(self, name).to(dev)
                dist.all_reduce(t)
                setattr(self, name, t.cpu())

    def summary(self) -> dict:
        """{auc, separation, g_present, g_absent} for "seen" and "unseen" (NaN where a side is empty)."""
        out = {}
        for gi, group in enumerate(("seen", "unseen")):
            def mean(present: int) -> float:
                s, n = self.sums[gi, present].tolist()
                return s / n if n else float("nan")

            gp, ga = mean(1), mean(0)
            out[group] = {"auc": auc_from_histograms(self.hist[gi, 1].numpy(), self.hist[gi, 0].numpy()),
                          "separation": gp - ga if not (math.isnan(gp) or math.isnan(ga)) else float("nan"),
                          "g_present": gp, "g_absent": ga}
        return out
