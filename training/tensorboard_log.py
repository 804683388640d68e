"""Optional TensorBoard logging for ``training.train_prompts`` and ``training.distill`` (``--tensorboard``).

Every record the run writes to ``log.jsonl`` also reaches TensorBoard (``TensorBoardLog`` is a sink of
``runlog.JsonlLogger``; the record → scalar mapping is ``runlog.scalars_of``, shared with ``training.report``):
losses, lr, τ1/τ2, speed, validation scores and the final evaluation.  Every ``--tb-every`` iterations (and at
the first and last) an image grid shows one fixed image's masks: per learned view (train_prompts: rows = the k
segmentation views, the global view and the final masks; distill: the teacher's views, then the student's
class probabilities), one column per class after the image itself.  TensorBoard is optional: without it,
``--tensorboard`` stops the run at once with one line saying what to install.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .runlog import scalars_of

TB_DIR = "tensorboard"
DEFAULT_EVERY = 100
MAX_CLASSES = 8  # columns of the mask grid: the classes present in the image first
TILE = 96  # pixels per tile (long side)
MISSING = ("--tensorboard needs the tensorboard package, which is not installed: pip install tensorboard "
           "(or run without --tensorboard)")


def require_tensorboard():
    """``torch.utils.tensorboard.SummaryWriter``; SystemExit with one line when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's wrapper raises ImportError (ModuleNotFoundError) without the package
        raise SystemExit(f"error: {MISSING}") from None
    return SummaryWriter


class _TensorBoardAction(argparse.Action):
    """``--tensorboard [DIR]``: checks the dependency while the command line is parsed, before any work."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        require_tensorboard()
        setattr(namespace, self.dest, values if values is not None else "")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_tensorboard_args(parser: argparse.ArgumentParser) -> None:
    """The options both training scripts share."""
    g = parser.add_argument_group("TensorBoard (optional: pip install tensorboard)")
    g.add_argument("--tensorboard", nargs="?", default=None, metavar="DIR", action=_TensorBoardAction,
                   help=f"also write TensorBoard events (losses, lr, temperatures, validation, mask grids) to DIR "
                        f"(default: OUT/{TB_DIR}); view with: tensorboard --logdir OUT")
    g.add_argument("--tb-every", type=_positive, default=DEFAULT_EVERY, metavar="N",
                   help=f"iterations between mask grids of the fixed image (default {DEFAULT_EVERY})")


class TensorBoardLog:
    """A ``runlog.JsonlLogger`` sink writing scalars, the run's config as text, and mask grids."""

    def __init__(self, log_dir: str | Path, every: int = DEFAULT_EVERY, last_iter: int | None = None,
                 purge_step: int | None = None) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.log_dir, self.every, self.last_iter = Path(log_dir), every, last_iter
        self.writer = require_tensorboard()(str(self.log_dir), purge_step=purge_step)
        self.snapshot: MaskSnapshot | None = None

    def log(self, record: dict) -> None:
        if record.get("event") in ("start", "resume"):
            text = json.dumps({k: v for k, v in record.items() if k not in ("vocabulary", "time")}, indent=1)
            self.writer.add_text(f"run/{record['event']}", f"```\n{text}\n```", int(record.get("from_iter") or 0))
        step, scalars = scalars_of(record)
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step or 0)

    def due(self, iteration: int) -> bool:
        """Whether iteration ``iteration`` gets a mask grid."""
        return iteration % self.every == 0 or iteration == self.last_iter

    def watch(self, snapshot: "MaskSnapshot", rows: str, start: int = 0) -> None:
        """Shows ``snapshot``'s mask grid under ``masks`` (``grid_step``), at once when the run starts at 0 (a
        resumed run's grid at ``start`` is already there); ``rows`` says what the grid's rows are."""
        self.snapshot = snapshot
        if start == 0:
            self.writer.add_text("masks/legend", f"{snapshot.legend}; rows: {rows}", 0)
            self.grid_step(0, force=True)

    def grid_step(self, iteration: int, force: bool = False) -> None:
        """Adds the watched image's mask grid at ``iteration`` when it is due (or ``force``)."""
        if self.snapshot is not None and (force or self.due(iteration)):
            self.writer.add_image("masks", self.snapshot.grid(), iteration)
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_tensorboard(args: argparse.Namespace, out: Path, enabled: bool, start: int, last_iter: int,
                     ) -> TensorBoardLog | None:
    """The run's TensorBoard sink, or None (no ``--tensorboard``, or not the main process). A resumed run drops
    the interrupted run's events after iteration ``start`` (``purge_step``), as the JSONL log drops its records."""
    if getattr(args, "tensorboard", None) is None or not enabled:
        return None
    log_dir = Path(args.tensorboard) if args.tensorboard else Path(out) / TB_DIR
    return TensorBoardLog(log_dir, args.tb_every, last_iter, purge_step=start + 1 if start > 0 else None)


