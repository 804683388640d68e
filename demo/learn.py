"""The Learn tab's work, framework-free: labelled images from uploaded masks or painted strokes, and learning
jobs run on a worker thread under a hard time budget, one per browser session and a bounded number server-wide.

The learning itself is the library's (``mvpseg.learning.learn_prompts``: the recipe of ``train_prompts``, on
image features computed once per image).
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np
from PIL import Image

import mvpseg
from mvpseg.learning import FewShotResult, FewShotSettings, LabelledImage, LearnProgress, learn_prompts

from .sources import MAX_PIXELS, DemoInputError, fit_long_side

MAX_IMAGES = 20  # labelled images per job
MAX_SIDE = 768  # larger images (and their masks) are downscaled: the features are coarse anyway
MAX_ITERATIONS = 400
MAX_BUDGET_S = 300
IGNORE = 255
COLOUR_TOLERANCE = 60.0  # painted colour → class: nearest brush colour within this RGB distance (antialiased edges)


def class_names(text: str, clip: mvpseg.FrozenCLIP, n_ctx: int, max_classes: int) -> tuple[str, ...]:
    """The vocabulary to learn, checked like the Segment tab's plus the learned prompts' token budget."""
    names = mvpseg.parse_vocabulary(text or "", max_classes=max_classes)
    mvpseg.predictor.check_token_budget(clip, mvpseg.LearnedPrompts(clip.text_width, n_seg=1, n_ctx=n_ctx,
                                                                     use_global=False), names, "learned")
    return names


def _read_rgb(path: str) -> np.ndarray:
    return mvpseg.image_io.read_image(path, max_pixels=MAX_PIXELS).rgb


def _read_mask(path: str) -> np.ndarray:
    """A class-id mask: 8-bit grey or palette PNG (the palette index is the id), one value per class."""
    name = Path(path).name
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise DemoInputError(f"Mask {name} is far too large ({im.width}×{im.height}).")
            if im.mode not in ("L", "P", "I", "I;16"):
                raise DemoInputError(f"Mask {name} is a {im.mode} image: masks are class-id PNGs (8-bit grey or "
                                     "palette, one value per class, 255 = not labelled), not colour pictures.")
            arr = np.asarray(im)
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, DemoInputError):
            raise
        raise DemoInputError(f"Mask {name} is not an image that can be read.") from None
    if arr.max(initial=0) > 255:
        raise DemoInputError(f"Mask {name} has ids above 255.")
    return arr.astype(np.uint8)


def _downscale(rgb: np.ndarray, labels: np.ndarray) -> LabelledImage:
    """Image (area averaging) and labels (nearest: no blended ids) with the long side ≤ MAX_SIDE."""
    size = fit_long_side((rgb.shape[1], rgb.shape[0]), MAX_SIDE)
    if size is not None:
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        labels = cv2.resize(labels, size, interpolation=cv2.INTER_NEAREST)
    return LabelledImage(np.ascontiguousarray(rgb), np.ascontiguousarray(labels))


def check_count(n: int) -> None:
    if n == 0:
        raise DemoInputError("No labelled image: upload images with their masks, or paint on an image and add it.")
    if n > MAX_IMAGES:
        raise DemoInputError(f"{n} images is too many for one job (limit {MAX_IMAGES}).")


def examples_from_masks(images: Sequence[str] | None, masks: Sequence[str] | None,
                        names: Sequence[str]) -> list[LabelledImage]:
    """Pairs uploaded images with uploaded masks by file name (``cat.jpg`` ↔ ``cat.png`` or ``cat_mask.png``),
    else in upload order when the names do not pair up; every problem is a DemoInputError naming the file."""
    images, masks = list(images or []), list(masks or [])
    check_count(len(images))
    if len(masks) != len(images):
        raise DemoInputError(f"{len(images)} images but {len(masks)} masks: upload one mask per image.")
    stems = {Path(m).stem.removesuffix("_mask").removesuffix("-mask"): m for m in masks}
    by_name = [stems.get(Path(i).stem) for i in images]
    pairs = list(zip(images, by_name)) if all(by_name) and len(set(by_name)) == len(images) else \
        list(zip(images, masks))
    out = []
    for img_path, mask_path in pairs:
        rgb, labels = _read_rgb(img_path), _read_mask(mask_path)
        if rgb.shape[:2] != labels.shape[:2]:
            raise DemoInputError(f"Image {Path(img_path).name} is {rgb.shape[1]}×{rgb.shape[0]} but its mask "
                                 f"{Path(mask_path).name} is {labels.shape[1]}×{labels.shape[0]}: they must match.")
        ids = sorted(int(v) for v in np.unique(labels) if v != IGNORE and v >= len(names))
        if ids:
            raise DemoInputError(f"Mask {Path(mask_path).name} uses class ids {ids} but only {len(names)} class "
                                 f"names are given (ids 0…{len(names) - 1}; 255 = not labelled).")
        out.append(_downscale(rgb, labels))
    return _require_labels(out)


def _require_labels(examples: list[LabelledImage]) -> list[LabelledImage]:
    if not any((ex.labels != IGNORE).any() for ex in examples):
        raise DemoInputError("No labelled pixel: every mask is 255 (not labelled) everywhere.")
    return examples


def labels_from_painting(background: np.ndarray, layers: Sequence[np.ndarray], colors: np.ndarray) -> np.ndarray:
    """Painted strokes → labels: a pixel painted (alpha ≥ 128 in any layer, the topmost wins) in a colour within
    COLOUR_TOLERANCE of brush colour c gets class c; unpainted or off-palette pixels are 255 (not labelled).
    background: H×W×3; layers: H×W×4 RGBA; colors: C×3 uint8, one per class."""
    h, w = background.shape[:2]
    labels = np.full((h, w), IGNORE, np.uint8)
    palette = colors.astype(np.float32)
    for layer in layers:
        if layer is None or layer.ndim != 3 or layer.shape[2] != 4 or layer.shape[:2] != (h, w):
            continue
        painted = layer[..., 3] >= 128
        if not painted.any():
            continue
        rgb = layer[..., :3][painted].astype(np.float32)
        dist = np.linalg.norm(rgb[:, None, :] - palette[None], axis=-1)
        cls = dist.argmin(1)
        ok = dist[np.arange(len(cls)), cls] <= COLOUR_TOLERANCE
        ys, xs = np.nonzero(painted)
        labels[ys[ok], xs[ok]] = cls[ok]
    return labels


def example_from_editor(value: dict | None, colors: np.ndarray) -> LabelledImage:
    """A ``gr.ImageEditor`` value (type numpy: background, layers, composite) → a labelled image."""
    if not value or value.get("background") is None:
        raise DemoInputError("Nothing to add: upload an image into the painting canvas first.")
    background = np.asarray(value["background"])
    if background.ndim == 2:
        background = np.stack([background] * 3, -1)
    rgb = background[..., :3].astype(np.uint8)
    labels = labels_from_painting(rgb, [np.asarray(x) for x in value.get("layers") or []], colors)
    if not (labels != IGNORE).any():
        raise DemoInputError("No painted pixel in a class colour: pick a class colour and paint a few strokes.")
    return _downscale(rgb, labels)


def labelled_share(examples: Sequence[LabelledImage]) -> float:
    """The share of labelled pixels over all examples (what a scribble covers)."""
    total = sum(ex.labels.size for ex in examples)
    return sum(int((ex.labels != IGNORE).sum()) for ex in examples) / max(total, 1)


# ------------------------------------------------------------------------------------------------- jobs
class JobRefused(DemoInputError):
    """A job cannot start now (one is running in this session, or too many are waiting)."""


@dataclass
class Jobs:
    """Admission for learning jobs: ``max_running`` run at once server-wide (each uses every core it gets),
    at most ``max_waiting`` wait for a slot, one per browser session."""

    max_running: int = 1
    max_waiting: int = 2
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _slots: threading.Semaphore | None = None
    _sessions: set = field(default_factory=set)
    _waiting: int = 0

    def __post_init__(self) -> None:
        self._slots = threading.Semaphore(self.max_running)

    def enter(self, session: str) -> None:
        with self._lock:
            if session in self._sessions:
                raise JobRefused("A learning job is already running in this browser session: wait for it or "
                                 "cancel it.")
            if self._waiting >= self.max_waiting:
                raise JobRefused("Too many learning jobs are waiting on this server: try again in a minute.")
            self._sessions.add(session)
            self._waiting += 1

    def wait_slot(self, timeout: float) -> bool:
        return self._slots.acquire(timeout=timeout)

    def started(self) -> None:
        with self._lock:
            self._waiting -= 1

    def leave(self, session: str, had_slot: bool, waited: bool) -> None:
        with self._lock:
            self._sessions.discard(session)
            if waited:
                self._waiting -= 1
        if had_slot:
            self._slots.release()

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._sessions)


@dataclass
class JobUpdate:
    """What the page shows while a job runs: its phase and history so far; ``result`` once it ended."""

    progress: LearnProgress | None
    history: list[dict]
    result: FewShotResult | None = None
    waiting: bool = False


def run_job(jobs: Jobs, session: str, clip: mvpseg.FrozenCLIP, examples: list[LabelledImage],
            names: tuple[str, ...], settings: FewShotSettings, short_side: int, dense=None,
            poll_s: float = 0.5) -> Iterator[JobUpdate]:
    """Runs ``learn_prompts`` on a worker thread and yields updates every ``poll_s`` seconds. Closing the
    generator (Gradio's cancel, a closed page) stops the worker at its next step and frees the slot; an
    exception in the worker is raised here."""
    jobs.enter(session)
    had_slot, waited = False, True
    stop = threading.Event()
    updates: queue.Queue = queue.Queue()
    box: dict = {}
    worker = None
    try:
        while not jobs.wait_slot(poll_s):
            yield JobUpdate(None, [], waiting=True)
        had_slot, waited = True, False
        jobs.started()
        history: list[dict] = []

        def on_progress(p: LearnProgress) -> None:
            updates.put(p)

        def work() -> None:
            try:
                box["result"] = learn_prompts(clip, examples, names, settings, short_side=short_side, dense=dense,
                                              on_progress=on_progress, should_stop=stop.is_set)
            except BaseException as e:  # noqa: BLE001 - handed to the page's thread
                box["error"] = e

        worker = threading.Thread(target=work, name=f"mvpseg-learn-{session[:8]}", daemon=True)
        worker.start()
        last = None
        while worker.is_alive():
            worker.join(poll_s)
            while not updates.empty():
                last = updates.get_nowait()
                if last.phase == "learning":
                    history.append({"iter": last.step, "loss": last.loss, "val_miou": last.val_miou,
                                    "seconds": last.seconds})
            yield JobUpdate(last, history)
        if "error" in box:
            raise box["error"]
        yield JobUpdate(last, history, box["result"])
    finally:
        stop.set()
        if worker is not None:
            worker.join(timeout=30)
        jobs.leave(session, had_slot, waited)


def result_files(result: FewShotResult, clip: mvpseg.FrozenCLIP, names: Sequence[str], folder: Path,
                 write: Callable[[bytes, str], str], dense=None) -> tuple[str, str]:
    """The learned prompts as ``learned-prompts.safetensors`` + ``.json`` (``mvpseg.save_prompts``, with the
    job's settings), stored by ``write(bytes, file name) -> path``; returns the two paths."""
    folder.mkdir(parents=True, exist_ok=True)
    st = mvpseg.save_prompts(folder / "learned-prompts.safetensors", result.prompts, clip,
                             training_classes=tuple(names),
                             extra={"learned_in": "demo Learn tab", "iterations": len(result.history) - 1,
                                    "best_iteration": result.best_iteration, "stopped": result.stopped,
                                    "val_miou": result.val_miou, "prior_val_miou": result.prior_val_miou,
                                    "train_images": result.n_train, "val_images": result.n_val,
                                    "seconds": round(result.seconds, 1)}, dense=dense)
    st = Path(st)
    js = st.with_suffix(".json")
    return write(st.read_bytes(), st.name), write(js.read_bytes(), js.name)
