"""Colours and overlays shared by the CLI and the demo (numpy + OpenCV only)."""
from __future__ import annotations

import colorsys
from typing import Sequence

import cv2
import numpy as np


def palette(n: int) -> np.ndarray:
    """n distinct, stable RGB colours (uint8 n×3): golden-ratio hues, alternating lightness."""
    cols = []
    for i in range(n):
        h = (i * 0.618033988749895) % 1.0
        l, s = (0.5, 0.75) if i % 2 == 0 else (0.38, 0.65)
        cols.append([round(255 * c) for c in colorsys.hls_to_rgb(h, l, s)])
    return np.array(cols, dtype=np.uint8).reshape(n, 3)


def overlay(image: np.ndarray, label_map: np.ndarray, colors: np.ndarray, alpha: float = 0.55,
            contours: bool = True) -> np.ndarray:
    """RGB H×W×3 uint8 + label map H×W (index into ``colors``, negative = none) → blended RGB with outlines."""
    valid = label_map >= 0
    color_img = colors[np.clip(label_map, 0, len(colors) - 1)]
    out = image.astype(np.float32)
    out[valid] = (1 - alpha) * out[valid] + alpha * color_img[valid]
    out = out.round().astype(np.uint8)
    if contours:
        edges = np.zeros(label_map.shape, dtype=bool)  # pixels whose right or lower neighbour differs
        edges[:, :-1] |= label_map[:, :-1] != label_map[:, 1:]
        edges[:-1, :] |= label_map[:-1, :] != label_map[1:, :]
        out[edges] = 255
    return out


def heatmap(mask: np.ndarray, image: np.ndarray | None = None, alpha: float = 0.5,
            vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """A float mask H×W → RGB uint8 heat map, optionally blended over ``image``.

    The mask is min–max scaled, or mapped from [vmin, vmax] (clipped) when given, so that several masks can
    share one colour scale (e.g. the K prompt views of one class).
    """
    m = mask.astype(np.float32)
    lo = float(m.min()) if vmin is None else float(vmin)
    hi = float(m.max()) if vmax is None else float(vmax)
    m = np.clip((m - lo) / (hi - lo), 0.0, 1.0) if hi - lo > 1e-12 else np.zeros_like(m)
    heat = cv2.applyColorMap((m * 255).astype(np.uint8), cv2.COLORMAP_JET)[:, :, ::-1]
    if image is None:
        return np.ascontiguousarray(heat)
    return ((1 - alpha) * image.astype(np.float32) + alpha * heat).round().astype(np.uint8)


def legend_entries(classes: Sequence[str], colors: np.ndarray) -> list[tuple[str, str]]:
    """[(name, '#rrggbb'), …] for a legend or a colour map."""
    return [(c, "#%02x%02x%02x" % tuple(int(v) for v in colors[i])) for i, c in enumerate(classes)]
