"""Sliding-window dense features: windows on the tower's cell grid, averaged on the feature canvas.

Whole-image inference is ``dense_features(visual, images, mode)``: one forward at the image's own size (a ViT
interpolates its positional embedding). Sliding-window inference, as SCLIP, ClearCLIP and NACLIP evaluate
(window 224, stride 112 for ViT-B/16 — the pretraining resolution, so no interpolation at all):

* The tower's stride s (patch size p for a ViT, 32 for a ModifiedResNet) defines a grid of cells; the output
  canvas has ⌊H/s⌋×⌊W/s⌋ cells, like a whole-image ViT forward (a remainder of < s pixels at the bottom/right
  is not seen, as in a ViT's patch embedding). ``window`` and ``stride`` must be multiples of s (ValueError
  otherwise), so every window covers whole cells and its features land exactly on canvas cells.
* Window origins are 0, stride, 2·stride, … with the last one clamped to the border (mmseg's
  ``slide_inference``, which SCLIP/ClearCLIP/NACLIP copy): ceil((n - window)/stride) + 1 windows per axis.
* An image smaller than the window along an axis is processed whole along that axis (no padding, the
  official behaviour: "the small patch will be used to decode without padding").
* Each window's unit-norm features are summed into the canvas and divided by the number of windows covering
  each cell, without re-normalisation: any head linear in the features (cosine masks against text embeddings)
  gets exactly the average of the per-window logits.

Difference from the official code: they average per-window *logits bilinearly upsampled to pixels*; here the
average is taken on the feature grid (before text, so ``Predictor.set_image`` can cache features for any
vocabulary). At cells the two coincide; they differ only in how each window's border cells are upsampled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .modes import check_dense_mode, default_dense_mode, dense_features
from .resnet import RESNET_STRIDE, is_modified_resnet
from .vit import is_vision_transformer, vit_patch_size

#: Windows (× batch) per tower forward: bounds memory on big images while amortising per-call overhead.
_IMAGES_PER_FORWARD = 8


@dataclass(frozen=True)
class SlidingWindow:
    """Window side and stride in pixels (square windows, same stride along both axes)."""

    window: int = 224
    stride: int = 112

    def __post_init__(self) -> None:
        if not (isinstance(self.window, int) and isinstance(self.stride, int)) or self.window < 1 \
                or not 1 <= self.stride <= self.window:
            raise ValueError(f"sliding window needs integers 1 ≤ stride ≤ window, got window={self.window!r}, "
                             f"stride={self.stride!r}")


def tower_stride(visual: nn.Module) -> int:
    """Pixels per feature cell: the patch size for a ViT, 32 for a ModifiedResNet."""
    if is_modified_resnet(visual):
        return RESNET_STRIDE
    if is_vision_transformer(visual):
        return vit_patch_size(visual)
    default_dense_mode(visual)  # raises the usual NotImplementedError
    raise AssertionError("unreachable")


def window_starts(cells: int, window_cells: int, stride_cells: int) -> list[int]:
    """Window origins (in cells) along one axis of ``cells``: every ``stride_cells``, the last one clamped so the
    window ends at the border; ``[0]`` when the axis is no longer than the window."""
    if cells <= window_cells:
        return [0]
    n = math.ceil((cells - window_cells) / stride_cells) + 1
    return [min(i * stride_cells, cells - window_cells) for i in range(n)]


def sliding_dense_features(visual: nn.Module, images: torch.Tensor, mode: str | None = None,
                           window: int = 224, stride: int = 112) -> torch.Tensor:
    """Normalised images B×3×H×W → dense features B×D×⌊H/s⌋×⌊W/s⌋ averaged over sliding windows, float32.

    Each window's features have unit norm; the average does not (it is the mean of unit vectors).
    """
    mode = default_dense_mode(visual) if mode is None else check_dense_mode(visual, mode)
    SlidingWindow(window, stride)  # validates
    s = tower_stride(visual)
    if window % s or stride % s:
        tower = type(visual).__name__
        raise ValueError(f"window {window} and stride {stride} must be multiples of the {tower}'s stride {s} "
                         f"(e.g. window {max(s, round(window / s) * s)}, stride {max(s, round(stride / s) * s)})")
    b, _, height, width = images.shape
    gh, gw = height // s, width // s
    if gh == 0 or gw == 0:
        raise ValueError(f"image {height}×{width} is smaller than one {s}-pixel feature cell")
    wh, ww = min(window // s, gh), min(window // s, gw)  # window size in cells (whole axis if smaller)
    origins = [(y, x) for y in window_starts(gh, wh, stride // s) for x in window_starts(gw, ww, stride // s)]
    canvas: torch.Tensor | None = None
    count = torch.zeros(1, 1, gh, gw, device=images.device)
    per_forward = max(1, _IMAGES_PER_FORWARD // b)
    for i in range(0, len(origins), per_forward):
        chunk = origins[i:i + per_forward]
        crops = torch.cat([images[:, :, y * s:(y + wh) * s, x * s:(x + ww) * s] for y, x in chunk])
        feats = dense_features(visual, crops, mode)  # (len(chunk)·B)×D×wh×ww
        if feats.shape[-2:] != (wh, ww):
            raise RuntimeError(f"tower returned a {tuple(feats.shape[-2:])} grid for a {wh}×{ww}-cell window")
        if canvas is None:
            canvas = feats.new_zeros(b, feats.shape[1], gh, gw)
        for j, (y, x) in enumerate(chunk):
            canvas[:, :, y:y + wh, x:x + ww] += feats[j * b:(j + 1) * b]
            count[:, :, y:y + wh, x:x + ww] += 1
    return canvas / count
