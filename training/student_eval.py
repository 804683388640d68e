"""Scores of an MVP-SEG+ student on a dataset, with the conventions of ``training/evaluate.py`` (whole image,
single scale, logits resized bilinearly to the label's size, argmax), DDP-exact."""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from mvpseg.student import StudentNet, seen_mask, stack_seen

from .data import EvalShard, eval_loader
from .distributed import DistContext
from .metrics import ConfusionMatrix, SegScores, summarize
from .runlog import Progress


@torch.no_grad()
def evaluate_student(student: StudentNet, class_emb: torch.Tensor, bg_index: int | None, dataset, transform,
                     ctx: DistContext, limit: int | None = None, amp=None, progress: bool = True,
                     per_image: list | None = None, seen_penalty: float = 0.0) -> SegScores:
    """Whole-image, single-scale scores of the student on ``dataset`` (full label space), with the
    conventions of ``training/evaluate.py``: logits resized bilinearly to the label's size, argmax.
    ``per_image`` (a list, filled in): this process's per-image C×C confusions, for bootstrap intervals.
    ``seen_penalty``: calibrated stacking, the seen classes' logits lowered by it (``mvpseg.student.calibration``)."""
    was_training = student.training
    student.eval()
    cm = ConfusionMatrix(len(dataset.class_names), dataset.ignore_index)
    shard = EvalShard(dataset, transform, ctx.rank, ctx.world_size, limit)
    bar = Progress(len(shard), enabled=progress and ctx.is_main, desc="eval student")
    cast = torch.autocast(ctx.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    seen = seen_mask(len(dataset.class_names), tuple(dataset.unseen_indices))
    for image, label, _ in eval_loader(shard):
        with cast:
            logits = student(student.normalize(image[None].to(ctx.device)), class_emb, bg_index)
        logits = stack_seen(logits.float(), seen, seen_penalty)  # before resizing: argmax-equivalent, cheaper
        logits = F.interpolate(logits.float(), size=tuple(label.shape), mode="bilinear", align_corners=False)
        one = ConfusionMatrix(len(dataset.class_names), dataset.ignore_index)  # the totals are their sum
        one.update(logits.argmax(1)[0], label)
        cm.mat += one.mat
        if per_image is not None:
            per_image.append(one.mat.numpy().astype(np.int32))
        bar.update(ctx.world_size)
    bar.close()
    cm.all_reduce()
    student.train(was_training)
    return summarize(cm.mat.numpy(), tuple(dataset.class_names), tuple(dataset.unseen_indices))
