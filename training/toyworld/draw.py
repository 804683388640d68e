"""Drawing primitives of the toy world: part polygons, stuff textures, region masks.

Everything here is pure NumPy/OpenCV and takes an explicit ``numpy.random.Generator`` so the
world stays deterministic from a seed. Shapes are rasterised *without* anti-aliasing
(``cv2.LINE_8``): the pixel label of a layer is then exactly the set of pixels its fill touched,
which is what ``tests/test_toyworld.py`` checks.

Conventions: images are H×W×3 ``uint8`` RGB (float32 while composing), masks are H×W ``bool``,
points are N×2 ``float`` arrays of (x, y) in pixels.
"""

from __future__ import annotations

import cv2
import numpy as np

# --------------------------------------------------------------------------------------------
# Part geometry. A part is a polygon in a *local* frame where the body is centred at the origin,
# has length 1 along +x (the creature faces +x) and +y points down (image convention).
# --------------------------------------------------------------------------------------------


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 24) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _rounded_box(w: float, h: float, r: float) -> np.ndarray:
    pts = []
    for (cx, cy, a0) in ((w / 2 - r, h / 2 - r, 0.0), (-w / 2 + r, h / 2 - r, 0.5 * np.pi),
                         (-w / 2 + r, -h / 2 + r, np.pi), (w / 2 - r, -h / 2 + r, 1.5 * np.pi)):
        t = np.linspace(a0, a0 + 0.5 * np.pi, 5)
        pts.append(np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1))
    return np.concatenate(pts)


# Each entry: list of polygons (local frame). Parts are shared between creatures, so none of them
# identifies a class on its own (see toyworld.CREATURES).
PART_POLYGONS: dict[str, list[np.ndarray]] = {
    "oval": [_ellipse(0.0, 0.0, 0.5, 0.28)],
    "box": [_rounded_box(1.0, 0.6, 0.04)],
    "round": [_ellipse(0.6, -0.32, 0.26, 0.26)],
    # A pointed head: a triangle pointing forward plus an ear.
    "pointy": [np.array([[0.3, -0.58], [1.0, -0.3], [0.3, 0.0]]),
               np.array([[0.32, -0.52], [0.42, -0.85], [0.58, -0.45]])],
    "tail": [np.array([[-0.4, 0.02], [-0.98, -0.5], [-0.86, -0.64], [-0.36, -0.2]])],
    "wings": [np.array([[-0.3, -0.15], [-0.02, -0.9], [0.18, -0.15]]),
              np.array([[-0.48, -0.1], [-0.42, -0.78], [-0.16, -0.15]])],
}
# Loose shapes that belong to no class; used as clutter together with loose creature parts.
CLUTTER_POLYGONS: dict[str, list[np.ndarray]] = {
    "ring": [_ellipse(0.0, 0.0, 0.3, 0.3, 16)],
    "bar": [np.array([[-0.5, -0.06], [0.5, -0.06], [0.5, 0.06], [-0.5, 0.06]])],
    "star": [np.array([[0.3 * np.cos(a) * (1 if i % 2 == 0 else 0.45),
                        0.3 * np.sin(a) * (1 if i % 2 == 0 else 0.45)]
                       for i, a in enumerate(np.linspace(0, 2 * np.pi, 10, endpoint=False))])],
}


def place(poly: np.ndarray, size: float, angle: float, flip: bool, cx: float, cy: float) -> np.ndarray:
    """Map a local-frame polygon (N×2) to image pixels: scale by ``size``, mirror, rotate, move."""
    p = poly * size
    if flip:
        p = p * np.array([-1.0, 1.0])
    c, s = np.cos(angle), np.sin(angle)
    p = p @ np.array([[c, s], [-s, c]])
    return p + np.array([cx, cy])


def fill_polygons(shape: tuple[int, int], polys: list[np.ndarray]) -> np.ndarray:
    """Rasterise polygons (pixel coordinates) into an H×W bool mask, no anti-aliasing."""
    m = np.zeros(shape, np.uint8)
    cv2.fillPoly(m, [np.round(p).astype(np.int32) for p in polys], 1, lineType=cv2.LINE_8)
    return m.astype(bool)


