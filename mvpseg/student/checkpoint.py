"""MVP-SEG+ student checkpoints: ``NAME.safetensors`` + ``NAME.json``.

The safetensors file holds the student weights, the background embedding and, for learned prompts, the prompt
vectors; the JSON sidecar (``StudentMeta``) the architecture, the CLIP identity, the prompt metadata, the
training classes and the calibrated-stacking penalty. A checkpoint is self-contained except for the CLIP, whose
text tower is needed for new vocabularies; loading is strict (names, shapes, finite values) and refuses a
student of another CLIP.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from ..checkpoint import (CheckpointError, PromptMeta, check_compatible, load_safetensors, read_sidecar,
                          prompts_from_tensors, residual_prior_name, save_safetensors, sidecar_paths)
from ..clip_backbone import ClipSpec, FrozenCLIP
from ..dense import default_dense_mode
from ..dense_settings import DenseSettings
from ..prompts import LearnedPrompts, PromptSet
from ..util import atomic_write
from .calibration import check_penalty
from .net import StudentConfig, StudentNet

FORMAT = "mvpseg-student"
FORMAT_VERSION = 1

@dataclass(frozen=True)
class StudentMeta:
    """The JSON sidecar of a student checkpoint."""

    config: dict[str, Any]
    clip_model: str
    clip_pretrained: str | None
    clip_fingerprint: str
    embed_dim: int
    text_width: int
    prompts: dict[str, Any]  # {"kind": "learned", "meta": PromptMeta} or {"kind": "handcrafted", "name": …}
    class_names: tuple[str, ...] = ()
    background_index: int | None = None
    unseen: tuple[int, ...] = ()
    backbone_init: str = ""
    clip_model_config: str | None = None  # the JSON config of a custom CLIP (e.g. the toy model)
    extra: dict[str, Any] = field(default_factory=dict)
    # the teacher CLIP's input statistics during distillation (None: written before it was recorded)
    clip_normalization: str | None = None
    # the teacher's dense-feature mode behind the pseudo labels (None: written before it was recorded, i.e. the
    # tower's default); its sliding window is in ``extra["teacher_sliding"]`` (an inference choice, not checked)
    teacher_dense_mode: str | None = None
    # calibrated stacking (mvpseg/student/calibration.py): the logit penalty on the seen training classes, chosen
    # on the training images after distillation (0: none, and every checkpoint written before it existed)
    seen_penalty: float = 0.0
    format: str = FORMAT
    version: int = FORMAT_VERSION


    @property
    def seen_classes(self) -> tuple[str, ...]:
        """The training classes the student saw labels of (what ``seen_penalty`` applies to)."""
        return tuple(n for i, n in enumerate(self.class_names) if i not in set(self.unseen))


@dataclass(frozen=True)
class LoadedStudent:
    net: StudentNet
    prompts: PromptSet
    meta: StudentMeta


def _prompt_record(prompts: PromptSet, clip: FrozenCLIP,
                   dense: DenseSettings | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if isinstance(prompts, LearnedPrompts):
        meta = getattr(prompts, "meta", None) or PromptMeta(
            clip.spec.model_name, clip.spec.pretrained, clip.fingerprint, clip.text_width, clip.embed_dim,
            prompts.n_seg, prompts.n_ctx, prompts.use_global, normalization=clip.normalization,
            dense_mode=None if dense is None else dense.mode, residual_prior=residual_prior_name(prompts))
        tensors = {f"prompts.{k}": v for k, v in prompts.checkpoint_tensors().items()}
        record = asdict(meta)
        record["training_classes"] = list(record["training_classes"])
        return {"kind": "learned", "meta": record}, tensors
    return {"kind": "handcrafted", "name": prompts.name}, {}


def save_student(path: str | os.PathLike, net: StudentNet, prompts: PromptSet, clip: FrozenCLIP,
                 class_names: Sequence[str] = (), background_index: int | None = None,
                 unseen: Sequence[int] = (), extra: dict[str, Any] | None = None,
                 dense: DenseSettings | None = None, seen_penalty: float = 0.0) -> Path:
    """Writes ``path`` (.safetensors) and its .json sidecar; returns the .safetensors path. ``dense``: the
    teacher's dense settings behind the pseudo labels (default: the CLIP's); ``seen_penalty``: the calibrated
    stacking penalty on the seen classes (``mvpseg.student.calibration``)."""
    st, js = sidecar_paths(path)
    st.parent.mkdir(parents=True, exist_ok=True)
    dense = dense or clip.dense
    extra = dict(extra or {})
    extra.setdefault("teacher_sliding", None if dense is None else dense.sliding_record())
    prompt_record, tensors = _prompt_record(prompts, clip, dense)
    state = {f"student.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    meta = StudentMeta(asdict(net.config), clip.spec.model_name, clip.spec.pretrained, clip.fingerprint,
                       clip.embed_dim, clip.text_width, prompt_record, tuple(class_names), background_index,
                       tuple(int(u) for u in unseen), net.backbone_init, clip.spec.model_config, extra,
                       clip_normalization=clip.normalization, teacher_dense_mode=None if dense is None else dense.mode,
                       seen_penalty=_check_penalty(seen_penalty))
    save_safetensors(st, {**state, **tensors}, FORMAT, FORMAT_VERSION)
    _write_meta(js, meta)
    return st


def _check_penalty(value: Any) -> float:
    try:
        return check_penalty(value)
    except ValueError as e:
        raise CheckpointError(f"seen_penalty: {e}") from None


def _write_meta(js: Path, meta: StudentMeta) -> None:
    atomic_write(js, lambda t: t.write_text(json.dumps(asdict(meta), indent=2)))


def clip_spec_of(meta: StudentMeta) -> ClipSpec:
    """The CLIP a student was distilled against, as recorded in its metadata (custom configs included)."""
    return ClipSpec(model_name=meta.clip_model, pretrained=meta.clip_pretrained, model_config=meta.clip_model_config,
                    dense_mode=meta.teacher_dense_mode)


def set_seen_penalty(path: str | os.PathLike, penalty: float, record: dict[str, Any] | None = None) -> StudentMeta:
    """Rewrites the sidecar of an existing student with a new ``seen_penalty`` (and its calibration record in
    ``extra["seen_calibration"]``); the weights are untouched. Returns the new metadata."""
    _, js = sidecar_paths(path)
    meta = read_student_meta(path)
    extra = dict(meta.extra)
    if record is not None:
        extra["seen_calibration"] = record
    meta = replace(meta, seen_penalty=_check_penalty(penalty), extra=extra)
    _write_meta(js, meta)
    return meta


def read_student_meta(path: str | os.PathLike) -> StudentMeta:
    _, js = sidecar_paths(path)
    raw = read_sidecar(js, FORMAT, "student", FORMAT_VERSION)
    known = {f.name for f in fields(StudentMeta)}
    try:
        raw["class_names"] = tuple(raw.get("class_names", ()))
        raw["unseen"] = tuple(raw.get("unseen", ()))
        raw["seen_penalty"] = _check_penalty(raw.get("seen_penalty", 0.0))
        return StudentMeta(**{k: v for k, v in raw.items() if k in known})
    except TypeError as e:
        raise CheckpointError(f"student metadata {js} is incomplete: {e}") from e


def _check_clip(meta: StudentMeta, clip: FrozenCLIP, check_dense: bool = True) -> None:
    if meta.prompts.get("kind") == "learned":
        # learned prompts are tied to the exact text tower; their dense mode is the teacher's (checked below,
        # with the student's own message)
        check_compatible(_prompt_meta(meta), clip, dense_mode=meta.teacher_dense_mode or _default_mode(clip))
    problems = []
    if meta.embed_dim != clip.embed_dim:
        problems.append(f"embedding width {meta.embed_dim} vs {clip.embed_dim}")
    if meta.clip_model != clip.spec.model_name:
        problems.append(f"model '{meta.clip_model}' vs '{clip.spec.model_name}'")
    elif meta.clip_fingerprint != clip.fingerprint:
        problems.append(f"text-tower weights differ (fingerprint {meta.clip_fingerprint} vs {clip.fingerprint})")
    if problems:
        raise CheckpointError("this student was trained against another CLIP: " + "; ".join(problems) +
                              f". Load {meta.clip_model} ({meta.clip_pretrained}) to use it.")
    teacher = meta.teacher_dense_mode or _default_mode(clip)
    if check_dense and teacher is not None and clip.dense_mode is not None and teacher != clip.dense_mode:
        raise CheckpointError(f"this student was distilled from pseudo labels of dense mode {teacher!r}, but the "
                              f"CLIP is set to {clip.dense_mode!r}: pass --dense {teacher}")


def _default_mode(clip: FrozenCLIP) -> str | None:
    """The tower's default dense mode (what students written before the mode was recorded used)."""
    try:
        return default_dense_mode(clip.model.visual)
    except NotImplementedError:
        return None


