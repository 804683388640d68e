"""What the demo runs: the CLIP (pretrained, else the bundled toy model, else random weights), the learned
prompt sets, and the optional MVP-SEG+ student.

The app must start without a network: when pretrained weights cannot be had we say so plainly (which
weights, why, how to provide them) and keep going on the best model that *is* available, labelled as such.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch

import mvpseg
from mvpseg.student import FORMAT as STUDENT_FORMAT
from mvpseg.student import read_student_meta

log = logging.getLogger("mvpseg.demo")

REPO_ROOT = Path(__file__).resolve().parent.parent
ASSETS_DIR = REPO_ROOT / "assets"
# Toy-world images are 256 px and the toy CLIP saw its objects at that scale (its dense path has no
# positional embedding), so the toy model is run at its native size instead of MaskCLIP's 512.
TOY_SHORT_SIDE = 256
DEFAULT_SHORT_SIDE = 512
RANDOM_SEED = 0  # random-weight fallbacks are seeded so that their fingerprint (and fitting checkpoints) is stable

Mode = Literal["pretrained", "toy", "random"]


@dataclass(frozen=True)
class DemoConfig:
    """Everything the command line decides.

    clip / pretrained / model_config / cache_dir: as ``mvpseg.ClipSpec`` (``pretrained=None``: random weights).
    checkpoints: (name, path) learned prompt sets to load; ``discover`` also loads those shipped under
        ``assets/`` that fit the loaded CLIP.
    fallback: when the weights are missing, ``"auto"`` runs the toy model if bundled, else random weights;
        ``"random"`` goes straight to random weights; ``"none"`` re-raises.
    text_cache_dir: where text embeddings are kept across restarts (``default_text_cache_dir()`` in the app);
        None: in memory only.
    dense_mode / sliding: the default dense-feature mode and sliding window (``--dense``/``--sliding``); the
        page can change both per request.
    """

    clip: str = "RN50"
    pretrained: str | None = "openai"
    model_config: str | None = None
    cache_dir: str | None = None
    device: str = "auto"
    checkpoints: tuple[tuple[str, str], ...] = ()
    discover: bool = True
    student: str | None = None
    short_side: int | None = None
    max_classes: int = 30
    fallback: Literal["auto", "random", "none"] = "auto"
    normalization: str | None = None
    text_cache_dir: str | None = None
    dense_mode: str | None = None
    sliding: tuple[int, int] | None = None


def default_text_cache_dir() -> str:
    """``$MVPSEG_TEXT_CACHE_DIR``; else Spaces' persistent storage (``/data/mvpseg-text-cache``, when ``/data``
    is a writable folder); else ``$XDG_CACHE_HOME/mvpseg/text-embeddings`` (``~/.cache/…``)."""
    if os.environ.get("MVPSEG_TEXT_CACHE_DIR"):
        return os.environ["MVPSEG_TEXT_CACHE_DIR"]
    if os.path.isdir("/data") and os.access("/data", os.W_OK):
        return "/data/mvpseg-text-cache"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mvpseg", "text-embeddings")


def text_cache_dir_from(arg: str | None) -> str | None:
    """``--text-cache-dir``: None → ``default_text_cache_dir()``; "none" / "off" → None (memory only)."""
    folder = arg if arg else default_text_cache_dir()
    return None if folder.strip().lower() in ("none", "off", "") else folder


StudentRunner = Callable[[np.ndarray, str, tuple[str, ...]], np.ndarray]


@dataclass
class StudentSlot:
    """The MVP-SEG+ student, when configured: ``runner(image RGB, image key, classes) -> label map H×W``."""

    runner: StudentRunner | None
    status: str
    predictor: object | None = None  # the mvpseg.StudentPredictor (its ``stats`` show the caching)

    @property
    def configured(self) -> bool:
        return self.runner is not None


@dataclass
class DemoModels:
    """The loaded models and what the page should say about them."""

    predictor: mvpseg.Predictor
    clip_description: str
    mode: Mode
    device: str
    learned_sets: dict[str, str]  # prompt-set name → one-line description, for learned sets loaded at start
    notices: list[str] = field(default_factory=list)  # markdown warnings shown at the top of the page
    student: StudentSlot = field(default_factory=lambda: StudentSlot(None, "not configured"))
    max_classes: int = 30
    # the window the page's "sliding window" switch uses (--sliding, else native_window of the tower)
    sliding_window: tuple[int, int] | None = None
    sliding_default: bool = False  # the switch's initial state (on when --sliding was given)

    @property
    def clip(self) -> mvpseg.FrozenCLIP:
        return self.predictor.clip

    @property
    def dense_choices(self) -> tuple[str, ...]:
        """The dense modes the loaded tower supports (ResNet: maskclip only)."""
        return dense_modes_of(self.clip)

    @property
    def window(self) -> tuple[int, int] | None:
        """(window, stride) of the sliding-window switch; None for a tower without dense features."""
        if self.sliding_window is not None:
            return self.sliding_window
        return native_window(self.clip) if self.dense_choices else None


def dense_modes_of(clip: mvpseg.FrozenCLIP) -> tuple[str, ...]:
    """Modes valid for this CLIP's image tower, in DENSE_MODES order (empty for a tower without dense path)."""
    from mvpseg.dense import DENSE_MODES

    valid = []
    for mode in DENSE_MODES:
        try:
            clip.dense_settings(mode)
            valid.append(mode)
        except (ValueError, NotImplementedError):
            pass
    return tuple(valid)


