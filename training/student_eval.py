"""Scores of an MVP-SEG+ student on a dataset, with the conventions of ``training/evaluate.py`` (whole image,
single scale, logits resized bilinearly to the label's size, argmax), DDP-exact."""
from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mvpseg.student import StudentNet, seen_mask, stack_seen

from .data import EvalShard, eval_loader
from .distributed import DistContext
from .metrics import ConfusionMatrix, SegScores, summarize
from .runlog import Progress


@torch.no_grad()
def evaluate_student_penalties(student: StudentNet, class_emb: torch.Tensor, bg_index: int | None, dataset,
                               transform, ctx: DistContext, penalties: Sequence[float], limit: int | None = None,
                               amp=None, progress: bool = True,
                               per_image: Sequence[list] | None = None) -> list[SegScores]:
    """Whole-image, single-scale scores of the student on ``dataset`` (full label space) under each seen-class
    penalty (calibrated stacking, ``mvpseg.student.calibration``), from one forward pass per image, with the
    conventions of ``training/evaluate.py``: logits resized bilinearly to the label's size, argmax.
    ``per_image`` (one list per penalty, filled in): this process's per-image C×C confusions, for bootstrap
    intervals."""
    was_training = student.training
    student.eval()
    num_classes = len(dataset.class_names)
    cms = [ConfusionMatrix(num_classes, dataset.ignore_index) for _ in penalties]
    shard = EvalShard(dataset, transform, ctx.rank, ctx.world_size, limit)
    bar = Progress(len(shard), enabled=progress and ctx.is_main, desc="eval student")
    cast = torch.autocast(ctx.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    seen = seen_mask(num_classes, tuple(dataset.unseen_indices))
    for image, label, _ in eval_loader(shard):
        with cast:
            logits = student(student.normalize(image[None].to(ctx.device)), class_emb, bg_index)
        logits = F.interpolate(logits.float(), size=tuple(label.shape), mode="bilinear", align_corners=False)
        for k, penalty in enumerate(penalties):
            one = ConfusionMatrix(num_classes, dataset.ignore_index)  # the totals are their sum
            one.update(stack_seen(logits, seen, penalty).argmax(1)[0], label)
            cms[k].mat += one.mat
            if per_image is not None:
                per_image[k].append(one.mat.numpy().astype(np.int32))
        bar.update(ctx.world_size)
    bar.close()
    for cm in cms:
        cm.all_reduce()
    student.train(was_training)
    return [summarize(cm.mat.numpy(), tuple(dataset.class_names), tuple(dataset.unseen_indices)) for cm in cms]


def evaluate_student(student: StudentNet, class_emb: torch.Tensor, bg_index: int | None, dataset, transform,
                     ctx: DistContext, limit: int | None = None, amp=None, progress: bool = True,
                     per_image: list | None = None, seen_penalty: float = 0.0) -> SegScores:
    """``evaluate_student_penalties`` with one penalty (``seen_penalty``; 0: the plain student)."""
    return evaluate_student_penalties(student, class_emb, bg_index, dataset, transform, ctx, [seen_penalty], limit,
                                      amp, progress, None if per_image is None else [per_image])[0]
