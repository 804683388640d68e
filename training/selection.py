"""Model selection for prompt learning without touching unseen classes: held-out seen classes, a held-out
set of training images, periodic validation and early stopping.

Why: prompts learned on seen classes drift towards them (CoOp's base-to-new over-fitting). The honest
signal for "does this prompt still transfer to classes it was not trained on" is a *held-out subset of
the seen classes*: their pixels are ignored and their names never reach the text tower while learning,
and validation scores them next to the trained classes on images the run does not train on. The
selection score is the held-out classes' mIoU (a combined score such as hIoU(trained, held-out) lets gains
on the trained classes hide a loss of transfer: measured, docs/history/recipe-addenda.md, first addendum), and a validation replaces the
best only when a paired bootstrap over the validation images says it is better with the given confidence
(a small validation set otherwise turns noise into "improvements" over the warm start).  Unseen classes
are never used: validation images come from the training split in the seen label space (unseen pixels are
255 there), and the vocabulary is the seen vocabulary.

``ValidationSet`` caches the frozen image features once (the image tower never changes), so a validation
costs one text-tower pass for the vocabulary plus the head.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import torch

from mvpseg.heads import apply_prompts

from .metrics import ConfusionMatrix, harmonic_iou, iou_per_class

log = logging.getLogger("mvpseg.train")
SELECT_MODES = ("holdout", "seen", "none")
# Which iterate the global prompt comes from (TrainConfig.gpr_select): selection scores the segmentation views,
# and the warm start it usually keeps on VOC-like layouts leaves the global prompt untrained (ranking AUC 0.88
# against 0.92 after 500 iterations on the development CLIP; docs/history/gpr-study.md).
# joint: one selected iterate for everything; last: the views selected without early stopping, the global prompt
# of the last iterate; views: the views selected as without a global prompt (scored without GPR, the same
# patience), the global prompt trained on to the last iterate (docs/history/gpr-views-study.md).
GPR_SELECT_MODES = ("joint", "last", "views")
GLOBAL_STATE_KEYS = ("log_tau2", "bias")  # with row 0 of "ctx": the global prompt's part of a prompt state
GLOBAL_STATE_PREFIX = "gpr_adapter_net."  # ... and the GPR adapter's parameters (LearnedPrompts.enable_gpr_adapter)
# Validation images for a procedural (fresh-sample) dataset come from this index range, far beyond
# any training position (max_iters × global batch), so they are scenes the run never trains on.
FRESH_VALIDATION_OFFSET = 1 << 40


@dataclass(frozen=True)
class ClassHoldout:
    """A split of the seen vocabulary (ids 0…C−1 of the seen label space) into trained and held-out classes.

    ``lut`` maps seen-space label ids to training-vocabulary ids (held-out and ignore → 255).
    """

    names: tuple[str, ...]
    held_out: tuple[int, ...]

    @property
    def trained(self) -> tuple[int, ...]:
        held = set(self.held_out)
        return tuple(i for i in range(len(self.names)) if i not in held)

    @property
    def train_vocabulary(self) -> tuple[str, ...]:
        return tuple(self.names[i] for i in self.trained)

    def lut(self, ignore_index: int = 255) -> torch.Tensor:
        table = torch.full((256,), ignore_index, dtype=torch.long)
        for new, old in enumerate(self.trained):
            table[old] = new
        return table

    def to_training_labels(self, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
        """Seen-space labels B×H×W → training-vocabulary labels (held-out pixels → ignore)."""
        if not self.held_out:
            return labels
        return self.lut(ignore_index).to(labels.device)[labels.long().clamp(0, 255)]


def choose_holdout(names: Sequence[str], fraction: float, seed: int,
                   keep: Sequence[str] = ("background",)) -> ClassHoldout:
    """Holds out ``round(fraction · eligible)`` seen classes (at least 1 when fraction > 0 and 4+ classes are
    eligible, never all but one), drawn with ``seed``. Names in ``keep`` (a catch-all background) are
    never held out: it is not a class a prompt has to generalise to."""
    names = tuple(names)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"--holdout-frac must be in [0, 1), got {fraction}")
    eligible = [i for i, n in enumerate(names) if n.lower() not in {k.lower() for k in keep}]
    n = int(round(fraction * len(eligible)))
    if fraction > 0 and len(eligible) >= 4:
        n = max(n, 1)
    n = min(n, max(len(eligible) - 2, 0))  # keep at least two classes to learn from
    rng = np.random.default_rng([seed, 7919])
    held = tuple(sorted(int(i) for i in rng.choice(eligible, size=n, replace=False))) if n else ()
    return ClassHoldout(names, held)


def validation_indices(dataset, n: int, seed: int, fresh: bool) -> tuple[list[int], list[int] | None]:
    """(validation indices, training indices or None = all/fresh). A fixed pool gives up ``n`` seeded
    images (at most a fifth of it) that training then never draws."""
    if n <= 0:
        return [], None
    if fresh:
        return [FRESH_VALIDATION_OFFSET + i for i in range(n)], None
    total = len(dataset)
    n = min(n, total // 5)
    if n == 0:
        return [], None
    perm = np.random.default_rng([seed, 104729]).permutation(total)
    return sorted(int(i) for i in perm[:n]), sorted(int(i) for i in perm[n:])


class IndexView(torch.utils.data.Dataset):
    """``dataset`` restricted to ``indices`` (keeps the attributes training reads: names, ignore id)."""

    def __init__(self, dataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[self.indices[i]]

    def __getattr__(self, name):  # prompt_names, ignore_index, skipped, ...
        if name in ("dataset", "indices"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


@dataclass
class ValidationSet:
    """Cached dense features and labels (seen label space) of the validation images."""

    features: list[torch.Tensor]
    labels: list[torch.Tensor]

    @classmethod
    @torch.no_grad()
    def build(cls, clip, dataset, indices: Sequence[int], transform, device) -> "ValidationSet":
        feats, labels = [], []
        for idx in indices:
            image, label = dataset[idx]
            img_t, lbl_t = transform(image, label)
            feats.append(clip.dense_features(clip.normalize(img_t[None].to(device))).float())
            labels.append(lbl_t.to(device))
        return cls(feats, labels)

    def __len__(self) -> int:
        return len(self.features)

    @torch.no_grad()
    def confusions(self, model, vocabulary: Sequence[str], prompts=None, gpr: bool = True) -> np.ndarray:
        """Per-image confusion matrices N×C×C (rows: truth, over the seen vocabulary) of the model's prompts,
        or of another prompt set (e.g. the 85 templates as a reference). ``gpr=False`` scores the fused masks
        of the segmentation views alone (Eq. 4, no Eq. 8), as a set without a global prompt would be."""
        prompts = model.prompts if prompts is None else prompts
        was_training = prompts.training
        prompts.eval()
        text = prompts.encode(model.clip, tuple(vocabulary)).detach()
        prompts.train(was_training)
        if not gpr:
            text = replace(text, glob=None)
        mats = []
        for feats, label in zip(self.features, self.labels):
            cm = ConfusionMatrix(len(vocabulary))
            out = apply_prompts(feats, text, prompts, model.gamma)
            cm.update(out.log_final(tuple(label.shape)).argmax(1)[0], label)
            mats.append(cm.mat.numpy().astype(np.int32))
        return np.stack(mats)

    def score(self, model, vocabulary: Sequence[str], holdout: ClassHoldout, mode: str, prompts=None,
              gpr: bool = True) -> dict:
        """``summarise`` of ``confusions``, plus the matrices under ``"confusions"``."""
        mats = self.confusions(model, vocabulary, prompts, gpr)
        return {**summarise(mats.sum(0), holdout, mode), "confusions": mats}


def summarise(mat: np.ndarray, holdout: ClassHoldout, mode: str) -> dict:
    """mIoU over trained classes, over held-out classes, and the selection ``score``: held-out mIoU
    (``holdout``: transfer to classes not trained on is what selection is for) or mIoU over all seen
    classes (``seen``, or ``holdout`` without held-out classes)."""
    iou = iou_per_class(mat) * 100
    trained = _nanmean(iou[list(holdout.trained)])
    held = _nanmean(iou[list(holdout.held_out)]) if holdout.held_out else float("nan")
    score = held if mode == "holdout" and holdout.held_out else _nanmean(iou)
    return {"miou_trained": trained, "miou_held_out": held, "hiou": harmonic_iou(trained, held), "score": score}


def prob_better(new: np.ndarray, best: np.ndarray, holdout: ClassHoldout, mode: str, draws: int = 200,
                seed: int = 0) -> float:
    """Paired bootstrap over validation images: the share of resamples in which ``new`` (N×C×C per-image
    confusions) scores higher than ``best`` on the same images. Selection takes a new best only when this
    is ≥ the confidence, so a noisy small validation set cannot turn chance into a "better" prompt."""
    n = len(new)
    rng = np.random.default_rng([seed, 15485863])
    wins = 0
    for _ in range(draws):
        idx = rng.integers(0, n, n)
        a = summarise(new[idx].sum(0), holdout, mode)["score"]
        b = summarise(best[idx].sum(0), holdout, mode)["score"]
        wins += int(a > b)  # NaN (class absent from the resample) never wins
    return wins / draws


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def splice_global(best: dict, last: dict) -> dict:
    """A prompt state (``LearnedPrompts.state_dict()``) with ``best``'s segmentation views and τ1 and ``last``'s
    global prompt: row 0 of ``ctx`` (the global prompt's context; LearnedPrompts puts it first), log τ2, the
    GPR bias and the GPR adapter. ``ctx0`` is fixed at the warm start, so both states share it."""
    out = dict(best)
    ctx = best["ctx"].detach().clone()
    ctx[0] = last["ctx"][0].to(ctx)
    out["ctx"] = ctx
    for key in [*GLOBAL_STATE_KEYS, *(k for k in last if k.startswith(GLOBAL_STATE_PREFIX))]:
        if key in last:
            out[key] = last[key].detach().clone().to(best[key])
    return out


@dataclass
class BestTracker:
    """The best validated prompts so far and the early-stopping count; saved in training states so a
    resumed run selects exactly as an uninterrupted one. A validation becomes the new best only when its
    score beats the best's in at least ``confidence`` of paired bootstrap resamples of the validation
    images (0 = any higher score); otherwise it counts towards ``patience``."""

    patience: int = 0  # validations without improvement before stopping; 0 = never stop early
    confidence: float = 0.9
    best_score: float = -math.inf
    best_iter: int = 0
    best_state: dict | None = None
    best_confusions: torch.Tensor | None = None
    bad: int = 0
    history: list = field(default_factory=list)

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience

    def update(self, iteration: int, result: dict, prompts: torch.nn.Module, holdout: ClassHoldout | None = None,
               mode: str = "holdout") -> bool:
        """Records a validation (``result`` from ``ValidationSet.score``); returns True when training should
        stop."""
        result = dict(result)
        mats = result.pop("confusions", None)
        score = result["score"]
        p = 1.0
        if self.best_confusions is not None and mats is not None and holdout is not None and self.confidence > 0:
            p = prob_better(mats, self.best_confusions.numpy(), holdout, mode, seed=iteration)
        better = not math.isnan(score) and score > self.best_score and (
            self.best_state is None or self.confidence <= 0 or p >= self.confidence)
        self.history.append({"iter": iteration, **result, "p_better": p, "accepted": better})
        if better:
            self.best_score, self.best_iter, self.bad = float(score), iteration, 0
            self.best_state = {k: v.detach().cpu().clone() for k, v in prompts.state_dict().items()}
            self.best_confusions = None if mats is None else torch.from_numpy(np.ascontiguousarray(mats))
        else:
            self.bad += 1
        return self.should_stop

    def state_dict(self) -> dict:
        return {"patience": self.patience, "confidence": self.confidence, "best_score": self.best_score,
                "best_iter": self.best_iter, "best_state": self.best_state,
                "best_confusions": self.best_confusions, "bad": self.bad, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("patience", "confidence", "best_score", "best_iter", "best_state", "best_confusions", "bad",
                    "history"):
            setattr(self, key, state[key])
