"""Confusion matrix, per-class IoU, mIoU over seen / unseen / all classes and hIoU.

Conventions follow MMSegmentation: rows = ground truth, columns = prediction; pixels whose ground
truth is ``ignore_index`` are not counted; a class whose union is empty (never in the ground truth
and never predicted) has IoU NaN and is left out of the means.  Scores are percentages.
hIoU = 2·S·U / (S + U) over mIoU(S) and mIoU(U) (0 when both are 0).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch


class ConfusionMatrix:
    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred, target) -> None:
        pred = torch.as_tensor(pred).reshape(-1).to("cpu", torch.int64)
        target = torch.as_tensor(target).reshape(-1).to("cpu", torch.int64)
        if pred.shape != target.shape:
            raise ValueError(f"prediction has {pred.numel()} pixels, target {target.numel()}")
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        n = self.num_classes
        if target.numel() and (target.min() < 0 or target.max() >= n):
            raise ValueError(f"target ids outside [0, {n}) besides ignore {self.ignore_index}")
        if pred.numel() and (pred.min() < 0 or pred.max() >= n):
            raise ValueError(f"predicted ids outside [0, {n})")
        self.mat += torch.bincount(target * n + pred, minlength=n * n).reshape(n, n)

    def all_reduce(self) -> None:
        """Sum over processes (no-op without an initialised process group)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dev = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
            t = self.mat.to(dev)
            dist.all_reduce(t)
            self.mat = t.cpu()


def iou_per_class(mat) -> np.ndarray:
    m = np.asarray(mat, dtype=np.float64)
    inter = np.diag(m)
    union = m.sum(0) + m.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1), np.nan)


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def harmonic_iou(seen: float, unseen: float) -> float:
    if math.isnan(seen) or math.isnan(unseen):
        return float("nan")
    return 0.0 if seen + unseen == 0 else 2 * seen * unseen / (seen + unseen)


@dataclass(frozen=True)
class SegScores:
    class_names: tuple[str, ...]
    unseen: tuple[int, ...]
    iou: tuple[float, ...]  # per class, percent, NaN = absent
    miou: float
    miou_seen: float
    miou_unseen: float
    hiou: float
    pixel_acc: float
    # GPR's present/absent separation (training.gpr_metrics.GPRStats.summary) for sets with a global prompt
    gpr: dict | None = None

    def as_dict(self) -> dict:
        d = asdict(self)
        if self.gpr is not None:
            d["gpr"] = {group: {k: _json_num(v) for k, v in vals.items()} for group, vals in self.gpr.items()}
        d["per_class"] = [
            {"class": n, "unseen": i in self.unseen, "iou": _json_num(v)}
            for i, (n, v) in enumerate(zip(self.class_names, self.iou))
        ]
        del d["iou"]
        for k in ("miou", "miou_seen", "miou_unseen", "hiou", "pixel_acc"):
            d[k] = _json_num(d[k])
        d["class_names"], d["unseen"] = list(self.class_names), list(self.unseen)
        return d


def _json_num(v: float):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 4)


def summarize(mat, class_names: Sequence[str], unseen: Sequence[int] = ()) -> SegScores:
    m = np.asarray(mat, dtype=np.float64)
    if m.shape != (len(class_names), len(class_names)):
        raise ValueError(f"matrix {m.shape} does not match {len(class_names)} class names")
    iou = iou_per_class(m) * 100.0
    unseen = tuple(sorted(unseen))
    is_unseen = np.zeros(len(class_names), bool)
    is_unseen[list(unseen)] = True
    seen_m = _nanmean(iou[~is_unseen]) if (~is_unseen).any() else float("nan")
    unseen_m = _nanmean(iou[is_unseen]) if is_unseen.any() else float("nan")
    total = m.sum()
    acc = float(np.trace(m) / total * 100.0) if total else float("nan")
    return SegScores(
        tuple(class_names), unseen, tuple(float(v) for v in iou), _nanmean(iou), seen_m, unseen_m,
        harmonic_iou(seen_m, unseen_m), acc,
    )


def _fmt(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"


def summary_table(rows: Sequence[tuple[str, SegScores]]) -> str:
    """Markdown table, one row per (method label, scores): mIoU(U), mIoU(S), mIoU, hIoU (Table 1 order)."""
    out = ["| method | mIoU(U) | mIoU(S) | mIoU | hIoU |", "|---|---:|---:|---:|---:|"]
    for label, s in rows:
        out.append(f"| {label} | {_fmt(s.miou_unseen)} | {_fmt(s.miou_seen)} | {_fmt(s.miou)} | "
                   f"{_fmt(s.hiou)} |")
    return "\n".join(out)


def per_class_table(rows: Sequence[tuple[str, SegScores]]) -> str:
    """Markdown per-class IoU table, one column per method; unseen classes marked with *."""
    if not rows:
        return ""
    first = rows[0][1]
    head = "| class | " + " | ".join(label for label, _ in rows) + " |"
    out = [head, "|---|" + "---:|" * len(rows)]
    for i, name in enumerate(first.class_names):
        mark = f"{name} *" if i in first.unseen else name
        out.append(f"| {mark} | " + " | ".join(_fmt(s.iou[i]) for _, s in rows) + " |")
    return "\n".join(out)


def cross_table(grid: dict[str, dict[str, float]], value: str = "mIoU(U)") -> str:
    """Rows: prompts' source; columns: test datasets (paper Table 3)."""
    cols: list[str] = []
    for r in grid.values():
        cols += [c for c in r if c not in cols]
    out = [f"| {value} | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for row, vals in grid.items():
        out.append(f"| {row} | " + " | ".join(_fmt(vals.get(c, float("nan"))) for c in cols) + " |")
    return "\n".join(out)


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, allow_nan=False)
