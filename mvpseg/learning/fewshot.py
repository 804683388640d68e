"""Few-shot prompt learning from a handful of labelled images (the demo's Learn tab; any script).

Only the text side learns, so the image tower runs once per image and every step after that costs one
text-tower pass for the (k+1)·C prompts plus the head on cached features. The recipe is the one
``training.train_prompts`` uses (``PromptLearner``: warm start on handcrafted embeddings, temperature
calibration, AdamW with the anchor), with model selection on held-out images when there are enough of them
(the warm start itself is a candidate, so learning has to beat it there). Everything runs under a hard time
budget and can be stopped between steps.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..clip_backbone import FrozenCLIP
from ..image_io import prepare_image
from ..handcrafted import handcrafted_set
from ..model import MVPSeg
from ..prompts import LearnedPrompts, PromptSet, prior_embedding
from .learner import PromptLearner
from .recipe import DEFAULT, LearnRecipe

IGNORE = 255


@dataclass(frozen=True)
class FewShotSettings:
    """n_seg / n_ctx / use_global: the prompts learned; iterations: learning steps after the warm start and
    the calibration; time_budget_s: a hard limit on the whole job (image tower included); batch_size: images
    per step; val_every: steps between validations; holdout: share of the images kept for validation when
    there are at least ``min_holdout_images`` of them; prior: the handcrafted set of the warm start and anchor;
    recipe: the learning recipe (the default, with a shorter warm start and calibration for a few images)."""

    n_seg: int = 3
    n_ctx: int = 16
    use_global: bool = True
    iterations: int = 150
    time_budget_s: float = 110.0
    batch_size: int = 2
    val_every: int = 10
    holdout: float = 0.2
    min_holdout_images: int = 4
    seed: int = 0
    prior: str = "maskclip-85"
    recipe: LearnRecipe = field(default_factory=lambda: replace(DEFAULT, init_fit=60, calib_steps=20))

    def __post_init__(self) -> None:
        if not (1 <= self.n_seg <= 8 and 1 <= self.n_ctx <= 64 and 1 <= self.iterations <= 10_000):
            raise ValueError("n_seg must be in 1…8, n_ctx in 1…64 and iterations in 1…10000")
        if not (0 < self.time_budget_s <= 24 * 3600 and self.batch_size >= 1 and self.val_every >= 1):
            raise ValueError("time_budget_s must be in (0, 1 day], batch_size and val_every ≥ 1")


@dataclass(frozen=True)
class LabelledImage:
    """An image (H×W×3 uint8) and its labels (H×W, indices into the class names; 255 = not labelled)."""

    rgb: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class LearnProgress:
    """Where a job is: phase ("encoding images", "warm start", "calibration", "learning", "done"), steps done
    of ``total``, seconds so far, the last loss and validation mIoU (None before the first)."""

    phase: str
    step: int
    total: int
    seconds: float
    loss: float | None = None
    val_miou: float | None = None


@dataclass
class FewShotResult:
    """The learned prompts (the best validated iterate), their history (one dict per logged step), the
    validation mIoU of the chosen prompts and of the handcrafted prior, why the job ended ("done" | "time"
    | "cancelled"), and what it used."""

    prompts: LearnedPrompts
    history: list[dict]
    best_iteration: int
    val_miou: float | None
    prior_val_miou: float | None
    stopped: str
    seconds: float
    n_train: int
    n_val: int


class Stopped(Exception):
    """Raised inside a job to end it early (the caller's ``should_stop`` said so, or the budget ran out)."""


def encode_examples(clip: FrozenCLIP, examples: Sequence[LabelledImage], short_side: int, max_long_side: int = 2048,
                    dense=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Dense features (1×D×h×w) and labels at the network's input size (1×H'×W', long) per example: the
    image tower runs once per image, under ``dense`` (None: the CLIP's default mode)."""
    out = []
    for ex in examples:
        rgb, x, (h, w) = prepare_image(ex.rgb, short_side, max_long_side, clip.device)
        labels = torch.from_numpy(np.ascontiguousarray(ex.labels, dtype=np.uint8)).to(clip.device)
        labels = F.interpolate(labels[None, None].float(), size=(h, w), mode="nearest")[0].long()
        with torch.no_grad():
            feats = clip.dense_features(clip.normalize(x), dense).float()
        out.append((feats, labels))
    return out


def _miou(model: MVPSeg, text, data: Sequence[tuple[torch.Tensor, torch.Tensor]], n_classes: int) -> float:
    """mIoU over the classes labelled in ``data`` (argmax of the final masks vs the labels, 255 ignored)."""
    conf = torch.zeros(n_classes, n_classes, dtype=torch.long)
    with torch.no_grad():
        for feats, labels in data:
            out = model.head(feats, text)
            logits = F.interpolate(out.final.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
            pred, y = logits.argmax(1).flatten().cpu(), labels.flatten().cpu()
            keep = y != IGNORE
            conf += torch.bincount(y[keep] * n_classes + pred[keep], minlength=n_classes ** 2).view(n_classes, -1)
    inter, present = conf.diag().double(), conf.sum(1) > 0
    union = conf.sum(0) + conf.sum(1) - conf.diag()
    return float((inter[present] / union[present].clamp(min=1)).mean() * 100) if present.any() else float("nan")


def segmentation_miou(clip: FrozenCLIP, prompts: PromptSet, data: Sequence[tuple[torch.Tensor, torch.Tensor]],
                      class_names: Sequence[str], gamma: float = 10.0) -> float:
    """mIoU (%) of any prompt set on encoded examples (``encode_examples``), over the classes their labels
    contain: how the Learn tab and its benchmark compare learned with handcrafted prompts."""
    model = MVPSeg(clip, prompts, gamma=gamma)
    with torch.no_grad():
        text = model.text_features(tuple(class_names))
    return _miou(model, text, data, len(class_names))


def learn_prompts(clip: FrozenCLIP, examples: Sequence[LabelledImage], class_names: Sequence[str],
                  settings: FewShotSettings = FewShotSettings(), *, short_side: int = 512, dense=None,
                  on_progress: Callable[[LearnProgress], None] | None = None,
                  should_stop: Callable[[], bool] | None = None) -> FewShotResult:
    """Learns MVP-SEG prompts for ``class_names`` from ``examples`` (labels index the names). Stops at
    ``settings.iterations``, at the time budget (``stopped="time"``, the best prompts so far are returned) or
    when ``should_stop()`` turns true (``stopped="cancelled"``, likewise). Raises ValueError for examples
    without any labelled pixel or labels beyond the names. ``dense``: the DenseSettings of the image
    features (None: the CLIP's default)."""
    t0 = time.perf_counter()
    names = tuple(class_names)
    if not examples:
        raise ValueError("no labelled images")
    for i, ex in enumerate(examples):
        if ex.rgb.shape[:2] != ex.labels.shape[:2]:
            raise ValueError(f"image {i + 1}: image {ex.rgb.shape[1]}×{ex.rgb.shape[0]} and labels "
                             f"{ex.labels.shape[1]}×{ex.labels.shape[0]} differ in size")
        used = np.unique(ex.labels)
        if (used[used != IGNORE] >= len(names)).any():
            extra = sorted(int(u) for u in used if u != IGNORE and u >= len(names))
            raise ValueError(f"image {i + 1}: label ids {extra} have no class name (there are {len(names)} names)")
    if not any((ex.labels != IGNORE).any() for ex in examples):
        raise ValueError("no labelled pixel in any image")
    stopped = "done"

    def check(phase: str, step: int, total: int, **kw) -> None:
        elapsed = time.perf_counter() - t0
        if on_progress:
            on_progress(LearnProgress(phase, step, total, elapsed, **kw))
        if should_stop and should_stop():
            raise Stopped("cancelled")
        if elapsed > settings.time_budget_s:
            raise Stopped("time")

    gen = torch.Generator().manual_seed(settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        prompts = LearnedPrompts(clip.text_width, n_seg=settings.n_seg, n_ctx=settings.n_ctx,
                                 use_global=settings.use_global, residual=settings.recipe.residual).to(clip.device)
    model = MVPSeg(clip, prompts)
    learner = PromptLearner(model, settings.recipe)
    order = torch.randperm(len(examples), generator=gen).tolist()
    n_val = math.ceil(settings.holdout * len(examples)) if len(examples) >= settings.min_holdout_images else 0
    val_ids, train_ids = order[:n_val], order[n_val:]
    history: list[dict] = []
    best = {"iter": 0, "miou": -1.0, "state": None}
    prior_miou = None
    try:
        check("encoding images", 0, len(examples))
        data = []
        for k, ex in enumerate(examples):  # one at a time: the budget and a cancel are checked in between
            data += encode_examples(clip, [ex], short_side, dense=dense)
            check("encoding images", k + 1, len(examples))
        train, val = [data[i] for i in train_ids], [data[i] for i in val_ids]
        prior = handcrafted_set(settings.prior).to(clip.device)
        # encoded once (the set keeps it): the anchor's targets, the prior's own validation score and, in residual
        # form, the embedding the learned change is added to
        prior_text = prior.encode(clip, names)
        targets = prior_embedding(prior_text)
        if val:
            prior_miou = _miou(MVPSeg(clip, prior), prior_text, val, len(names))

        def batches():
            while True:
                idx = torch.randint(len(train), (settings.batch_size,), generator=gen).tolist()
                yield _stack([train[i] for i in idx])

        def validate(it: int) -> float | None:
            if not val:
                return None
            with torch.no_grad():
                score = _miou(model, model.text_features(names), val, len(names))
            if score > best["miou"]:
                state = {k: v.detach().clone() for k, v in prompts.state_dict().items()}
                best.update(iter=it, miou=score, state=state)
            return score

        r = settings.recipe
        if r.init_fit > 0:  # the warm start in chunks, so the budget and a cancel are checked
            for done in range(0, r.init_fit, 10):
                learner.warm_start(names, targets, steps=min(10, r.init_fit - done))
                check("warm start", min(done + 10, r.init_fit), r.init_fit)
        if r.residual:  # from here: the prior exactly, plus what learning changes (as train_prompts)
            prompts.set_prior(prior)
        if r.calib_steps > 0:
            learner.calibrate(names, (b for b, _ in zip(batches(), range(r.calib_steps))))
            check("calibration", r.calib_steps, r.calib_steps)
        score = validate(0)
        history.append({"iter": 0, "val_miou": score})
        check("learning", 0, settings.iterations, val_miou=score)
        stream = batches()
        for it in range(1, settings.iterations + 1):
            feats, labels = next(stream)
            losses = learner.step(feats, labels, names, prior=targets)
            record = {"iter": it, **{k: float(v) for k, v in losses.items()}}
            if it % settings.val_every == 0 or it == settings.iterations:
                record["val_miou"] = validate(it)
            history.append(record)
            check("learning", it, settings.iterations, loss=record["total"], val_miou=record.get("val_miou"))
    except Stopped as e:
        stopped = str(e)
    if best["state"] is not None:
        prompts.load_state_dict(best["state"])
    seconds = time.perf_counter() - t0
    if on_progress:
        on_progress(LearnProgress("done", len(history), settings.iterations, seconds))
    return FewShotResult(prompts.eval(), history, best["iter"] if val_ids else len(history) - 1,
                         best["miou"] if best["state"] is not None else None, prior_miou, stopped, seconds,
                         len(train_ids), len(val_ids))


def _stack(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of (features, labels) pairs: the first one and every other of the same feature and label size
    (images of different sizes cannot share a batch tensor, and cropping would cut objects the labels name)."""
    f0, y0 = pairs[0]
    same = [(f, y) for f, y in pairs if f.shape == f0.shape and y.shape == y0.shape]
    return torch.cat([f for f, _ in same]), torch.cat([y for _, y in same])
