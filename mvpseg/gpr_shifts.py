"""GPR over sub-cell shifts of the image: Eq. 6's class scores averaged over k × k offsets of the feature grid.

Why: Eq. 6 pools the global prompt's cosine map over the dense feature grid, one cell per 32 pixels for a
ResNet. An object that straddles cells is seen only in pieces, so whether its class scores as present depends on
where the grid happens to fall. Shifting the image by fractions of a cell and averaging the logits removes that
dependence. On the toy CLIPs' 96-pixel scenes (a 3 × 3 grid) the average of 2 × 2 shifts raised unseen
ROC-AUC by +0.006 … +0.019 (docs/history/gpr-shift-study.md). Only g changes: the segmentation views read the
unshifted features as before. The cost is k² more passes of the image tower per image.

Offsets: (dx, dy) ∈ {0, s/k, …, (k−1)s/k}², s the tower's stride; each shifted copy is padded by (dx, s − dx)
columns and (dy, s − dy) rows of zeros — the mean colour after normalisation — so every copy is one cell larger
than the image and the grid falls ``dx`` pixels further into it.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch
import torch.nn.functional as F

from .dense import tower_stride
from .heads import MVPSegOutput, floored, global_branch


def shift_offsets(stride: int, k: int) -> list[tuple[int, int]]:
    """The k × k pixel offsets (dx, dy) of a feature grid of ``stride``, row-major; [(0, 0)] for k = 1."""
    if k < 1 or stride < 1:
        raise ValueError(f"GPR shifts need k >= 1 and stride >= 1, got k={k}, stride={stride}")
    if k > stride:
        raise ValueError(f"{k} shifts per axis exceed the tower's stride of {stride} pixels")
    steps = [i * stride // k for i in range(k)]
    return [(dx, dy) for dy in steps for dx in steps]


def shifted_features(clip, images: torch.Tensor, k: int, settings=None) -> list[torch.Tensor]:
    """Normalised images B×3×H×W → the dense features of the k × k shifted copies (``shift_offsets``), each
    B×D×(h+1)×(w+1), with dense ``settings`` (``mvpseg.dense_settings.DenseSettings``; None: the CLIP's).
    k = 1: the features of the image itself, unpadded."""
    if k == 1:
        return [clip.dense_features(images, settings)]
    s = tower_stride(clip.model.visual)
    return [clip.dense_features(F.pad(images, (dx, s - dx, dy, s - dy)), settings) for dx, dy in shift_offsets(s, k)]


def shifted_gpr_logits(features: list[torch.Tensor], glob: torch.Tensor, prompts, gamma: float = 10.0
                       ) -> torch.Tensor:
    """Eq. 6's logits with ``prompts``' τ2, bias and GPR adapter (``PromptSet``), averaged over the shifted
    copies' ``features`` (``shifted_features``; one tensor: GPR's plain reading): glob C×D → B×C."""
    adapter, tau2, bias = prompts.gpr_adapter(), prompts.tau2(), prompts.gpr_bias()
    logits = [global_branch(f.float(), glob, gamma, tau2, bias, adapter)[1] for f in features]
    return torch.stack(logits).mean(0)


def with_shifted_gpr(out: MVPSegOutput, features_for: Callable[[int], list[torch.Tensor]], glob: torch.Tensor | None,
                     prompts, gamma: float = 10.0) -> MVPSegOutput:
    """``out`` (the head's output on the unshifted features) with its GPR logits replaced by the shifted average
    when ``prompts.gpr_shifts()`` > 1; ``features_for(k)`` gives the shifted copies' features (callers cache
    them per image). Unchanged for k = 1 or without a global prompt."""
    k = prompts.gpr_shifts()
    if k == 1 or out.gpr_logits is None or glob is None:
        return out
    # the floor of a fitted set bounds the shifted reading too (mvpseg.gpr_floor)
    return replace(out, gpr_logits=floored(shifted_gpr_logits(features_for(k), glob, prompts, gamma), out.gpr_floor))
