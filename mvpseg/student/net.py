"""The MVP-SEG+ student (paper Sec. 3.3, following MaskCLIP+): a DeepLab network whose classifier is text.

There is no learned 1×1 classifier. The head outputs ``D`` = CLIP-embedding-width features ``f`` (not
normalised, as MaskCLIP+'s ``norm_feat=False``) and class ``c`` scores ``f · w_c`` where ``w_c`` is the
frozen MVP-SEG text embedding of class ``c`` with the K views fused as in Eq. 4:

    τ1 Σ_i f̂·t_c^i = τ1 K · f̂·w_c   with   w_c = (1/K) Σ_i t_c^i,

i.e. Eq. 4's fusion is linear in the views, and its scale τ1·K is absorbed by the unnormalised student
features. Where the dataset keeps a background class (Context-60, the toy world), that class uses a
learnable unit-norm background embedding instead of text (MaskCLIP+ ``cls_bg``). Because the classifier
is text, any vocabulary works at inference: encode it with the same prompts and swap ``w``.

Checkpoints are ``NAME.safetensors`` (student weights, background embedding and, for learned prompts,
the prompt vectors) + ``NAME.json`` (architecture, CLIP identity, prompt metadata, training classes).
They are self-contained except for the CLIP, whose text tower is needed for new vocabularies.
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import (CheckpointError, PromptMeta, check_compatible, load_safetensors, read_sidecar,
                          prompts_from_tensors, residual_prior_name, save_safetensors, sidecar_paths)
from ..clip_backbone import NORMALIZATIONS, FrozenCLIP
from ..dense import default_dense_mode
from ..dense_settings import DenseSettings
from ..prompts import LearnedPrompts, PromptSet, TextViews
from ..util import atomic_write
from .clip_trunk import (CLIP_BACKBONE, MASKCLIP_HEAD, CLIPTrunk, MaskCLIPHead, build_modified_resnet,
                         clip_vision_config)
from .heads import HEADS, ResNetBackbone, load_backbone_weights, make_head, make_resnet

FORMAT = "mvpseg-student"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class StudentConfig:
    """Architecture of a student. MaskCLIP+: resnet101 / deeplabv2 (VOC, COCO-Stuff) or deeplabv3plus (Context).

    embed_dim: CLIP embedding width D (head output channels; 1024 for RN50).
    background: a learnable background embedding (datasets that score a background class).
    dilations: ASPP dilations (None: 6/12/18/24 for deeplabv2, 1/12/24/36 for deeplabv3plus).
    normalization: the student's input statistics (``clip_backbone.NORMALIZATIONS``; ImageNet's, what
        torchvision's backbone weights expect). Recorded in checkpoints, so a student always runs under the
        statistics it was trained with (checkpoints written before it was recorded used ImageNet's).
    clip_vision: with ``backbone="clip"``, the shape of the CLIP's ModifiedResNet (``clip_vision_config``),
        so a checkpoint rebuilds it without the CLIP's weights.
    normalize_features: pixel embeddings of unit norm times a learned scale (``StudentNet.set_logit_scale``),
        as the teacher's Eq. 4, instead of MaskCLIP+'s unnormalised ones (which start at norms of ~100 from a
        CLIP tower, logits the SGD steps of fine-tuning blow up on).
    frozen_backbone: the backbone's weights are not trained (the CLIP tower: fine-tuning it on a few hundred
        images moves its features away from the text space of the unseen classes; docs/distill.md).
    """

    backbone: str = "resnet101"
    head: str = "deeplabv2"
    embed_dim: int = 1024
    output_stride: int = 8
    background: bool = False
    dilations: tuple[int, ...] | None = None
    low_level_channels: int = 48
    normalization: str = "imagenet"
    clip_vision: dict[str, Any] | None = None
    normalize_features: bool = False
    frozen_backbone: bool = False
    head_context: int = 0

    def __post_init__(self) -> None:
        if (self.head == MASKCLIP_HEAD) != (self.backbone == CLIP_BACKBONE):
            raise ValueError(f"the '{MASKCLIP_HEAD}' head goes with the '{CLIP_BACKBONE}' backbone (the CLIP's "
                             f"ModifiedResNet and its attention pool's projections), got {self.backbone} + {self.head}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown student input normalization {self.normalization!r}; choose from "
                             f"{', '.join(sorted(NORMALIZATIONS))}")
        if self.head not in HEADS + (MASKCLIP_HEAD,):
            raise ValueError(f"unknown student head '{self.head}'; choose from {', '.join(HEADS + (MASKCLIP_HEAD,))}")
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim must be positive, got {self.embed_dim}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StudentConfig":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if kw.get("dilations") is not None:
            kw["dilations"] = tuple(kw["dilations"])
        return cls(**kw)


def fuse_views(text: TextViews) -> torch.Tensor:
    """Eq. 4 fusion as a classifier: seg views K×C×D (unit norm) → C×D mean (norm ≤ 1; no GPR)."""
    return text.seg.float().mean(dim=0)


class StudentNet(nn.Module):
    """Dilated ResNet + DeepLab head + open-vocabulary classifier.

    Inputs are images in [0, 1] normalised with ``normalize`` (``config.normalization``: ImageNet statistics
    by default, what torchvision's weights expect). ``features``: B×3×H×W → B×D×H/s×W/s with s = the output
    stride (8; deeplabv3plus: 4).

    ``backbone="clip"`` (``mvpseg.student.clip_trunk``): the backbone is the CLIP's ModifiedResNet. Pass the
    image tower as ``clip_visual`` to start from its weights (with the ``maskclip`` head: from MaskCLIP's dense
    projection too, i.e. at the teacher); without it the network is built from ``config.clip_vision`` for a
    checkpoint's weights.
    """

    def __init__(self, config: StudentConfig, backbone_weights: str | None = None,
                 require_pretrained: bool = False, clip_visual: nn.Module | None = None) -> None:
        super().__init__()
        if config.backbone == CLIP_BACKBONE:
            if clip_visual is not None:
                visual = copy.deepcopy(clip_visual).float().requires_grad_(True)  # the CLIP's is frozen
                config = replace(config, clip_vision=clip_vision_config(visual))
                self.backbone_init = "CLIP image tower"
            elif config.clip_vision is not None:
                visual = build_modified_resnet(config.clip_vision)
                self.backbone_init = "random init (CLIP image tower shape)"
            else:
                raise ValueError("the 'clip' student backbone needs the CLIP's image tower (clip_visual) or its "
                                 "recorded shape (StudentConfig.clip_vision)")
            self.backbone = CLIPTrunk(visual, config.output_stride)
            self.head = MaskCLIPHead(self.backbone.out_channels, config.embed_dim, config.head_context)
            if clip_visual is not None:
                self.head.from_attnpool(visual.attnpool)
        else:
            net = make_resnet(config.backbone)
            self.backbone_init = load_backbone_weights(net, config.backbone, backbone_weights, require_pretrained)
            self.backbone = ResNetBackbone(net, config.output_stride)
            self.head = make_head(config.head, self.backbone, config.embed_dim, config.dilations,
                                  config.low_level_channels)
        if config.frozen_backbone:
            self.backbone.requires_grad_(False)
        self.config = config
        # MaskCLIP+ initialises the background embedding from N(0, 1) and normalises it on use.
        self.bg_embedding = nn.Parameter(torch.randn(1, config.embed_dim)) if config.background else None
        # normalised features, learned scale (log space): bounded logits from the first step, as the teacher's
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0))) if config.normalize_features else None
        mean, std = NORMALIZATIONS[config.normalization]
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def has_background(self) -> bool:
        return self.bg_embedding is not None

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """B×3×H×W float in [0, 1] → input normalised with ``config.normalization``."""
        return (images - self.pixel_mean) / self.pixel_std

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images B×3×H×W → pixel embeddings B×D×h×w: unnormalised (MaskCLIP+), or with
        ``config.normalize_features`` unit norm times the learned scale s (the teacher's τ1·K, Eq. 4)."""
        low, high = self.backbone(images)
        f = self.head(low, high)
        if self.log_scale is None:
            return f
        return F.normalize(f, dim=1) * self.log_scale.exp().to(f.dtype)

    @torch.no_grad()
    def set_logit_scale(self, scale: float) -> None:
        """s of the normalised features: with s = τ1·K of the teacher, f·w_c is Eq. 4's fused score exactly."""
        if self.log_scale is None:
            raise ValueError("this student's features are not normalised (StudentConfig.normalize_features)")
        self.log_scale.fill_(math.log(scale))

    def classifier(self, class_embeddings: torch.Tensor, background_index: int | None = None) -> torch.Tensor:
        """C×D text embeddings → C×D classifier; row ``background_index`` becomes the learned background."""
        if background_index is None:
            return class_embeddings
        if self.bg_embedding is None:
            raise ValueError("this student has no background embedding (it was trained without a background "
                             "class); leave 'background' out of the vocabulary")
        rows = list(class_embeddings.to(self.bg_embedding.dtype).unbind(0))
        rows[background_index] = F.normalize(self.bg_embedding[0], dim=-1)
        return torch.stack(rows)

    def classify(self, features: torch.Tensor, class_embeddings: torch.Tensor,
                 background_index: int | None = None) -> torch.Tensor:
        """Features B×D×h×w and class embeddings C×D → logits B×C×h×w (plain dot products)."""
        w = self.classifier(class_embeddings, background_index)
        return torch.einsum("bdhw,cd->bchw", features, w.to(features.dtype))

    def forward(self, images: torch.Tensor, class_embeddings: torch.Tensor,
                background_index: int | None = None) -> torch.Tensor:
        """Normalised images B×3×H×W → logits B×C×h×w (the loss upsamples them to the label size)."""
        return self.classify(self.features(images), class_embeddings, background_index)


# ---------------------------------------------------------------------------------------------------- checkpoints
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
    format: str = FORMAT
    version: int = FORMAT_VERSION


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
                 dense: DenseSettings | None = None) -> Path:
    """Writes ``path`` (.safetensors) and its .json sidecar; returns the .safetensors path. ``dense``: the
    teacher's dense settings behind the pseudo labels (default: the CLIP's)."""
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
                       clip_normalization=clip.normalization, teacher_dense_mode=None if dense is None else dense.mode)
    save_safetensors(st, {**state, **tensors}, FORMAT, FORMAT_VERSION)
    atomic_write(js, lambda t: t.write_text(json.dumps(asdict(meta), indent=2)))
    return st


def read_student_meta(path: str | os.PathLike) -> StudentMeta:
    _, js = sidecar_paths(path)
    raw = read_sidecar(js, FORMAT, "student", FORMAT_VERSION)
    known = {f.name for f in fields(StudentMeta)}
    try:
        raw["class_names"] = tuple(raw.get("class_names", ()))
        raw["unseen"] = tuple(raw.get("unseen", ()))
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
