"""Calibrated stacking of an MVP-SEG+ student: the seen-class penalty chosen on its training images.

``training.distill`` calls ``calibrate_student`` after training (``--seen-penalty auto``, the default) and
stores the penalty in the student checkpoint; ``StudentPredictor`` and the evaluation apply it. The rule and
its reasons are in ``mvpseg/student/calibration.py`` and docs/distill.md. The images are the first
``--calibration-images`` of the training split, whole and un-augmented, with the same marks as training:
an unseen-class pixel only says "some unseen class" (``pseudo_labels.HideUnseen``).

This script calibrates (or re-calibrates) a finished student, for checkpoints written before the penalty
existed; the dataset defaults to the one the student was distilled on::

    python -m training.calibrate_student runs/voc-plus/student.safetensors
    python -m training.calibrate_student STUDENT --dataset folder --data-root my_data --images 500
    python -m training.calibrate_student STUDENT --seen-penalty 0      # switch calibration off
"""
from __future__ import annotations

if not __package__:  # run by path (python training/calibrate_student.py): import as the package would
    import _as_script; __package__ = _as_script.PACKAGE  # noqa: E702

import argparse
import contextlib
import json
import logging
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from mvpseg.student import (PENALTY_GRID, SeenPenaltyChoice, StudentNet, calibration_counts, check_penalty,
                            choose_seen_penalty, empty_counts, seen_mask)

from .data import EvalShard, eval_loader
from .distributed import DistContext, all_reduce_sum
from .pseudo_labels import UNLABELED, HideUnseen
from .runlog import Progress

log = logging.getLogger("mvpseg.calibrate")
AUTO = "auto"
DEFAULT_IMAGES = 300


