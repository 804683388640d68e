"""Dense inference settings: which dense-feature mode (``mvpseg.dense``) and whether to slide windows.

A ``DenseSettings`` is validated against one image tower (``resolve_dense``) so that a wrong mode or a window
that is not a multiple of the tower's stride fails when the CLIP is loaded or the setting is changed, with one
line that names the valid choices, instead of at the first image. It is hashable: the predictor keys its
cached image features on it.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.nn as nn

from .dense import (DENSE_MODES, SlidingWindow, check_dense_mode, default_dense_mode, dense_features,
                    sliding_dense_features, tower_stride)

__all__ = ["DENSE_MODES", "DenseSettings", "DenseSettingsError", "SlidingLike", "as_window", "compute_dense", "parse_sliding",
           "resolve_dense"]

class DenseSettingsError(ValueError):
    """A dense mode the tower does not have, or a sliding window that does not fit it (a user error: the
    training scripts print it as one line)."""


#: What callers may pass for a sliding window: None (whole image), (window, stride), "224/112" or a SlidingWindow.
SlidingLike = Union[None, SlidingWindow, tuple[int, int], list, str]


@dataclass(frozen=True)
class DenseSettings:
    """mode: one of ``DENSE_MODES`` valid for the tower; sliding: None = one forward over the whole image."""

    mode: str
    sliding: SlidingWindow | None = None

    def describe(self) -> str:
        """'sclip' or 'sclip, sliding 224/112' (what the demo and logs show)."""
        return self.mode if self.sliding is None else \
            f"{self.mode}, sliding {self.sliding.window}/{self.sliding.stride}"

    def sliding_record(self) -> list[int] | None:
        """JSON form of the sliding window ([window, stride] or None) for checkpoint metadata."""
        return None if self.sliding is None else [self.sliding.window, self.sliding.stride]


def parse_sliding(text: str) -> tuple[int, int] | None:
    """``--sliding`` values: 'WINDOW/STRIDE' (e.g. '224/112') → (224, 112); 'off'/'none' → None.

    Raises argparse.ArgumentTypeError (argparse prints it as a one-line usage error)."""
    t = str(text).strip().lower()
    if t in ("", "off", "none", "no"):
        return None
    m = re.fullmatch(r"(\d+)\s*[/x,:]\s*(\d+)", t)
    if not m:
        raise argparse.ArgumentTypeError(f"--sliding expects WINDOW/STRIDE in pixels (e.g. 224/112) or 'off', "
                                         f"got {text!r}")
    window, stride = int(m.group(1)), int(m.group(2))
    if not 1 <= stride <= window:
        raise argparse.ArgumentTypeError(f"--sliding needs 1 ≤ STRIDE ≤ WINDOW, got {window}/{stride}")
    return window, stride


def as_window(sliding: SlidingLike) -> SlidingWindow | None:
    """None, a SlidingWindow, (window, stride) or 'W/S' → SlidingWindow or None; ValueError otherwise."""
    if sliding is None or isinstance(sliding, SlidingWindow):
        return sliding
    if isinstance(sliding, str):
        try:
            pair = parse_sliding(sliding)
        except argparse.ArgumentTypeError as e:
            raise ValueError(str(e)) from None
        return None if pair is None else SlidingWindow(*pair)
    if isinstance(sliding, (tuple, list)) and len(sliding) == 2:
        return SlidingWindow(int(sliding[0]), int(sliding[1]))
    raise ValueError(f"sliding window must be None, (window, stride) or 'WINDOW/STRIDE', got {sliding!r}")


def resolve_dense(visual: nn.Module, mode: str | None = None, sliding: SlidingLike = None) -> DenseSettings:
    """Validates ``mode`` (None: the tower's default) and ``sliding`` for this tower. ValueError says what is
    valid: the modes of this tower, or window/stride multiples of its stride (32 for a ResNet, the patch size
    for a ViT: windows must cover whole feature cells so that their features land on the canvas exactly)."""
    try:
        mode = default_dense_mode(visual) if mode is None else check_dense_mode(visual, mode)
        window = as_window(sliding)
    except ValueError as e:
        raise DenseSettingsError(str(e)) from None
    if window is not None:
        s = tower_stride(visual)
        if window.window % s or window.stride % s:
            def near(v: int) -> int:
                return max(s, round(v / s) * s)
            raise DenseSettingsError(f"sliding window {window.window}/{window.stride} must be multiples of the "
                             f"{type(visual).__name__}'s stride {s} (e.g. --sliding "
                             f"{near(window.window)}/{min(near(window.stride), near(window.window))})")
    return DenseSettings(mode, window)


def compute_dense(visual: nn.Module, images: torch.Tensor, settings: DenseSettings) -> torch.Tensor:
    """Normalised images B×3×H×W → dense features B×D×h×w (unit norm per window; the sliding average of unit
    vectors is not re-normalised, so cosine heads get the mean of the per-window logits)."""
    if settings.sliding is None:
        return dense_features(visual, images, settings.mode)
    return sliding_dense_features(visual, images, settings.mode, settings.sliding.window, settings.sliding.stride)


def settings_record(settings: DenseSettings | None) -> dict[str, Any]:
    """{"dense_mode": …, "sliding": [w, s] | None} for run logs and metadata."""
    if settings is None:
        return {"dense_mode": None, "sliding": None}
    return {"dense_mode": settings.mode, "sliding": settings.sliding_record()}