def outline(mask: np.ndarray) -> np.ndarray:
    """The 1-pixel inner border of a mask (H×W bool): pixels of ``mask`` with a neighbour outside."""
    eroded = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8), borderValue=1)
    return mask & ~eroded.astype(bool)


# --------------------------------------------------------------------------------------------
# Region masks for stuff.
# --------------------------------------------------------------------------------------------


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency random field (H×W float32 in about [0, 1]) from a cells×cells grid, bicubic."""
    g = rng.random((cells, cells)).astype(np.float32)
    return cv2.resize(g, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def band_mask(rng: np.random.Generator, shape: tuple[int, int], coverage: float) -> np.ndarray:
    """A horizontal band (ground or sky) with a wavy edge covering about ``coverage`` of the image."""
    h, w = shape
    x = np.arange(w)
    amp = rng.uniform(0.02, 0.08) * h
    edge = coverage * h + amp * np.sin(2 * np.pi * (x / rng.uniform(0.5, 1.5) / w + rng.random()))
    y = np.arange(h)[:, None]
    from_top = bool(rng.random() < 0.5)
    return (y < edge[None, :]) if from_top else (y >= h - edge[None, :])


def blob_mask(rng: np.random.Generator, shape: tuple[int, int], coverage: float) -> np.ndarray:
    """An irregular blob (thresholded smooth noise) covering about ``coverage`` of the image."""
    f = smooth_field(rng, shape, int(rng.integers(3, 6)))
    return f > np.quantile(f, 1.0 - coverage)


# --------------------------------------------------------------------------------------------
# Textures. Each returns an H×W×3 float32 RGB image in [0, 255] covering the whole canvas; the
# caller keeps the pixels of the region mask. ``base`` is the (jittered) RGB colour.
# --------------------------------------------------------------------------------------------


def _shade(base: np.ndarray, gain: np.ndarray) -> np.ndarray:
    return np.clip(gain[..., None] * base[None, None, :], 0, 255).astype(np.float32)


def texture(kind: str, rng: np.random.Generator, shape: tuple[int, int], base: np.ndarray) -> np.ndarray:
    """Stuff texture ``kind`` in {'stripes_v', 'waves', 'speckle', 'bricks', 'plain'} (H×W×3)."""
    h, w = shape
    period = rng.uniform(4.0, 8.0)
    if kind == "stripes_v":  # grass: short vertical blades of varying brightness
        blades = rng.random((int(np.ceil(h / 3)) + 1, w)).astype(np.float32)
        gain = 0.7 + 0.6 * np.repeat(blades, 3, axis=0)[:h]
    elif kind == "waves":  # water: wavy horizontal ripples
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        ph = rng.random() * 2 * np.pi
        gain = 0.85 + 0.3 * np.sin(2 * np.pi * (y + 1.5 * np.sin(2 * np.pi * x / (3 * period) + ph)) / period)
    elif kind == "speckle":  # sand: fine grain with dark specks
        gain = 0.9 + 0.2 * rng.random((h, w)).astype(np.float32)
        gain[rng.random((h, w)) < 0.08] = 0.6
    elif kind == "bricks":  # brick: courses of bricks separated by light mortar
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        bh = max(3.0, period)
        row = np.floor(y / bh)
        xs = x + (row % 2) * bh
        mortar = ((y % bh) < 1.0) | ((xs % (2.2 * bh)) < 1.0)
        gain = np.where(mortar, 1.6, 0.9 + 0.1 * rng.random((h, w))).astype(np.float32)
    elif kind == "plain":
        gain = 0.9 + 0.2 * smooth_field(rng, shape, 2)
    else:
        raise ValueError(f"unknown texture {kind!r}")
    return _shade(base, gain.astype(np.float32))


def jitter_colour(rng: np.random.Generator, rgb: tuple[int, int, int], amount: float) -> np.ndarray:
    """Per-instance colour jitter: each channel moved by up to ±``amount`` (float32 RGB)."""
    return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3), 0, 255).astype(np.float32)
