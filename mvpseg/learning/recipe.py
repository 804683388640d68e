"""What a prompt-learning step does, as a frozen dataclass: optimiser, loss weights and forms, anchor, warm start
and temperature calibration. ``training.recipe.TrainConfig`` (the scripts' command line) and the demo's Learn
tab both build one; the values below are the default recipe (docs/recipe.md), ``PAPER`` is sec. 4.3's.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..losses import LossWeights

OPTIMIZERS = ("sgd", "adamw")  # sgd: the paper's; adamw: an extension (build_optimizer)


@dataclass(frozen=True)
class LearnRecipe:
    """optimizer / lr / momentum / weight_decay: the optimiser of the context vectors and temperatures;
    lambda_seg / lambda_cls / lambda_oc: λ1–λ3 of Eq. 10 on the reductions of ``mvpseg.losses`` (λ_cls acts
    only with a global prompt); cls_mode: L_cls as Eq. 7 prints it ("paper") or the full BCE ("bce");
    seg_reduction: L_seg's mean over pixels ("pixel") or classes ("class");
    lambda_prior: the KgCoOp-style anchor of the mean view to the handcrafted embeddings (0 = off);
    init_fit / init_fit_lr / init_fit_oc: text-only warm-start steps fitting every view to the handcrafted
    embeddings (0 = a random start), their lr, whether they also minimise λ_OC · L_OC;
    calib_steps / calib_lr: Adam steps fitting log τ1 / log τ2 alone before learning (0 = off);
    residual: learn the prompts in residual form (``LearnedPrompts.set_prior``: the handcrafted prior's
    embedding plus the change of the context's since the warm start, so learning starts from the handcrafted
    classifier exactly; issue #27, docs/recipe.md)."""

    optimizer: str = "adamw"
    lr: float = 2e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lambda_seg: float = 1.0
    lambda_cls: float = 3.0
    lambda_oc: float = 1.0
    cls_mode: str = "paper"
    seg_reduction: str = "pixel"
    lambda_prior: float = 8.0
    init_fit: int = 200
    init_fit_lr: float = 2e-3
    init_fit_oc: bool = False
    calib_steps: int = 50
    calib_lr: float = 0.05
    residual: bool = True

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}")
        if self.cls_mode not in ("paper", "bce"):
            raise ValueError(f"cls_mode must be 'paper' or 'bce', got {self.cls_mode!r}")
        if self.seg_reduction not in ("pixel", "class"):
            raise ValueError(f"seg_reduction must be 'pixel' or 'class', got {self.seg_reduction!r}")
        if min(self.lr, self.init_fit_lr, self.calib_lr) <= 0 or min(self.init_fit, self.calib_steps) < 0:
            raise ValueError("learning rates must be > 0 and step counts ≥ 0")

    def loss_weights(self, use_global: bool) -> LossWeights:
        """λ of Eq. 10 for a prompt set with (or without) a global prompt: no GPR, no L_cls."""
        return LossWeights(seg=self.lambda_seg, cls=self.lambda_cls if use_global else 0.0, oc=self.lambda_oc)

    @property
    def uses_prior(self) -> bool:
        """Whether the handcrafted embeddings are needed (warm start, anchor or residual form)."""
        return self.lambda_prior > 0 or self.init_fit > 0 or self.residual


DEFAULT = LearnRecipe()
# sec. 4.3 as printed: momentum SGD, λ3 = 100 on Eq. 5's sum (LossWeights.paper(k).oc on the mean over pairs,
# set per k by the caller), the full BCE, no warm start, anchor or calibration
PAPER = replace(DEFAULT, optimizer="sgd", lr=2e-4, cls_mode="bce", lambda_prior=0.0, init_fit=0, calib_steps=0,
                residual=False)


def build_optimizer(recipe: LearnRecipe, params) -> torch.optim.Optimizer:
    """The paper's momentum SGD, or AdamW (decoupled weight decay, default betas; an extension).
    AdamW's steps are ≈ lr per coordinate whatever the gradient's scale, while SGD's first steps follow
    the largest term, λ_OC · L_OC (≈ 50 of a total ≈ 60 at random initialisation in the toy world).
    In the toy world's 150-iteration runs SGD moved τ1 from 33 to ≈ 7, AdamW to 27–31
    (docs/history/toyworld-attempts.md, attempt 6)."""
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