def _prompt_meta(meta: StudentMeta) -> PromptMeta:
    raw = dict(meta.prompts["meta"])
    raw["training_classes"] = tuple(raw.get("training_classes", ()))
    try:
        return PromptMeta(**{k: v for k, v in raw.items() if k in {f.name for f in fields(PromptMeta)}})
    except TypeError as e:
        raise CheckpointError(f"student checkpoint has incomplete prompt metadata: {e}") from e


def _rebuild_prompts(meta: StudentMeta, tensors: dict[str, torch.Tensor], st: Path) -> PromptSet:
    kind = meta.prompts.get("kind")
    if kind == "learned":
        own = {k.removeprefix("prompts."): v for k, v in tensors.items() if k.startswith("prompts.")}
        return prompts_from_tensors(_prompt_meta(meta), own, "mvp-seg", f"{st}: prompts")
    if kind == "handcrafted":
        from ..builder import baseline_prompt_sets  # lazy: the builder imports the predictor

        sets = baseline_prompt_sets()
        if meta.prompts.get("name") not in sets:
            raise CheckpointError(f"{st}: unknown handcrafted prompt set {meta.prompts.get('name')!r}")
        return sets[meta.prompts["name"]]
    raise CheckpointError(f"{st}: unknown prompt kind {kind!r}")


