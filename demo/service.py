"""One demo request, framework-free: image → cached features → one prediction per selected prompt set.

The predictor holds a single image's features, and several browser sessions share it, so every use of it
happens under one lock and the image is re-encoded only when its content key differs from the cached one.
Changing only the vocabulary or only the prompt sets therefore never re-runs the image tower, and the text
tower encodes only class names not seen before with a prompt set (``predictor.stats`` counts both).
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

import mvpseg
import mvpseg.batch
from mvpseg import visualize

from .models import DemoModels
from .sources import DemoImage, DemoInputError, PromptSource, load_demo_image

UPLOADED, HUB, SESSION = "uploaded", "hub", "session"
BASELINE_LABELS = {
    "maskclip-85": "Handcrafted · 85 templates (MaskCLIP baseline)",
    "parts": "Handcrafted · part-based views (head / leg / tail)",
    "a-photo-of": "Handcrafted · single template “a photo of a {}.”",
}
SLOT_LABELS = {UPLOADED: "Learned · your uploaded checkpoint", HUB: "Learned · Hugging Face Hub repo",
               SESSION: "Learned · in this browser session (Learn tab)"}


@dataclass
class SetResult:
    """The prediction of one prompt set and what it cost."""

    name: str
    label: str
    prediction: mvpseg.Prediction
    text: mvpseg.TextViews
    text_seconds: float
    head_seconds: float
    text_cached: bool
    classes_encoded: int = 0  # class names the text tower encoded for this request (the rest were cached)

    @property
    def multi_view(self) -> bool:
        return len(self.prediction.view_names) > 1


@dataclass
class SegmentRun:
    """Everything one request computed; rendering happens elsewhere."""

    image: DemoImage
    classes: tuple[str, ...]
    colors: np.ndarray  # C×3 uint8, one colour per class in vocabulary order, shared by every panel
    results: list[SetResult]
    load_seconds: float
    image_seconds: float
    image_cached: bool
    label_seconds: float = 0.0
    dense: str = ""  # the dense settings of the image features, e.g. "sclip, sliding 224/112"
    student_map: np.ndarray | None = None
    student_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def primary(self) -> SetResult:
        return self.results[0]

    def record(self, label_map_name: str = "labels.png") -> dict:
        """The downloadable JSON of this request: the main result as the CLI writes it (classes, colours, GPR
        scores, pixel shares, label map file), every selected prompt set's scores and shares, and the settings."""
        out = mvpseg.batch.prediction_record(self.primary.prediction, self.primary.name, label_map_name)
        (w, h), (wh, ww) = self.image.original_size, self.primary.prediction.work_size
        out["settings"] = {"prompt_sets": [r.name for r in self.results], "dense": self.dense,
                           "image_size": [h, w], "work_size": [wh, ww], "notes": list(self.notes)}
        out["prompt_sets"] = {r.name: {k: v for k, v in mvpseg.batch.prediction_record(r.prediction, r.name).items()
                                       if k in ("gpr_scores", "pixel_share")} | {"label": r.label}
                              for r in self.results}
        if self.student_map is not None:
            counts = np.bincount(self.student_map.ravel(), minlength=len(self.classes))
            out["student_pixel_share"] = {c: round(float(counts[i]) / self.student_map.size, 4)
                                          for i, c in enumerate(self.classes)}
        return out

    @property
    def gpr_result(self) -> SetResult | None:
        """The first selected prompt set with a global prompt (the one the GPR chart shows)."""
        return next((r for r in self.results if r.prediction.gpr_scores is not None), None)


