"""Training losses of MVP-SEG: OCLoss (Eq. 5), L_cls (Eq. 7), L_seg (Eq. 9) and their weighted sum (Eq. 10).

Reductions, stated because λ only means something together with them: L_seg is the mean over labelled
pixels, L_cls the mean over classes and images, and L_OC the mean of |cos| over the k(k−1)/2 prompt pairs.
So a weight means the same for any crop size, vocabulary size and prompt count k. Eq. 5 as printed *sums*
|cos| over pairs; the paper's λ3 = 100 on that sum is ``LossWeights.paper(k)`` (oc = 100·k(k−1)/2 on the
mean). The default here is λ = (1, 3, 1): under a mean-reduced L_seg (mmseg's cross-entropy is a pixel mean
too) a weight of 100 lets the subgradient of |cos|, which does not vanish at orthogonality, dominate every
step (docs/recipe.md measures what it costs on unseen classes).

L_cls comes in two forms. ``"paper"`` is Eq. 7 as printed, −Σ_c y_c log g_c: it only rewards present classes,
so it is minimised by pushing every g_c to 1 (τ2 → 0⁺), which turns GPR into a no-op. ``"bce"`` (this
module's default) adds the absent-class term −(1−y_c) log(1−g_c), the reading under which GPR can suppress
false positives as the paper describes. ``train_prompts``' default recipe uses ``"paper"``: on the toy worlds
the suppressing GPR did not help unseen classes (docs/history/recipe-addenda.md, ninth addendum).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .heads import MVPSegOutput

IGNORE_INDEX = 255


@dataclass(frozen=True)
class LossWeights:
    """λ1 (L_seg), λ2 (L_cls), λ3 (L_OC), on the reductions stated in the module docstring."""

    seg: float = 1.0
    cls: float = 3.0
    oc: float = 1.0

    @classmethod
    def paper(cls, n_seg: int) -> "LossWeights":
        """The paper's λ = (1, 3, 100), with λ3 = 100 on Eq. 5's *sum* over pairs rescaled to our mean."""
        return cls(1.0, 3.0, 100.0 * max(n_seg * (n_seg - 1) // 2, 1))


def oc_loss(seg_ctx: torch.Tensor) -> torch.Tensor:
    """Eq. 5, mean-reduced: k×n_ctx×W segmentation prompts → mean_{i<j} |cos(p'_i, p'_j)|, p' = mean over
    tokens; in [0, 1] whatever k (Eq. 5 sums the k(k−1)/2 pairs). 0 for k = 1."""
    avg = F.normalize(seg_ctx.float().mean(dim=1), dim=-1)
    cos = avg @ avg.t()
    k = avg.shape[0]
    iu = torch.triu_indices(k, k, offset=1, device=avg.device)
    if iu.shape[1] == 0:
        return cos.new_zeros(())
    return cos[iu[0], iu[1]].abs().mean()


def presence_targets(labels: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Labels B×H×W → y B×C with y_c = 1 iff class c occurs in the image (ignored and out-of-range pixels don't
    count)."""
    flat = labels.reshape(labels.shape[0], -1).long()
    valid = (flat != ignore_index) & (flat >= 0) & (flat < num_classes)
    # Pixels that are not a class go to a spare column C, dropped after: every write is a 1, so the order of
    # duplicate writes cannot matter (a scatter of valid.float() into column 0 let a later ignored pixel's 0
    # overwrite class 0's 1 — class 0 then read as absent in almost every background-ignored image).
    out = torch.zeros(flat.shape[0], num_classes + 1, device=labels.device)
    out.scatter_(1, torch.where(valid, flat, num_classes), 1.0)
    return out[:, :num_classes]


def cls_loss(gpr_logits: torch.Tensor, targets: torch.Tensor, mode: str = "bce") -> torch.Tensor:
    """L_cls from B×C GPR logits (g = sigmoid) and B×C presence targets; mean over classes and images."""
    if mode == "bce":
        return F.binary_cross_entropy_with_logits(gpr_logits.float(), targets.float())
    if mode == "paper":
        return -(targets.float() * F.logsigmoid(gpr_logits.float())).mean()
    raise ValueError(f"unknown cls loss mode '{mode}' (use 'bce' or 'paper')")


SEG_REDUCTIONS = ("pixel", "class")


def seg_loss(out: MVPSegOutput, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
             reduction: str = "pixel") -> torch.Tensor:
    """Eq. 9: pixel cross-entropy −log m_c* of the final masks (Eq. 8) at label size B×H×W (0 when no pixel is
    labelled). ``reduction="pixel"``: mean over labelled pixels (the paper's, mmseg's), so a class weighs
    by its pixel share; ``"class"``: mean over the classes present in the batch of each class's mean pixel
    loss, so every class weighs alike — the weighting mIoU uses."""
    log_m = out.log_final(tuple(labels.shape[-2:])).float()
    valid = labels != ignore_index
    if not bool(valid.any()):
        return log_m.sum() * 0.0
    if reduction == "pixel":
        return F.nll_loss(log_m, labels.long(), ignore_index=ignore_index)
    if reduction != "class":
        raise ValueError(f"unknown seg reduction {reduction!r}; choose one of {SEG_REDUCTIONS}")
    nll = F.nll_loss(log_m, labels.long(), ignore_index=ignore_index, reduction="none")[valid]
    cls = labels[valid].long()
    n_cls = log_m.shape[1]
    sums = torch.zeros(n_cls, device=nll.device).index_add_(0, cls, nll)
    counts = torch.bincount(cls, minlength=n_cls).to(nll.dtype)
    present = counts > 0
    return (sums[present] / counts[present]).mean()


def anchor_loss(seg_views: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """KgCoOp-style anchor (not in the paper): K×C×D unit view embeddings and C×D unit handcrafted embeddings →
    mean over classes of 1 − cos(normalised mean view, target). It keeps the *ensemble* of the views near
    the handcrafted embedding (what transfers to unseen names) while OCLoss lets the views differ."""
    mean_view = F.normalize(seg_views.float().mean(0), dim=-1)
    return (1.0 - (mean_view * targets.float()).sum(-1)).mean()


def compute_losses(out: MVPSegOutput, labels: torch.Tensor, seg_ctx: torch.Tensor | None,
                   weights: LossWeights = LossWeights(), cls_mode: str = "bce",
                   ignore_index: int = IGNORE_INDEX, seg_reduction: str = "pixel") -> dict[str, torch.Tensor]:
    """Eq. 10. Returns {'seg', 'cls', 'oc', 'total'}; terms that do not apply (no GPR, one prompt) are 0."""
    zero = out.fused_logits.new_zeros(())
    l_seg = seg_loss(out, labels, ignore_index, seg_reduction)
    l_cls = zero
    if out.gpr_logits is not None and weights.cls != 0:
        l_cls = cls_loss(out.gpr_logits, presence_targets(labels, out.fused_logits.shape[1], ignore_index), cls_mode)
    l_oc = oc_loss(seg_ctx) if seg_ctx is not None and seg_ctx.shape[0] > 1 and weights.oc != 0 else zero
    total = weights.seg * l_seg + weights.cls * l_cls + weights.oc * l_oc
    return {"seg": l_seg, "cls": l_cls, "oc": l_oc, "total": total}
