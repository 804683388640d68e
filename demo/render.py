"""Pictures of a prediction (numpy + PIL): the overlay with its legend, and the per-prompt view-mask grid.

Colours always come from one palette indexed by the vocabulary order, so a class has the same colour in
every panel (overlays of different prompt sets, the student, the grids, the GPR bars, the t-SNE plot).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

import mvpseg
from mvpseg import visualize

MIN_DISPLAY_SIDE = 512  # small images (toy world: 256 px) are enlarged for display, with crisp label edges
TEXT = (34, 34, 34)
MUTED = (150, 150, 150)
BG = (255, 255, 255)


@lru_cache(maxsize=8)
def font(size: int = 15) -> ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` px (FreeType build), else its tiny bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def _text_width(text: str, f: ImageFont.ImageFont) -> int:
    box = f.getbbox(text)
    return int(box[2] - box[0])


def _fit(text: str, width: int, f: ImageFont.ImageFont) -> str:
    """``text`` shortened with an ellipsis to fit ``width`` pixels."""
    if _text_width(text, f) <= width:
        return text
    while text and _text_width(text + "…", f) > width:
        text = text[:-1]
    return text + "…"


def class_shares(label_map: np.ndarray, n_classes: int) -> np.ndarray:
    """Fraction of pixels of each class (C floats summing to 1)."""
    counts = np.bincount(label_map.ravel().astype(np.int64), minlength=n_classes)[:n_classes]
    return counts / max(1, label_map.size)


def display_scale(height: int, width: int, min_side: int = MIN_DISPLAY_SIDE) -> int:
    """Integer nearest-neighbour enlargement for images whose long side is below ``min_side``."""
    return max(1, -(-min_side // max(height, width)))


def legend_strip(classes: Sequence[str], colors: np.ndarray, shares: np.ndarray | None, width: int,
                 size: int = 15) -> np.ndarray:
    """A white strip listing every class: colour swatch, name and pixel share; classes absent from the
    prediction are greyed. Entries flow left to right and wrap at ``width``."""
    f = font(size)
    pad, swatch, line = 8, size, size + 9
    entries = []
    for i, name in enumerate(classes):
        share = None if shares is None else float(shares[i])
        label = name if share is None else f"{name} {share:.0%}"  # (ASCII only: the bundled font lacks dashes)
        label = _fit(label, width - 3 * pad - swatch, f)
        entries.append((i, label, share is not None and share < 0.005, swatch + 6 + _text_width(label, f)))
    rows, x = [[]], pad
    for e in entries:  # greedy line breaking
        if x + e[3] > width - pad and rows[-1]:
            rows.append([])
            x = pad
        rows[-1].append((x, e))
        x += e[3] + 2 * pad
    canvas = Image.new("RGB", (width, pad + line * len(rows)), BG)
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        y = pad // 2 + r * line + 3
        for x, (i, label, absent, _) in row:
            color = tuple(int(v) for v in colors[i])
            draw.rectangle([x, y, x + swatch - 1, y + swatch - 1], fill=color, outline=(90, 90, 90))
            draw.text((x + swatch + 6, y - 1), label, fill=MUTED if absent else TEXT, font=f)
    return np.asarray(canvas)


def segmentation_panel(image: np.ndarray, label_map: np.ndarray, classes: Sequence[str], colors: np.ndarray,
                       min_side: int = MIN_DISPLAY_SIDE) -> np.ndarray:
    """The overlay of ``label_map`` on ``image`` (mvpseg.visualize.overlay) with the legend strip below it.

    Small images are enlarged by an integer factor with nearest-neighbour sampling, so every label pixel
    stays one solid block of its class colour.
    """
    over = visualize.overlay(image, label_map, colors)
    k = display_scale(*over.shape[:2], min_side=min_side)
    if k > 1:
        over = np.repeat(np.repeat(over, k, axis=0), k, axis=1)
    legend = legend_strip(classes, colors, class_shares(label_map, len(classes)), over.shape[1])
    return np.concatenate([over, legend], axis=0)


def _resize(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a low-resolution float mask to (W, H)."""
    return cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)