class SegmentService:
    """Owns the predictor for the lifetime of the app; thread-safe."""

    def __init__(self, models: DemoModels, tsne_cache_size: int = 16) -> None:
        self.models = models
        self.predictor = models.predictor
        self._lock = threading.RLock()
        self._image_key: str | None = None
        self._default_dense = models.predictor.dense  # what an empty dense choice means
        self._slots: dict[str, str] = {}  # slot name → key of the PromptSource registered there
        self._tsne: OrderedDict[tuple, Any] = OrderedDict()
        self._tsne_size = tsne_cache_size

    # ----------------------------------------------------------------- prompt sets
    @property
    def learned_names(self) -> list[str]:
        return list(self.models.learned_sets)

    def label(self, name: str) -> str:
        if name in self.models.learned_sets:
            return f"Learned · {name}"
        return BASELINE_LABELS.get(name) or SLOT_LABELS.get(name) or name

    def choices(self) -> list[tuple[str, str]]:
        """(label, value) pairs in display order: learned first (they are the method; the visitor's own from the
        Learn tab at the top), then baselines."""
        names = [SESSION] + self.learned_names + [UPLOADED, HUB]
        names += [n for n in BASELINE_LABELS if n in self.predictor.prompt_set_names]
        return [(self.label(n), n) for n in names]

    def default_selection(self) -> list[str]:
        """The best learned set that fits the default dense mode (if any) against the MaskCLIP baseline and the
        part-based views."""
        fitting = [n for n in self.learned_names if not self.predictor.dense_conflict(n)]
        return fitting[:1] + ["maskclip-85", "parts"]

    def ordered(self, names: Sequence[str] | str | None) -> list[str]:
        """Validates a selection and puts it in display order (the first one is the main result)."""
        selected = [names] if isinstance(names, str) else list(names or [])
        known = [v for _, v in self.choices()]
        unknown = [n for n in selected if n not in known]
        if unknown:
            raise DemoInputError(f"Unknown prompt set {unknown[0]!r}; choose from: {', '.join(known)}.")
        if not selected:
            raise DemoInputError("Choose at least one prompt set.")
        return [n for n in known if n in selected]

    def _register(self, slot: str, source: PromptSource | None) -> None:
        if source is None:
            what = {UPLOADED: "upload a checkpoint (.safetensors + .json)", HUB: "enter an hf-hub:ORG/REPO",
                    SESSION: "learn prompts in the Learn tab"}[slot]
            raise DemoInputError(f"'{SLOT_LABELS[slot]}' is selected but not given: {what} first, or untick it.")
        if self._slots.get(slot) != source.key:  # re-registering drops that slot's cached text: only on change
            self.predictor.add_prompt_set(slot, source.prompts)
            self._slots[slot] = source.key

    def _dense_conflict(self, name: str) -> str:
        """Why a learned set cannot run under the request's dense mode, phrased for the page ("" when it can):
        learned sets of every mode the tower offers are loaded, and the page's selector picks per request."""
        if not self.predictor.dense_conflict(name):
            return ""
        learned = self.predictor.learned_dense_mode(name)
        return (f"'{self.label(name)}' was learned with dense mode {learned!r}, not {self.predictor.dense.mode!r} "
                f"(prompts fitted to one kind of dense features give far worse masks with another): choose "
                f"{learned} under 'Dense features'")

    def _neutral_gpr(self, name: str) -> bool:
        """Whether prompt set ``name`` was learned with Eq. 7 as printed (recorded by train_prompts), under
        which the GPR scores stay ≈ 1: the chart would otherwise look like a bug."""
        return getattr(getattr(self.predictor.prompt_set(name), "meta", None), "cls_loss", None) == "paper"

    # ----------------------------------------------------------------- request
    def dense_settings(self, dense_mode: str | None, sliding: bool | None):
        """The request's dense settings: ``dense_mode`` None/"" and ``sliding`` None keep the defaults; sliding
        uses the models' window. DemoInputError names the valid modes."""
        m = self.models
        default = self._default_dense
        mode = dense_mode or (default.mode if default is not None else None)
        on = m.sliding_default if sliding is None else bool(sliding)
        try:
            return self.predictor.clip.dense_settings(mode, m.window if on else None)
        except (ValueError, NotImplementedError) as e:
            raise DemoInputError(f"Dense features: {e}.") from None

    def segment(self, image: Any, vocabulary: str | Sequence[str], prompt_sets: Sequence[str] | str | None,
                uploaded: PromptSource | None = None, hub: PromptSource | None = None,
                session: PromptSource | None = None, progress: Callable[[float, str], None] | None = None,
                dense_mode: str | None = None, sliding: bool | None = None) -> SegmentRun:
        """Runs every selected prompt set on ``image`` with the dense mode ``dense_mode`` (None: the default)
        and the sliding window on or off (None: the default). The image features are cached per image *and*
        dense settings; text embeddings do not depend on them. A learned set that does not fit the dense mode
        is skipped with a note. Raises ImageError, VocabularyError, CheckpointError or DemoInputError with a
        message for the user."""
        step = progress or (lambda frac, desc: None)
        t0 = time.perf_counter()
        names = self.ordered(prompt_sets)
        classes = mvpseg.parse_vocabulary(vocabulary, max_classes=self.models.max_classes)
        settings = self.dense_settings(dense_mode, sliding)
        img = load_demo_image(image)
        load_seconds = time.perf_counter() - t0
        results: list[SetResult] = []
        notes: list[str] = []
        with self._lock:
            for slot, source in ((UPLOADED, uploaded), (HUB, hub), (SESSION, session)):
                if slot in names:
                    self._register(slot, source)
            if settings != self.predictor.dense:
                self.predictor.set_dense(settings.mode, settings.sliding)
            conflicts = {n: self._dense_conflict(n) for n in names}
            runnable = [n for n in names if not conflicts[n]]
            if not runnable:
                raise DemoInputError(next(iter(conflicts.values())) + ", or tick a handcrafted prompt set.")
            notes += [f"{self.label(n)} skipped: {c}." for n, c in conflicts.items() if c]
            names = runnable
            same_image = self._image_key == img.key and self.predictor.has_image
            image_cached = same_image and self.predictor.features_current
            if not image_cached:
                step(0.1, f"encoding the image (CLIP image tower, {settings.describe()})")
                if same_image:  # only the dense settings changed: re-encode the prepared image
                    _ = self.predictor.image_features
                else:
                    self._image_key = None  # stays unset if set_image fails half-way
                    self.predictor.set_image(img.rgb)
                    self._image_key = img.key
            image_seconds = 0.0 if image_cached else self.predictor.image_seconds
            for i, name in enumerate(names):
                step(0.3 + 0.5 * i / len(names), f"prompt set {self.label(name)}")
                before = self.predictor.stats["text_classes_encoded"]
                pred = self.predictor.predict(classes, prompts=name)
                encoded = self.predictor.stats["text_classes_encoded"] - before
                text = self.predictor.text_features(classes, name)  # a cache hit: the same embeddings
                results.append(SetResult(name, self.label(name), pred, text, pred.timings["text"],
                                         pred.timings["head"], encoded == 0, encoded))
        run = SegmentRun(img, classes, visualize.palette(len(classes)), results, load_seconds, image_seconds,
                         image_cached, dense=settings.describe(), notes=([img.note] if img.note else []) + notes)
        if run.gpr_result is not None and self._neutral_gpr(run.gpr_result.name):
            run.notes.append(f"GPR chart: '{run.gpr_result.label}' was learned with L_cls as Eq. 7 prints it (present "
                             "classes only), which keeps every g_c near 1, so GPR suppresses nothing; prompts learned "
                             "with `--cls-loss bce` show it down-weighting absent classes.")
        t1 = time.perf_counter()
        for r in results:  # full-size label maps (lazy in Prediction): independent of the predictor's state
            _ = r.prediction.label_map
        run.label_seconds = time.perf_counter() - t1
        if self.models.student.configured:
            step(0.85, "MVP-SEG+ student")
            t2 = time.perf_counter()
            try:
                with self._lock:
                    run.student_map = self.models.student.runner(img.rgb, img.key, classes)
            except Exception as e:  # the student is an extra: its failure must not hide the main result
                run.notes.append(f"The MVP-SEG+ student failed on this input: {e}")
            run.student_seconds = time.perf_counter() - t2
        return run

    def slot_key(self, name: str) -> str:
        return self._slots.get(name, "")

    def cached(self, key: tuple, compute: Callable[[], Any]) -> tuple[Any, bool]:
        """A small LRU for derived artefacts (the t-SNE figure) keyed by what they depend on."""
        with self._lock:
            if key in self._tsne:
                self._tsne.move_to_end(key)
                return self._tsne[key], True
        value = compute()
        with self._lock:
            self._tsne[key] = value
            while len(self._tsne) > self._tsne_size:
                self._tsne.popitem(last=False)
        return value, False

    # ----------------------------------------------------------------- info
    def info(self) -> dict[str, Any]:
        """What is loaded, for the page header and the ``/info`` endpoint."""
        m = self.models
        sets = []
        for label, name in self.choices():
            kind = "learned" if name in m.learned_sets or name in SLOT_LABELS else "handcrafted"
            sets.append({"name": name, "label": label, "kind": kind,
                         "description": m.learned_sets.get(name, "")})
        return {
            "clip": m.clip_description, "mode": m.mode, "device": m.device,
            "work_short_side": self.predictor.short_side, "prompt_sets": sets,
            "dense": {"modes": list(m.dense_choices),
                      "default": None if self._default_dense is None else self._default_dense.mode,
                      "sliding_window": list(m.window) if m.window else None,
                      "sliding_default": m.sliding_default},
            "student": {"configured": m.student.configured, "status": m.student.status},
            "limits": {"max_classes": m.max_classes, "max_name_chars": mvpseg.predictor.MAX_NAME_CHARS},
            "notices": list(m.notices), "stats": dict(self.predictor.stats),
        }
