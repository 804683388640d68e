"""The MVP-SEG+ student (paper Sec. 3.3, following MaskCLIP+): a DeepLab network whose classifier is text.

There is no learned 1×1 classifier. The head outputs ``D`` = CLIP-embedding-width features ``f`` (not
normalised, as MaskCLIP+'s ``norm_feat=False``) and class ``c`` scores ``f · w_c`` where ``w_c`` is the
frozen MVP-SEG text embedding of class ``c`` with the K views fused as in Eq. 4:

    τ1 Σ_i f̂·t_c^i = τ1 K · f̂·w_c   with   w_c = (1/K) Σ_i t_c^i,

i.e. Eq. 4's fusion is linear in the views, and its scale τ1·K is absorbed by the unnormalised student
features. Where the dataset keeps a background class (Context-60, the toy world), that class uses a
learnable unit-norm background embedding instead of text (MaskCLIP+ ``cls_bg``). Because the classifier
is text, any vocabulary works at inference: encode it with the same prompts and swap ``w``.

Checkpoints (writing, strict loading, metadata) are in ``mvpseg/student/checkpoint.py``.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..clip_backbone import NORMALIZATIONS
from ..prompts import TextViews
from .clip_trunk import (CLIP_BACKBONE, MASKCLIP_HEAD, CLIPTrunk, MaskCLIPHead, build_modified_resnet,
                         clip_vision_config)
from .heads import HEADS, ResNetBackbone, load_backbone_weights, make_head, make_resnet


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