def view_grid(image: np.ndarray, prediction: mvpseg.Prediction, colors: np.ndarray, max_rows: int = 5,
              tile: int = 160) -> tuple[np.ndarray, list[str]]:
    """What each prompt attends to, per class (the paper's Fig. 1): rows = classes, columns = the K views,
    the fused mask m^f (Eq. 4) and, with GPR, the global prompt's mask m^0.

    Each view tile is the cosine mask of that view and class as a heat map over the image; the K views of
    one class share one colour scale (so a weaker view looks weaker), the fused column is a probability
    in [0, 1]. Rows are the classes with the largest predicted area, at most ``max_rows``.
    Returns (RGB grid, class names shown).
    """
    out = prediction.output
    views = out.view_masks[0].float().cpu().numpy()  # K×C×h×w, at feature resolution: cheap to resize per tile
    fused = out.fused[0].float().cpu().numpy()
    glob = None if out.global_mask is None else out.global_mask[0].float().cpu().numpy()
    scores = prediction.gpr_scores
    classes = prediction.classes
    shares = class_shares(prediction.label_map, len(classes))
    order = sorted(range(len(classes)), key=lambda c: (-shares[c], c))[:max_rows]

    h, w = image.shape[:2]
    scale = tile / max(h, w)
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    small = cv2.resize(image, (tw, th), interpolation=cv2.INTER_AREA)
    columns = list(prediction.view_names) + ["fused (Eq. 4)"] + ([] if glob is None else ["global prompt"])
    f, fs = font(16), font(14)  # large enough to stay legible when the gallery shows the grid scaled down
    gap, head_h, label_w = 4, 28, 150
    width = label_w + len(columns) * (tw + gap)
    canvas = Image.new("RGB", (width, head_h + len(order) * (th + gap)), BG)
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(columns):
        x = label_w + j * (tw + gap)
        draw.text((x + 2, 5), _fit(name, tw - 4, f), fill=TEXT, font=f)
    for r, c in enumerate(order):
        y = head_h + r * (th + gap)
        color = tuple(int(v) for v in colors[c])
        draw.rectangle([4, y + 4, 20, y + 20], fill=color, outline=(90, 90, 90))
        draw.text((26, y + 3), _fit(classes[c], label_w - 30, f), fill=TEXT, font=f)
        draw.text((26, y + 25), f"area {shares[c]:.0%}", fill=MUTED, font=fs)
        if scores is not None:
            draw.text((26, y + 44), f"GPR {scores[c]:.2f}", fill=MUTED, font=fs)
        row = [_resize(views[k, c], (tw, th)) for k in range(views.shape[0])]
        lo, hi = min(float(m.min()) for m in row), max(float(m.max()) for m in row)
        tiles = [visualize.heatmap(m, small, vmin=lo, vmax=hi) for m in row]
        tiles.append(visualize.heatmap(_resize(fused[c], (tw, th)), small, vmin=0.0, vmax=1.0))
        if glob is not None:
            tiles.append(visualize.heatmap(_resize(glob[c], (tw, th)), small))
        for j, t in enumerate(tiles):
            canvas.paste(Image.fromarray(t), (label_w + j * (tw + gap), y))
    return np.asarray(canvas), [classes[c] for c in order]


def titled(image: np.ndarray, title: str, size: int = 17) -> np.ndarray:
    """``image`` with a white title strip above it (the title shortened to the image's width)."""
    f = font(size)
    strip = Image.new("RGB", (image.shape[1], size + 14), BG)
    ImageDraw.Draw(strip).text((4, 6), _fit(title, image.shape[1] - 8, f), fill=TEXT, font=f)
    return np.concatenate([np.asarray(strip), image], axis=0)


def _pad(image: np.ndarray, height: int, width: int) -> np.ndarray:
    out = np.full((height, width, 3), BG, np.uint8)
    out[: image.shape[0], : image.shape[1]] = image
    return out


def side_by_side(panels: Sequence[tuple[np.ndarray, str]], per_row: int = 3, gap: int = 12) -> np.ndarray:
    """Titled panels in rows of ``per_row``, top-aligned on white (one picture: the page shows it whole)."""
    items = [titled(p, t) for p, t in panels]
    rows = []
    for i in range(0, len(items), per_row):
        row = items[i:i + per_row]
        h = max(r.shape[0] for r in row)
        parts = []
        for j, r in enumerate(row):
            parts.append(_pad(r, h, r.shape[1]))
            if j < len(row) - 1:
                parts.append(np.full((h, gap, 3), BG, np.uint8))
        rows.append(np.concatenate(parts, axis=1))
    width = max(r.shape[1] for r in rows)
    out = []
    for i, r in enumerate(rows):
        out.append(_pad(r, r.shape[0], width))
        if i < len(rows) - 1:
            out.append(np.full((gap, width, 3), BG, np.uint8))
    return np.concatenate(out, axis=0)


def stacked(panels: Sequence[tuple[np.ndarray, str]], gap: int = 16) -> np.ndarray:
    """Titled panels one below the other, left-aligned on white."""
    return side_by_side(panels, per_row=1, gap=gap)