def native_window(clip: mvpseg.FrozenCLIP) -> tuple[int, int]:
    """The papers' sliding window for this tower: its pretraining resolution (224 for ViT-B/16), stride about
    half of it, both rounded to multiples of the tower's stride (RN50: 224/128, ViT-B/16: 224/112)."""
    from mvpseg.dense import tower_stride

    visual = clip.model.visual
    s = tower_stride(visual)
    size = getattr(visual, "image_size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    window = max(s, round(size / s) * s)
    return window, max(s, min(window, round(window / 2 / s) * s))


def toy_available(spec: mvpseg.ClipSpec = mvpseg.TOY_CLIP_SPEC) -> bool:
    """Whether the bundled toy model's files exist (they are produced by ``training.pretrain_toyclip``)."""
    return bool(spec.pretrained and Path(spec.pretrained).is_file() and spec.model_config
                and Path(spec.model_config).is_file())


def random_clip(spec: mvpseg.ClipSpec, device: torch.device) -> mvpseg.FrozenCLIP:
    """The same architecture with seeded random weights (RN50 when the architecture itself needs the Hub)."""
    name, cfg = spec.model_name, spec.model_config
    if name.startswith("hf-hub:") or (cfg is not None and not Path(cfg).is_file()):
        name, cfg = "RN50", None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return mvpseg.load_clip(mvpseg.ClipSpec(name, None, spec.cache_dir, cfg, spec.normalization), device)


def describe_prompts(prompts: mvpseg.PromptSet) -> str:
    """One line about a learned prompt set: views, context length, the CLIP it was learned for."""
    meta = getattr(prompts, "meta", None)
    n_seg = getattr(prompts, "n_seg", len(prompts.view_names))
    text = f"{n_seg} views" + (" + global prompt (GPR)" if prompts.has_global else "")
    if hasattr(prompts, "n_ctx"):
        text += f", {prompts.n_ctx} context tokens"
    if meta is not None:
        weights = Path(meta.clip_pretrained).name if meta.clip_pretrained else "random weights"
        text += f", learned for {meta.clip_model} ({weights})"
        if meta.training_classes:
            text += f" on {len(meta.training_classes)} classes"
        if meta.dense_mode:
            text += f", dense mode {meta.dense_mode}"
    return text


def _load_clip(config: DemoConfig, device: torch.device,
               toy_spec: mvpseg.ClipSpec) -> tuple[mvpseg.FrozenCLIP, Mode, list[str]]:
    if config.clip == "toy":  # shortcut for the bundled toy model
        if toy_available(toy_spec):
            return mvpseg.load_clip(toy_spec, device), "toy", []
        spec = toy_spec
    else:
        spec = mvpseg.ClipSpec(config.clip, config.pretrained, config.cache_dir, config.model_config,
                               config.normalization, config.dense_mode, config.sliding)
    try:
        if spec is toy_spec and not toy_available(toy_spec):
            raise mvpseg.ClipWeightsUnavailable(
                f"the bundled toy model is not built yet ({toy_spec.pretrained} is missing); build it with "
                "`python -m training.pretrain_toyclip`")
        clip = mvpseg.load_clip(spec, device)
    except mvpseg.ClipWeightsUnavailable as e:
        if config.fallback == "none":
            raise
        how = str(e).replace("\n", "\n\n")  # keep the numbered list readable in markdown
        if config.fallback == "auto" and toy_available(toy_spec):
            clip, mode = mvpseg.load_clip(toy_spec, device), "toy"
            now = ("Running on the **bundled toy-world model** instead: it knows the toy world only (coloured "
                   "cats, birds, owls, foxes, grass, water, sand, brick) — try the examples.")
        else:
            clip, mode = random_clip(spec, device), "random"
            now = (f"Running on **{clip.spec.model_name} with random weights** instead: the page works end to "
                   "end, but the segmentations are meaningless.")
        log.info("CLIP weights unavailable, falling back to the %s model", mode)  # the app logs the notice
        return clip, mode, [f"⚠️ **The CLIP weights {spec.describe()} are missing.** {now}\n\n{how}"]
    if spec.pretrained is None:
        return clip, "random", [f"⚠️ **{spec.model_name} runs with random weights** (`--pretrained none`): "
                                "the segmentations are meaningless."]
    if toy_spec.pretrained and Path(spec.pretrained).resolve() == Path(toy_spec.pretrained).resolve():
        return clip, "toy", []
    return clip, "pretrained", []


def discover_checkpoints(root: Path = ASSETS_DIR) -> list[tuple[str, str]]:
    """(name, path) of the learned prompt checkpoints shipped under ``root`` (a .safetensors with a .json
    sidecar whose ``format`` is mvpseg's), sorted by path."""
    found = []
    for js in sorted(root.rglob("*.json")) if root.is_dir() else []:
        st = js.with_suffix(".safetensors")
        if not st.is_file():
            continue
        try:
            if json.loads(js.read_text()).get("format") != "mvpseg-prompts":
                continue
        except (OSError, ValueError, AttributeError):
            continue
        found.append((st.stem, str(st)))
    return found


def discover_student(clip: mvpseg.FrozenCLIP, root: Path = ASSETS_DIR) -> str | None:
    """The first student shipped under ``root`` (sidecar ``format`` mvpseg-student) distilled against this
    CLIP's text tower, or None: a toy student is offered with the toy CLIP, never with another one."""
    for js in sorted(root.rglob("*.json")) if root.is_dir() else []:
        st = js.with_suffix(".safetensors")
        try:
            if json.loads(js.read_text()).get("format") != STUDENT_FORMAT or not st.is_file():
                continue  # prompt checkpoints, configs, other JSON
            meta = read_student_meta(st)
        except (OSError, ValueError, AttributeError, mvpseg.CheckpointError):
            continue
        if meta.clip_fingerprint == clip.fingerprint and meta.embed_dim == clip.embed_dim:
            return str(st)
    return None


def _load_learned(clip: mvpseg.FrozenCLIP, explicit: Sequence[tuple[str, str]], discovered: Sequence[tuple[str, str]],
                  reserved: Sequence[str]) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """Checks every checkpoint against the CLIP; returns (name → path, name → description, notices). Sets of
    any dense mode the tower offers are kept: the page's selector picks the mode per request, and a set that
    does not fit the selected mode is skipped with a note (SegmentService)."""
    paths: dict[str, str] = {}
    descriptions: dict[str, str] = {}
    notices: list[str] = []
    for origin, items in (("--checkpoint", explicit), ("shipped", discovered)):
        for name, path in items:
            if name in reserved or name in paths:
                name = f"learned:{name}"
            if any(p == path for p in paths.values()):
                continue
            try:
                prompts = mvpseg.load_prompts(path, clip, name=name, check_dense=False)
            except (mvpseg.CheckpointError, FileNotFoundError) as e:
                if origin == "--checkpoint":  # asked for explicitly: say why it is not offered
                    notices.append(f"⚠️ Learned prompts `{path}` were not loaded: {e}")
                log.info("skipping learned prompts %s: %s", path, e)
                continue
            paths[name] = path
            descriptions[name] = describe_prompts(prompts)
    return paths, descriptions, notices


def load_student(path: str | None, clip: mvpseg.FrozenCLIP, device: torch.device, short_side: int) -> StudentSlot:
    """The MVP-SEG+ student (``mvpseg.StudentPredictor``) behind a small adapter, or a slot saying why not.

    The student keeps its own image cache; the adapter re-encodes only when the image content changes.
    """
    if not path:
        return StudentSlot(None, "not configured — start the app with `--student PATH` to show the MVP-SEG+ "
                                 "student beside the prompt-based results.")
    if not Path(path).with_suffix(".safetensors").is_file() and not Path(path).is_file():
        return StudentSlot(None, f"not available — student checkpoint `{path}` does not exist.")
    student_cls = getattr(mvpseg, "StudentPredictor", None)
    if student_cls is None:
        return StudentSlot(None, f"not available — `--student {path}` was given, but this version of mvpseg has "
                                 "no student API (`mvpseg.StudentPredictor`).")
    try:
        student = student_cls.from_checkpoint(path, clip=clip, device=device, short_side=short_side)
    except Exception as e:  # any failure (wrong CLIP, corrupt file) must leave the rest of the demo working
        log.warning("student %s failed to load: %s", path, e)
        return StudentSlot(None, f"not available — `{path}` failed to load: {e}")
    state = {"key": None}

    def run(image: np.ndarray, key: str, classes: tuple[str, ...]) -> np.ndarray:
        if state["key"] != key or not student.has_image:
            state["key"] = None
            student.set_image(image)
            state["key"] = key
        return student.predict(classes).label_map

    penalty = float(getattr(student, "seen_penalty", 0.0))
    calibrated = f", seen-class penalty {penalty:g} (calibrated stacking)" if penalty else ""
    return StudentSlot(run, f"MVP-SEG+ student from `{Path(path).name}`{calibrated}", student)


def load_models(config: DemoConfig = DemoConfig(), toy_spec: mvpseg.ClipSpec = mvpseg.TOY_CLIP_SPEC,
                assets_dir: Path = ASSETS_DIR) -> DemoModels:
    """Loads everything once at start. Never fails for missing weights unless ``fallback="none"``."""
    device = mvpseg.resolve_device(config.device)
    clip, mode, notices = _load_clip(config, device, toy_spec)
    dense = _dense_for(clip, config, notices)
    baselines = mvpseg.baseline_prompt_sets()
    discovered = discover_checkpoints(assets_dir) if config.discover else []
    paths, descriptions, more = _load_learned(clip, config.checkpoints, discovered, reserved=tuple(baselines))
    notices += more
    short_side = config.short_side or (TOY_SHORT_SIDE if mode == "toy" else DEFAULT_SHORT_SIDE)
    predictor = mvpseg.build_predictor(clip, checkpoints=paths, baselines=True, short_side=short_side,
                                       text_cache_dir=config.text_cache_dir, dense=dense,
                                       check_dense=False)
    description = f"{clip.spec.describe()}" if mode != "toy" else "bundled toy-world CLIP (toyclip)"
    if mode == "toy" and not paths:
        notices.append("ℹ️ No learned prompts for the toy model are shipped yet: the handcrafted prompt sets are "
                       "available, and you can upload a checkpoint trained with `training.train_prompts`.")
    return DemoModels(predictor=predictor, clip_description=description, mode=mode, device=str(device),
                      learned_sets=descriptions, notices=notices,
                      student=load_student(config.student or (discover_student(clip, assets_dir) if config.discover
                                                              else None), clip, device, short_side),
                      max_classes=config.max_classes,
                      sliding_window=None if dense is None else
                      (dense.sliding_record() and tuple(dense.sliding_record())) or native_window(clip),
                      sliding_default=dense is not None and dense.sliding is not None)


def _dense_for(clip: mvpseg.FrozenCLIP, config: DemoConfig, notices: list[str]):
    """The predictor's initial dense settings: the configured ones when they fit the loaded tower (a fallback
    toy or random CLIP may not be the requested architecture: then its default, with a notice)."""
    if clip.dense is None or (config.dense_mode is None and config.sliding is None):
        return clip.dense
    try:
        return clip.dense_settings(config.dense_mode, config.sliding)
    except ValueError as e:
        notices.append(f"ℹ️ The requested dense settings do not fit the loaded CLIP ({e}); using "
                       f"{clip.dense.describe()}.")
        return clip.dense


def offline() -> bool:
    """Whether the Hugging Face Hub must not be contacted (``HF_HUB_OFFLINE`` set), read at call time."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")
