"""Charts: the GPR class scores (a table for ``gr.BarPlot``) and the t-SNE map of prompt text embeddings
(the paper's Fig. 4: colour = class, marker = prompt), computed with scikit-learn, drawn with matplotlib.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless; must precede any pyplot import anywhere in the process
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE  # ~1.5 s to import: paid at start-up rather than by the first request
from threadpoolctl import threadpool_limits

import mvpseg

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
# What a bar means (issue #28): the chart is read by visitors who have not read Eq. 6–8.
GPR_CHART_LABEL = ("GPR class scores g_c (Eq. 6): how present the global prompt finds each class in the whole "
                   "image. Each class's final mask is its fused mask × g_c, so a low bar (near 0) removes that "
                   "class's pixels; a bar near 1 keeps them")
MAX_LEGEND_CLASSES = 16


def gpr_frame(classes: Sequence[str], scores: np.ndarray | None) -> pd.DataFrame:
    """One row per class: its GPR score g_c (Eq. 6) in [0, 1]; empty without a global prompt."""
    if scores is None:
        return pd.DataFrame({"class": pd.Series(dtype=str), "GPR score": pd.Series(dtype=float)})
    return pd.DataFrame({"class": list(classes), "GPR score": [round(float(s), 4) for s in scores]})


@dataclass(frozen=True)
class EmbeddingGroup:
    """The text embeddings of one prompt (a marker): C×D unit vectors, one per class."""

    label: str
    vectors: np.ndarray


def embedding_groups(sets: Sequence[tuple[str, mvpseg.TextViews]]) -> list[EmbeddingGroup]:
    """(short set name, TextViews) → one group per segmentation view, plus the global prompt if any."""
    groups = []
    for set_name, text in sets:
        seg = text.seg.float().cpu().numpy()
        for k, view in enumerate(text.view_names):
            groups.append(EmbeddingGroup(f"{set_name}: {view}", seg[k]))
        if text.glob is not None:
            groups.append(EmbeddingGroup(f"{set_name}: global prompt", text.glob.float().cpu().numpy()))
    return groups


def tsne_points(groups: Sequence[EmbeddingGroup], seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates of all embeddings (rows: group-major, class-minor) and a description of the method.

    t-SNE needs perplexity < number of samples; small vocabularies get a proportionally small perplexity
    (≈ a third of the samples), and fewer than 5 points fall back to PCA, which is exact there.
    """
    x = np.concatenate([g.vectors for g in groups]).astype(np.float64)
    n = len(x)
    if n < 5:
        k = min(2, n)
        with threadpool_limits(1):
            pts = PCA(n_components=k).fit_transform(x) if n > 1 else np.zeros((n, 2))
        if pts.shape[1] < 2:
            pts = np.pad(pts, ((0, 0), (0, 2 - pts.shape[1])))
        return pts, f"PCA of {n} embeddings (too few for t-SNE)"
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
    # One thread: Barnes-Hut's OpenMP threads cost 10-50x more than they save on a busy small CPU (measured:
    # 64 points 3.2 s with all threads vs 0.19 s with one, while other processes were running).
    with threadpool_limits(1):
        pts = TSNE(n_components=2, perplexity=perplexity, metric="cosine", init="pca", random_state=seed,
                   learning_rate="auto", max_iter=500).fit_transform(x)
    return pts, f"t-SNE of {n} embeddings (cosine, perplexity {perplexity:.1f})"


def tsne_figure(groups: Sequence[EmbeddingGroup], classes: Sequence[str], colors: np.ndarray,
                seed: int = 0) -> Figure:
    """Scatter of the t-SNE map: colour = class (the page's palette), marker = prompt."""
    fig = Figure(figsize=(8.0, 5.2), dpi=100, layout="constrained")
    fig.suptitle("Prompt text embeddings: colour = class, marker = prompt", fontsize=12)
    ax = fig.add_subplot()
    if not groups:
        ax.text(0.5, 0.5, "no prompt embeddings", ha="center", va="center")
        ax.set_axis_off()
        return fig
    pts, method = tsne_points(groups, seed)
    c = len(classes)
    rgb = colors.astype(float) / 255.0
    for g, group in enumerate(groups):
        block = pts[g * c:(g + 1) * c]
        ax.scatter(block[:, 0], block[:, 1], c=rgb[:c], marker=MARKERS[g % len(MARKERS)], s=90,
                   edgecolors="black", linewidths=0.5, zorder=3)
    ax.set_xlabel(method, fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(alpha=0.3)
    shown = list(range(min(c, MAX_LEGEND_CLASSES)))
    class_handles = [Line2D([], [], marker="o", linestyle="", markersize=8, markerfacecolor=rgb[i],
                            markeredgecolor="black", label=classes[i]) for i in shown]
    if c > len(shown):
        class_handles.append(Line2D([], [], linestyle="", label=f"… {c - len(shown)} more"))
    prompt_handles = [Line2D([], [], marker=MARKERS[g % len(MARKERS)], linestyle="", markersize=8,
                             markerfacecolor="0.75", markeredgecolor="black", label=group.label)
                      for g, group in enumerate(groups)]
    # Figure-level "outside" legends: constrained layout makes room for both (an axes legend added with
    # add_artist would be ignored by the layout and cut off).
    fig.legend(handles=class_handles, title="class (colour)", loc="outside right center", fontsize=10,
               title_fontsize=11, frameon=False)
    fig.legend(handles=prompt_handles, title="prompt (marker)", loc="outside lower center",
               ncols=2 if len(prompt_handles) > 3 else 1, fontsize=10, title_fontsize=11, frameon=False)
    return fig


def figure_to_rgb(fig: Figure) -> np.ndarray:
    """Renders a figure (Agg) to an RGB uint8 array, so that the picture, not the figure, is cached."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:, :, :3].copy()