def parse_penalty(value: str) -> str | float:
    """``--seen-penalty``: "auto" or a number ≥ 0."""
    if str(value).lower() == AUTO:
        return AUTO
    try:
        return check_penalty(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number: {e}") from None


@torch.no_grad()
def calibrate_student(student: StudentNet, class_emb: torch.Tensor, bg_index: int | None, dataset,
                      unseen: Sequence[int], transform, ctx: DistContext, limit: int = DEFAULT_IMAGES,
                      amp=None, progress: bool = False,
                      penalties: Sequence[float] = PENALTY_GRID) -> SeenPenaltyChoice:
    """The penalty of ``mvpseg.student.calibration`` on the first ``limit`` images of ``dataset`` (a training
    split in the full label space; its ``unseen`` ids are marked, never read). DDP: each process scores its
    shard and the counts are summed. Raises ``ValueError`` when the images hold no seen or no unseen pixel."""
    was_training = student.training
    student.eval()
    num_classes = class_emb.shape[0]
    seen = seen_mask(num_classes, unseen)
    counts = empty_counts(num_classes, penalties)
    shard = EvalShard(HideUnseen(dataset, unseen), transform, ctx.rank, ctx.world_size, limit)
    bar = Progress(len(shard), enabled=progress and ctx.is_main, desc="calibrate")
    cast = torch.autocast(ctx.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    for image, label, _ in eval_loader(shard):
        with cast:
            logits = student(student.normalize(image[None].to(ctx.device)), class_emb, bg_index)
        logits = F.interpolate(logits.float(), size=tuple(label.shape), mode="bilinear", align_corners=False)
        counts = counts + calibration_counts(logits, label[None], seen, UNLABELED, penalties)
        bar.update(ctx.world_size)
    bar.close()
    counts = counts.from_tensor(all_reduce_sum(counts.as_tensor().to(ctx.device), ctx))
    student.train(was_training)
    return choose_seen_penalty(counts)


def resolve_seen_penalty(setting: str | float, student: StudentNet, class_emb: torch.Tensor,
                         bg_index: int | None, dataset, unseen: Sequence[int], transform, ctx: DistContext,
                         limit: int = DEFAULT_IMAGES, amp=None, progress: bool = False) -> tuple[float, dict | None]:
    """``--seen-penalty`` after training: (penalty, calibration record or None). "auto" without unseen classes
    or without unseen-marked pixels in the images has nothing to balance and gives 0 (logged)."""
    if setting != AUTO:
        return float(setting), None
    if not unseen:
        log.info("no unseen classes: no seen-class penalty")
        return 0.0, None
    try:
        choice = calibrate_student(student, class_emb, bg_index, dataset, unseen, transform, ctx, limit, amp,
                                   progress)
    except ValueError as e:
        log.warning("seen-class penalty 0: %s", e)
        return 0.0, None
    record = {**choice.as_record(), "images": min(limit, len(dataset))}
    if ctx.is_main:
        log.info("seen-class penalty %g (calibrated stacking on %d training images):\n%s", choice.penalty,
                 record["images"], describe(choice))
        if choice.penalty == choice.table[-1][0]:
            log.warning("the seen-class penalty is at the end of its grid (%g): the student's seen bias is "
                        "unusually strong; check its unseen pseudo labels", choice.penalty)
    return choice.penalty, record


def describe(choice: SeenPenaltyChoice) -> str:
    """One line per candidate around the choice, for the log."""
    rows = [f"  p={p:<6g} S={s:.3f} U={u:.3f} H={h:.3f}{'  <- chosen' if p == choice.penalty else ''}"
            for p, s, u, h in choice.table if p <= max(2.0 * choice.penalty, 1.0)]
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("student", help="student checkpoint (.safetensors with its .json)")
    p.add_argument("--dataset", default=None, help="default: the student's own (its recorded train_config)")
    p.add_argument("--data-root", default=None, help="default: the student's own")
    p.add_argument("--split", default=None, help="default: the student's own training split")
    p.add_argument("--images", type=int, default=DEFAULT_IMAGES, help="training images scored (default 300)")
    p.add_argument("--seen-penalty", type=parse_penalty, default=AUTO,
                   help="auto (the rule) or a fixed penalty to write (0: no calibration)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dry-run", action="store_true", help="print the choice, do not rewrite the checkpoint")
    return p


def main(argv: list[str] | None = None) -> float:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    a = build_parser().parse_args(argv)
    from mvpseg.clip_backbone import load_clip
    from mvpseg.student import clip_spec_of, fuse_views, load_student, read_student_meta, set_seen_penalty

    from .datasets import build_dataset, get_profile

    try:
        meta = read_student_meta(a.student)
    except Exception as e:  # a missing or corrupt sidecar: one clear line
        raise SystemExit(f"cannot read student {a.student}: {e}") from None
    record = None
    if a.seen_penalty == AUTO:
        train = meta.extra.get("train_config") or {}
        name, root = a.dataset or train.get("dataset"), a.data_root or train.get("data_root")
        if not name or not root:
            raise SystemExit("this student does not record its dataset: pass --dataset and --data-root")
        clip = load_clip(clip_spec_of(meta), torch.device(a.device))
        loaded = load_student(a.student, clip, check_dense=False)
        data = build_dataset(name, root, a.split or train.get("split"), label_space="full", train=True)
        if tuple(data.prompt_names) != tuple(meta.class_names):
            raise SystemExit(f"the dataset's classes {list(data.prompt_names)[:4]}… are not the student's "
                             f"{list(meta.class_names)[:4]}…: calibrate on the data it was distilled on")
        with torch.no_grad():
            emb = fuse_views(loaded.prompts.encode(clip, tuple(data.prompt_names)))
        bg = meta.background_index if loaded.net.has_background else None
        try:
            choice = calibrate_student(loaded.net, emb, bg, data, meta.unseen, get_profile(name).eval_transform(),
                                       DistContext(), a.images, progress=True)
        except ValueError as e:
            raise SystemExit(f"cannot calibrate: {e}") from None
        penalty, record = choice.penalty, choice.as_record()
        record.update(images=min(a.images, len(data)), dataset=name, data_root=str(root))
        print(describe(choice))
    else:
        penalty = float(a.seen_penalty)
    print(json.dumps({"student": str(a.student), "seen_penalty": penalty}))
    if not a.dry_run:
        set_seen_penalty(Path(a.student), penalty, record)
    return penalty


if __name__ == "__main__":
    main()
