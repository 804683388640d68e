"""Segmenting many images with one predictor: ``python -m mvpseg segment FOLDER|GLOB|FILE … --out DIR``.

Inputs are files, folders (the images directly inside, sorted) and glob patterns (``"shots/**/*.jpg"``,
recursive).  Each image gets ``<stem>_overlay.png``, ``<stem>_labels.png`` (class indices) and ``<stem>.json``
(legend, GPR scores, pixel shares) in the output folder; a repeated stem gets ``-2``, ``-3``, ….  The
vocabulary's text features are computed once (the predictors cache them per vocabulary), so every image
after the first costs only the image tower and the head.  A file that cannot be read is reported and
skipped; the run goes on.  ``summary.json`` (optional) holds, per class, its share of all segmented pixels
and the number of images it appears in, plus the failures.
"""
from __future__ import annotations

import glob
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
from PIL import Image

from .image_io import ImageError, read_image
from .predictor import Prediction
from .visualize import legend_entries, overlay, palette

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class SegmentingPredictor(Protocol):
    """What both ``Predictor`` and ``StudentPredictor`` offer."""

    def set_image(self, image) -> None: ...

    def predict(self, vocabulary, prompts: str | None = None) -> Prediction: ...


def collect_inputs(sources: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Files, folders and glob patterns → (image paths, in the order given, without repeats; problems).

    A folder contributes its files with an image extension; an explicit file or a glob match is taken as
    is (a non-image is reported when it fails to load).  A source that names nothing is a problem."""
    paths: list[Path] = []
    problems: list[str] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            paths.append(p)

    for src in sources:
        p = Path(src)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                problems.append(f"{p}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
            for q in found:
                add(q)
        elif p.is_file():
            add(p)
        elif glob.has_magic(src):
            found = sorted(Path(m) for m in glob.glob(src, recursive=True) if Path(m).is_file())
            if not found:
                problems.append(f"{src}: the pattern matches no file")
            for q in found:
                add(q)
        else:
            problems.append(f"{src}: no such file or folder")
    return paths, problems


def label_map_array(result: Prediction) -> np.ndarray:
    """The label map as stored in a PNG: H×W class indices, uint8 below 256 classes, else uint16."""
    return result.label_map.astype(np.uint8 if len(result.classes) < 256 else np.uint16)


def prediction_record(result: Prediction, prompt_set: str, label_map_name: str | None = None) -> dict:
    """What a result says in JSON: classes and their colours, GPR scores, pixel shares, size and settings (the
    legend the CLI writes beside each label map, and the demo's download)."""
    label_map = result.label_map
    colors = palette(len(result.classes))
    counts = np.bincount(label_map.ravel(), minlength=len(result.classes))
    return {"classes": list(result.classes), "colors": dict(legend_entries(result.classes, colors)),
            "prompt_set": prompt_set, "label_map": label_map_name,
            "dense": None if result.dense is None else result.dense.describe(),
            "pamr": result.pamr_image is not None,
            "size": [int(label_map.shape[0]), int(label_map.shape[1])],
            "gpr_scores": None if result.gpr_scores is None else
            {c: round(float(s), 4) for c, s in zip(result.classes, result.gpr_scores)},
            "pixel_share": {c: round(float(counts[i]) / label_map.size, 4) for i, c in enumerate(result.classes)}}


def write_prediction(image: np.ndarray, result: Prediction, overlay_path: Path, labels_path: Path,
                     legend_path: Path, prompt_set: str) -> dict:
    """Writes the overlay (RGB H×W×3), the label map (H×W class indices, uint8 or uint16) and the legend JSON;
    returns the legend."""
    for p in (overlay_path, labels_path, legend_path):
        p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay(image, result.label_map, palette(len(result.classes)))).save(overlay_path)
    Image.fromarray(label_map_array(result)).save(labels_path)
    legend = prediction_record(result, prompt_set, labels_path.name)
    legend_path.write_text(json.dumps(legend, indent=2))
    return legend


@dataclass
class BatchReport:
    """What a batch run did: written stems, failures (path, message) and per-class pixel totals."""

    classes: tuple[str, ...]
    written: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    pixels: np.ndarray | None = None  # C: segmented pixels per class over all images
    images_with: np.ndarray | None = None  # C: images in which each class has at least one pixel

    def summary(self) -> dict:
        """Pixel shares per class over every segmented pixel, image counts, failures."""
        total = int(self.pixels.sum()) if self.pixels is not None else 0
        per_class = {c: {"pixel_share": round(float(self.pixels[i]) / total, 6) if total else 0.0,
                         "pixels": int(self.pixels[i]) if total else 0,
                         "images": int(self.images_with[i]) if total else 0}
                     for i, c in enumerate(self.classes)}
        return {"images": len(self.written), "failed": [{"path": p, "error": e} for p, e in self.failed],
                "total_pixels": total, "classes": per_class}


def _unique_stem(stem: str, used: set[str]) -> str:
    out, k = stem, 1
    while out in used:
        k += 1
        out = f"{stem}-{k}"
    used.add(out)
    return out


def segment_many(predictor: SegmentingPredictor, paths: Sequence[Path], vocabulary: Sequence[str],
                 prompt_set: str | None, out_dir: Path, progress: bool = True) -> BatchReport:
    """Segments every image of ``paths`` into ``vocabulary`` and writes its outputs to ``out_dir``.

    An image that fails to load (missing, corrupt, not an image, too large) is recorded in
    ``report.failed`` with its message and skipped; nothing else is caught."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    inputs = {p.resolve() for p in paths}
    report = BatchReport(tuple(vocabulary))
    used: set[str] = set()
    bar = tqdm(paths, desc="segment", unit="img", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for path in bar:
        try:
            loaded = read_image(path)
        except ImageError as e:
            report.failed.append((str(path), str(e)))
            bar.write(f"skipped {path}: {e}", file=sys.stderr)
            continue
        image = loaded.rgb
        if loaded.note:
            bar.write(f"{path}: {loaded.note}", file=sys.stderr)
        predictor.set_image(image)
        result = predictor.predict(vocabulary, prompts=prompt_set)
        stem = _unique_stem(path.stem, used)
        targets = (out_dir / f"{stem}_overlay.png", out_dir / f"{stem}_labels.png", out_dir / f"{stem}.json")
        if any(t.resolve() in inputs for t in targets):  # never overwrite an input image
            report.failed.append((str(path), f"an output would overwrite input {targets[0]}"))
            continue
        write_prediction(image, result, *targets, prompt_set=result.prompt_set)
        counts = np.bincount(result.label_map.ravel(), minlength=len(report.classes)).astype(np.int64)
        report.pixels = counts if report.pixels is None else report.pixels + counts
        report.images_with = (counts > 0).astype(np.int64) + (0 if report.images_with is None else report.images_with)
        report.written.append(stem)
    bar.close()
    return report


def write_summary(report: BatchReport, path: Path, extra: dict | None = None) -> Path:
    """``summary.json``: ``report.summary()`` plus ``extra`` (prompt set, text encodes, …)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**(extra or {}), **report.summary()}, indent=2))
    os.replace(tmp, path)  # a reader never sees half a summary
    return path