def _tile(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """h×w map → 3×H×W in [0, 1] (min–max per map: each tile shows where its mask is highest)."""
    m = F.interpolate(m[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
    lo, hi = m.min(), m.max()
    m = (m - lo) / (hi - lo) if hi > lo else torch.zeros_like(m)
    return m.expand(3, -1, -1)


def mask_grid(image: torch.Tensor, rows: Sequence[torch.Tensor], columns: Sequence[int]) -> torch.Tensor:
    """3×H×W grid: one row per C×h×w map stack in ``rows`` (the image first, then the classes ``columns``)."""
    h, w = image.shape[-2:]
    scale = TILE / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    img = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0].clamp(0, 1)
    tiles = [t for maps in rows for t in [img] + [_tile(maps[c], size) for c in columns]]
    from torchvision.utils import make_grid

    return make_grid(tiles, nrow=len(columns) + 1, padding=2, pad_value=1.0)


def grid_columns(label: torch.Tensor, n_classes: int, ignore_index: int = 255) -> list[int]:
    """Up to MAX_CLASSES class ids: those in ``label`` by pixel count, then the others in order."""
    ids = label[label != ignore_index].long().flatten()
    ids = ids[ids < n_classes]
    counts = torch.bincount(ids, minlength=n_classes) if ids.numel() else torch.zeros(n_classes)
    present = [int(i) for i in counts.argsort(descending=True) if counts[i] > 0]
    return (present + [i for i in range(n_classes) if i not in present])[:MAX_CLASSES]


class MaskSnapshot:
    """One fixed image (index ``index`` of ``dataset`` under the evaluation ``transform``) and a function of its
    pixels (1×3×H×W in [0, 1]) that returns the grid's rows (each C×h×w); ``grid()`` renders them, no_grad."""

    def __init__(self, dataset, index: int, transform, vocabulary: Sequence[str], device: torch.device,
                 rows: Callable[[torch.Tensor], list[torch.Tensor]]) -> None:
        image, label = dataset[index]
        img_t, lbl_t = transform(image, label)
        self.image = img_t.float()
        self.pixels = img_t[None].float().to(device)
        self.columns = grid_columns(lbl_t, len(vocabulary), getattr(dataset, "ignore_index", 255))
        self.legend = "columns: image, " + ", ".join(vocabulary[c] for c in self.columns)
        self.rows = rows

    @torch.no_grad()
    def grid(self) -> torch.Tensor:
        return mask_grid(self.image, [r.detach().float().cpu() for r in self.rows(self.pixels)], self.columns)


def prompt_view_rows(model, vocabulary: Sequence[str]) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """train_prompts' rows: each segmentation view's cosine masks, the global view's, and the final masks
    (Eq. 8) of an ``mvpseg.MVPSeg`` whose prompts are being learned."""
    from mvpseg.heads import apply_prompts

    def rows(pixels: torch.Tensor) -> list[torch.Tensor]:
        prompts = model.prompts
        was_training = prompts.training
        prompts.eval()
        text = prompts.encode(model.clip, tuple(vocabulary))
        prompts.train(was_training)
        feats = model.image_features(model.clip.normalize(pixels))
        out = apply_prompts(feats, text, prompts, model.gamma)
        glob = [] if out.global_mask is None else [out.global_mask[0]]
        return [*out.view_masks[0], *glob, out.final[0]]

    return rows


def student_rows(student, class_emb: torch.Tensor, bg_index: int | None, teacher,
                 vocabulary: Sequence[str]) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """distill's rows: the teacher's (an ``mvpseg.MVPSeg``) per-view masks, fixed and computed once, and the
    student's class probabilities, evaluated in eval mode (BatchNorm statistics untouched)."""
    cached: list[torch.Tensor] = []

    def rows(pixels: torch.Tensor) -> list[torch.Tensor]:
        if not cached:
            text = teacher.text_features(tuple(vocabulary))
            out = teacher.head(teacher.image_features(teacher.clip.normalize(pixels)), text)
            cached.extend(out.view_masks[0])
        was_training = student.training
        student.eval()
        logits = student(student.normalize(pixels), class_emb, bg_index)
        student.train(was_training)
        return [*cached, logits[0].float().softmax(0)]

    return rows

