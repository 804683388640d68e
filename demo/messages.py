"""The page's text: the summary under the result, the "Time per stage" table, and user-typed text shown as
literal characters."""
from __future__ import annotations

import pandas as pd

from . import render
from .service import SegmentRun

_MARKDOWN_SPECIALS = "\\`*_{}[]()<>#+-.!|~"


def plain(text: str) -> str:
    """``text`` as literal characters inside Markdown: user-typed class names must not become links, images
    or HTML (a name such as ``![x](http://host/y.png)`` made the browser fetch that URL)."""
    return "".join(f"&#{ord(ch)};" if ch in _MARKDOWN_SPECIALS else ch for ch in text)


def summary(run: SegmentRun, total: float) -> str:
    p = run.primary.prediction
    shares = render.class_shares(p.label_map, len(run.classes))
    found = sorted(((s, c) for c, s in zip(run.classes, shares) if s >= 0.005), reverse=True)
    (w, h), (wh, ww) = run.image.original_size, p.work_size
    lines = [f"**{plain(run.primary.label)}** — " + (", ".join(f"{plain(c)} {s:.0%}" for s, c in found)
                                                       or "nothing found"),
             f"Image {w}×{h} · CLIP input {ww}×{wh} · dense features: {run.dense} · {total:.2f} s"
             + (" (image features reused)" if run.image_cached else "")]
    return "\n\n".join(lines + [f"_{n}_" for n in run.notes])


def timings(run: SegmentRun, stages: dict[str, tuple[float, str]], total: float) -> pd.DataFrame:
    """The 'Time per stage' table: the service's stages, then the rendering stages, then the total."""
    rows = [("check + decode image", run.load_seconds, f"{run.image.rgb.shape[1]}×{run.image.rgb.shape[0]}")]
    rows.append(("image features (CLIP image tower)", run.image_seconds,
                 f"cached: same image and dense settings as before ({run.dense})" if run.image_cached else
                 "work size {1}×{0} · {2}".format(*run.primary.prediction.work_size, run.dense)))
    for r in run.results:
        rows.append((f"text embeddings · {r.label}", r.text_seconds,
                     "cached: every class seen before with these prompts" if r.text_cached else
                     f"{r.classes_encoded} of {len(run.classes)} classes encoded, the rest cached"
                     if r.classes_encoded < len(run.classes) else f"{len(run.classes)} classes"))
        rows.append((f"head + GPR · {r.label}", r.head_seconds, ""))
    rows.append(("label maps (full size)", run.label_seconds, ""))
    if run.student_map is not None:
        rows.append(("MVP-SEG+ student", run.student_seconds, ""))
    for name, (seconds, note) in stages.items():
        rows.append((name, seconds, note))
    rows.append(("total", total, ""))
    return pd.DataFrame([(a, round(b, 4), c) for a, b, c in rows], columns=["stage", "seconds", "note"])