def load_student(path: str | os.PathLike, clip: FrozenCLIP | None = None,
                 device: str | torch.device | None = None, check_dense: bool = True) -> LoadedStudent:
    """Reads a student checkpoint strictly (exact tensor names, shapes, finite values); with ``clip`` given,
    refuses a student trained against another CLIP, and (``check_dense``) one whose pseudo labels came from
    another dense mode than the CLIP's: what continued distillation needs. Inference uses only the CLIP's
    text tower, so ``StudentPredictor`` passes ``check_dense=False``. Returns the network in eval mode and its
    prompts."""
    st, _ = sidecar_paths(path)
    meta = read_student_meta(path)
    if clip is not None:
        _check_clip(meta, clip, check_dense)
    tensors = load_safetensors(st, "student")
    try:
        config = StudentConfig.from_dict(meta.config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{st}: bad student config in the metadata: {e}") from e
    net = StudentNet(config, backbone_weights=None)
    own = net.state_dict()
    state = {k.removeprefix("student."): v for k, v in tensors.items() if k.startswith("student.")}
    learned = meta.prompts.get("kind") == "learned"
    prompt_keys = {"prompts.ctx", "prompts.tau1", "prompts.tau2"} if learned else set()
    optional = {"prompts.ctx0", "prompts.gpr_bias"} if learned else set()  # residual / calibrated-GPR sets
    if learned:  # a set with a GPR adapter (prompts_from_tensors checks all four)
        optional |= {k for k in tensors if k.startswith("prompts.gpr_adapter.")}
    extra = set(tensors) - {f"student.{k}" for k in own} - prompt_keys - optional
    missing = (set(own) - set(state)) | {k for k in prompt_keys if k not in tensors}
    if missing or extra:
        raise CheckpointError(f"{st} does not match its metadata: missing {sorted(missing)[:6]}, "
                              f"unexpected {sorted(extra)[:6]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"{st}: tensor 'student.{k}' has shape {tuple(v.shape)}, expected "
                                  f"{tuple(own[k].shape)}")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"{st}: tensor 'student.{k}' contains NaN or infinite values")
    net.load_state_dict(state, strict=True)
    net.backbone_init = meta.backbone_init
    prompts = _rebuild_prompts(meta, tensors, st)
    dev = device if device is not None else (clip.device if clip is not None else "cpu")
    return LoadedStudent(net.to(dev).eval(), prompts.to(dev).eval(), meta)
