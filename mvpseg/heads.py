"""From dense features and text views to masks: per-view masks, Eq. 4 fusion, Eq. 6 GPR, Eq. 8 final masks."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from .gpr_floor import GPRFloor
from .prompts import PromptSet, TextViews


@dataclass(frozen=True)
class MVPSegOutput:
    """Everything the head computes at feature resolution h×w.

    view_masks: B×K×C×h×w cosine masks m^i_c (i = 1..K).
    fused_logits: B×C×h×w τ1·Σ_i m^i (Eq. 4 before the softmax over classes).
    global_mask: B×C×h×w m^0_c, or None without a global prompt.
    gpr_logits: B×C (m^0_c · softmax_spatial(γ m^0_c)) / τ2 − β, or None; the GPR score is its sigmoid
        (β = 0 unless the prompt set learned a bias: calibrated GPR); at least ``gpr_floor`` where there is one.
    gpr_floor: B×C lower bound on ``gpr_logits`` from a fitted set's floor (mvpseg.gpr_floor), or None; kept so
        that a later reading of g (the shifted average, mvpseg.gpr_shifts) is bounded alike.
    """

    view_masks: torch.Tensor
    fused_logits: torch.Tensor
    global_mask: torch.Tensor | None
    gpr_logits: torch.Tensor | None
    gpr_floor: torch.Tensor | None = None

    @property
    def fused(self) -> torch.Tensor:
        """m^f, B×C×h×w: softmax over classes (Eq. 4)."""
        return self.fused_logits.softmax(dim=1)

    @property
    def gpr_scores(self) -> torch.Tensor | None:
        """g_c, B×C (Eq. 6)."""
        return None if self.gpr_logits is None else self.gpr_logits.sigmoid()

    @property
    def final(self) -> torch.Tensor:
        """m_c = m^f_c · g_c, B×C×h×w (Eq. 8); equals m^f without GPR."""
        g = self.gpr_scores
        return self.fused if g is None else self.fused * g[:, :, None, None]

    def log_final(self, size: tuple[int, int] | None = None) -> torch.Tensor:
        """log m_c at ``size`` (bilinear on the logits), computed stably: log_softmax + logsigmoid. B×C×H×W."""
        logits = self.fused_logits
        if size is not None and tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        out = logits.log_softmax(dim=1)
        if self.gpr_logits is not None:
            out = out + F.logsigmoid(self.gpr_logits)[:, :, None, None]
        return out


def view_masks(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cosine masks: features B×D×h×w (unit norm) and text K×C×D (unit norm) → B×K×C×h×w."""
    return torch.einsum("bdhw,kcd->bkchw", features, text.to(features.dtype))


def gpr_logits(global_mask: torch.Tensor, gamma: float, tau2: torch.Tensor | float,
               bias: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Eq. 6 before the sigmoid: global mask B×C×h×w → B×C, spatial softmax-weighted mean over τ2, minus the
    logit offset ``bias`` (0: the paper's Eq. 6)."""
    flat = global_mask.flatten(2)
    weights = (gamma * flat).softmax(dim=-1)
    return (flat * weights).sum(-1) / tau2 - bias


def global_branch(features: torch.Tensor, glob: torch.Tensor, gamma: float, tau2: torch.Tensor | float,
                  bias: torch.Tensor | float = 0.0,
                  adapter: Callable[[torch.Tensor], torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """GPR's reading of dense features B×D×h×w with global embeddings glob C×D: (m^0 B×C×h×w on the features
    through ``adapter`` if any, Eq. 6 logits B×C). What ``segment``, the shifted reading (mvpseg.gpr_shifts) and
    the GPR fit (mvpseg.learning.gpr_fit) all compute."""
    gpr_features = features if adapter is None else adapter(features)
    global_mask = view_masks(gpr_features, glob.unsqueeze(0))[:, 0]
    return global_mask, gpr_logits(global_mask, gamma, tau2, bias)


def floor_logits(own_mask: torch.Tensor, gamma: float, floor: GPRFloor) -> torch.Tensor:
    """The lower bound a fitted set's floor puts under its GPR logits (mvpseg.gpr_floor): Eq. 6 on ``own_mask``,
    m^0 on the features as they are (no adapter), with the floor's own τ2 and β, minus its margin.
    own_mask B×C×h×w → B×C."""
    return gpr_logits(own_mask, gamma, floor.tau2, floor.bias) - floor.margin


def floored(logits: torch.Tensor, bound: torch.Tensor | None) -> torch.Tensor:
    """GPR logits B×C held at or above a floor's ``bound`` B×C (``floor_logits``); None: unchanged."""
    return logits if bound is None else torch.maximum(logits, bound.to(logits.dtype))


def segment(features: torch.Tensor, text: TextViews, tau1: torch.Tensor | float, tau2: torch.Tensor | float | None,
            gamma: float = 10.0, gpr_bias: torch.Tensor | float = 0.0,
            gpr_adapter: Callable[[torch.Tensor], torch.Tensor] | None = None) -> MVPSegOutput:
    """Applies the MVP-SEG head. features B×D×h×w; text.seg K×C×D; text.glob C×D or None; ``gpr_bias``: the
    prompt set's ``gpr_bias()``; ``gpr_adapter``: its ``gpr_adapter()`` (mvpseg.gpr_adapter), the map through which
    GPR alone reads the features (None: the features themselves, Eq. 6; ``global_mask`` is then m^0 on them)."""
    masks = view_masks(features, text.seg)
    fused_logits = tau1 * masks.sum(dim=1)
    if text.glob is None or tau2 is None:
        return MVPSegOutput(masks, fused_logits, None, None)
    global_mask, logits = global_branch(features, text.glob, gamma, tau2, gpr_bias, gpr_adapter)
    return MVPSegOutput(masks, fused_logits, global_mask, logits)


def apply_prompts(features: torch.Tensor, text: TextViews, prompts: PromptSet, gamma: float = 10.0,
                  gpr: bool = True) -> MVPSegOutput:
    """``segment`` with everything the prompt set ``prompts`` carries besides its text (τ1, τ2, the GPR bias and
    adapter, and the floor of a fitted set: mvpseg.gpr_floor): what the model, the predictor, evaluation and
    selection all call. ``gpr=False``: without Eq. 6–8 (the segmentation views alone, as a set without a global
    prompt)."""
    tau2 = prompts.tau2() if gpr else None
    out = segment(features, text, prompts.tau1(), tau2, gamma, prompts.gpr_bias(), prompts.gpr_adapter())
    floor = prompts.gpr_floor()
    if floor is None or out.gpr_logits is None:
        return out
    # m^0 on the plain features: the head's own global mask unless an adapter read them (then one more einsum)
    own_mask = out.global_mask if prompts.gpr_adapter() is None else view_masks(features, text.glob.unsqueeze(0))[:, 0]
    bound = floor_logits(own_mask, gamma, floor)
    return replace(out, gpr_logits=floored(out.gpr_logits, bound), gpr_floor=bound)
