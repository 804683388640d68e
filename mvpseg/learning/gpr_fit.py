"""Fitting GPR's reading of the features after prompt learning: the GPR adapter φ, τ2 and β on cached features.

Why a separate stage: GPR (Eq. 6) ranks a class's presence by one direction, the global prompt's embedding, read
off the frozen dense features. On one toy CLIP that ranking stops at unseen ROC-AUC ≈ 0.875 while the features
hold more; a class-agnostic adapter φ (``mvpseg.gpr_adapter``) fitted *after* a run on the presence of the seen
classes of a few thousand images, with the run's global prompt fixed, lifted every one of 12 VOC-like runs above
0.9 (docs/history/gpr-presence-ceiling.md), while the same adapter trained *within* the run, jointly with the
global prompt on a smaller pool, did not (docs/history/gpr-adapter-study.md). This module is that offline fit as
a library function, so ``training.train_prompts --gpr-fit`` and any caller with cached features run the same code.

What it changes: φ (a fresh one), log τ2 and the GPR bias β — nothing the segmentation views or the global
prompt's text use, so the fused masks before Eq. 8 and every class embedding stay exactly as they were.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..gpr_shifts import shifted_gpr_logits
from ..prompts import LearnedPrompts


@dataclass(frozen=True)
class GPRFitSettings:
    """The fit of docs/history/gpr-presence-ceiling.md § 3: φ of hidden ``width``; τ2 and β restart at
    (``tau2_init``, 0) because φ changes the cosine scale they were learned for; Adam at ``lr`` for ``steps``
    minibatches of ``batch`` images drawn with replacement (a function of ``seed`` and the step only); γ as the
    model's Eq. 6 pooling."""
    width: int = 128
    steps: int = 1500
    batch: int = 256
    lr: float = 3e-3
    tau2_init: float = 0.05
    gamma: float = 10.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.width < 1 or self.steps < 1 or self.batch < 1:
            raise ValueError(f"GPR fit needs width, steps and batch >= 1, got {self.width}, {self.steps}, "
                             f"{self.batch}")
        if not (self.lr > 0 and self.tau2_init > 0):
            raise ValueError(f"GPR fit needs lr > 0 and tau2_init > 0, got {self.lr}, {self.tau2_init}")


def fit_gpr(prompts: LearnedPrompts, glob: torch.Tensor, features: torch.Tensor, presence: torch.Tensor,
            settings: GPRFitSettings = GPRFitSettings(),
            reduce_grads: Callable[[list[torch.Tensor]], None] | None = None,
            rank: int = 0) -> list[float]:
    """Fits a new GPR adapter, τ2 and β of ``prompts`` (in place) by BCE of Eq. 6's logits against ``presence``.

    glob: C×D unit global-prompt embeddings of the classes (fixed); features: N×D×h×w frozen dense features of
    N images (any float dtype; a minibatch is cast to float32); presence: N×C in {0, 1}
    (``mvpseg.losses.presence_targets``).
    ``reduce_grads`` averages the gradients over processes (DDP: every process holds its own share of the
    images and draws its own minibatches, seeded by ``rank``). Returns the loss of every step."""
    if not prompts.use_global:
        raise ValueError("fitting GPR needs a prompt set with a global prompt")
    n, c = presence.shape
    if features.shape[0] != n or glob.shape[0] != c or glob.shape[1] != features.shape[1]:
        raise ValueError(f"GPR fit: features {tuple(features.shape)}, presence {tuple(presence.shape)} and global "
                         f"embeddings {tuple(glob.shape)} do not agree (N×D×h×w, N×C, C×D)")
    if n == 0:
        raise ValueError("GPR fit needs at least one image")
    adapter = prompts.enable_gpr_adapter(features.shape[1], settings.width, seed=settings.seed)
    if getattr(prompts, "bias", None) is None:
        prompts.enable_gpr_bias()
    with torch.no_grad():
        prompts.log_tau2.fill_(math.log(settings.tau2_init))
        prompts.bias.zero_()
    params = [prompts.log_tau2, prompts.bias, *adapter.parameters()]
    for p in params:
        p.requires_grad_(True)
    text = glob.detach().float().to(features.device)
    gen = _generator(settings.seed, rank, stream=1)
    return _fit_bce(params, lambda idx: shifted_gpr_logits([features[idx]], text, prompts, settings.gamma),
                    presence, settings.steps, settings.batch, settings.lr, gen, reduce_grads)


def _generator(seed: int, rank: int, stream: int) -> torch.Generator:
    """The minibatch draws of one fit: a function of (seed, rank, which fit) only, so a resumed run refits alike."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(rank)) * 7 + stream)


def _fit_bce(params: list[torch.Tensor], logits_of: Callable[[torch.Tensor], torch.Tensor], presence: torch.Tensor,
             steps: int, batch: int, lr: float, gen: torch.Generator,
             reduce_grads: Callable[[list[torch.Tensor]], None] | None) -> list[float]:
    """Adam on ``params`` for ``steps`` minibatches of ``batch`` image indices drawn with replacement by ``gen``:
    BCE of ``logits_of(indices)`` (B×C) against ``presence`` (N×C) of those images. Returns the losses."""
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, presence.shape[0], (batch,), generator=gen).to(presence.device)
        loss = F.binary_cross_entropy_with_logits(logits_of(idx), presence[idx].float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if reduce_grads is not None:
            reduce_grads(params)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def calibrate_shifted_gpr(prompts: LearnedPrompts, glob: torch.Tensor, features: torch.Tensor,
                          presence: torch.Tensor, steps: int = 300, batch: int = 256, lr: float = 0.02,
                          gamma: float = 10.0, seed: int = 0,
                          reduce_grads: Callable[[list[torch.Tensor]], None] | None = None,
                          rank: int = 0) -> list[float]:
    """Refits log τ2 and β alone (context and GPR adapter fixed) by BCE of GPR's logits averaged over shifted
    copies of each image (``mvpseg.gpr_shifts``), the reading the prompts will be used with.

    Why: τ2 and β are learned on the unshifted features; each shifted copy adds a cell of padding, which moves
    Eq. 6's pooled cosines, so the averaged logits keep the ranking but drift from the calibration (present and
    absent classes end closer in g). features: N×S×D×h×w (S copies per image); presence N×C. Returns the losses."""
    n = features.shape[0]
    if presence.shape[0] != n or glob.shape[0] != presence.shape[1]:
        raise ValueError(f"GPR calibration: features {tuple(features.shape)}, presence {tuple(presence.shape)} "
                         f"and global embeddings {tuple(glob.shape)} do not agree (N×S×D×h×w, N×C, C×D)")
    if getattr(prompts, "bias", None) is None:
        prompts.enable_gpr_bias()
    params = [prompts.log_tau2, prompts.bias]
    adapter = prompts.gpr_adapter()
    frozen = [] if adapter is None else [p for p in adapter.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    gen = _generator(seed, rank, stream=2)
    text = glob.detach().float().to(features.device)
    try:
        return _fit_bce(params, lambda idx: shifted_gpr_logits(list(features[idx].unbind(1)), text, prompts, gamma),
                        presence, steps, min(batch, n), lr, gen, reduce_grads)
    finally:
        for p in frozen:
            p.requires_grad_(True)
