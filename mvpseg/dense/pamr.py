"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, "Single-Stage Semantic Segmentation from Image
Labels", CVPR 2020), as MaskCLIP+, SCLIP and NACLIP apply it to their logits.

Each pixel's mask becomes, ``iterations`` times over, a weighted average of its 8 neighbours at every dilation
d (offsets {-d, 0, d}² minus the centre, image borders replicated). The weights are fixed by the image:

    a_ij = -|I_i - I_j| / (1e-8 + 0.1·σ_i)     per colour channel, σ_i = the (unbiased) standard deviation of
                                                the 9·len(dilations) values of pixel i's neighbourhoods
    w_ij = softmax_j( mean over channels a_ij ) over all 8·len(dilations) neighbours j

so masks spread along similar colours and stop at image edges. This is the official implementation
(visinf/1-stage-wseg ``models/mods/pamr.py``, copied as ``pamr.py`` into SCLIP and NACLIP) computed with
shifted views instead of one-hot convolution kernels, and with each iteration accumulated neighbour by neighbour
so memory is O(B·C·H·W + B·8·len(dilations)·H·W) rather than O(B·C·8·len(dilations)·H·W).

Defaults: 10 iterations (NACLIP's ``pamr_steps=10``, SCLIP/NACLIP ``--pamr on``), dilations (1, 2, 4, 8, 12, 24)
(1-stage-wseg; SCLIP/NACLIP use them for their visualisations, their segmentors' default is (8, 16)).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

_OFFSETS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def _neighbours(x: torch.Tensor, dilations: Sequence[int], centre: bool) -> list[torch.Tensor]:
    """x B×K×H×W → the shifted copies x[i + d·offset] (replicate border), each B×K×H×W; with ``centre`` the
    unshifted x is included once per dilation (as the official 3×3 standard-deviation kernel does)."""
    h, w = x.shape[-2:]
    out = []
    for d in dilations:
        padded = F.pad(x, [d] * 4, mode="replicate")
        for dy, dx in ([(0, 0)] if centre else []) + _OFFSETS:
            out.append(padded[..., d + dy * d: d + dy * d + h, d + dx * d: d + dx * d + w])
    return out


def pamr_affinity(image: torch.Tensor, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24)) -> torch.Tensor:
    """Image B×3×H×W → neighbour weights B×P×H×W (P = 8·len(dilations), softmax over P)."""
    x = image.float()
    std = torch.stack(_neighbours(x, dilations, centre=True), 2).std(2)  # B×K×H×W
    diffs = torch.stack([(x - nb).abs() for nb in _neighbours(x, dilations, centre=False)], 2)  # B×K×P×H×W
    logits = (-diffs / (1e-8 + 0.1 * std[:, :, None])).mean(1)
    return logits.softmax(1)


def pamr(image: torch.Tensor, masks: torch.Tensor, iterations: int = 10,
         dilations: Sequence[int] = (1, 2, 4, 8, 12, 24)) -> torch.Tensor:
    """Refines masks B×C×h×w with the image B×3×H×W; returns B×C×H×W float32.

    Masks of another size are first resized bilinearly with ``align_corners=True`` (as the official code).
    ``image`` may be the normalised network input: the weights only use colour differences relative to the local
    standard deviation, so any per-channel affine normalisation gives the same result up to float rounding.
    """
    if image.dim() != 4 or masks.dim() != 4 or image.shape[0] != masks.shape[0]:
        raise ValueError(f"pamr expects image B×3×H×W and masks B×C×h×w, got {tuple(image.shape)} and "
                         f"{tuple(masks.shape)}")
    if iterations < 0 or not dilations or any(int(d) < 1 for d in dilations):
        raise ValueError(f"pamr needs iterations ≥ 0 and dilations ≥ 1, got {iterations} and {tuple(dilations)}")
    masks = F.interpolate(masks.float(), size=image.shape[-2:], mode="bilinear", align_corners=True)
    weights = pamr_affinity(image, dilations)  # B×P×H×W
    for _ in range(iterations):
        new = torch.zeros_like(masks)
        for j, nb in enumerate(_neighbours(masks, dilations, centre=False)):
            new.addcmul_(nb, weights[:, j:j + 1])
        masks = new
    return masks
