"""Dense-feature modes: which tower supports which mode, and the one entry point ``dense_features``."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .resnet import is_modified_resnet, resnet_dense_features
from .vit import (clearclip_features, is_vision_transformer, maskclip_vit_features, naclip_features,
                  sclip_features)

DENSE_MODES: tuple[str, ...] = ("maskclip", "maskclip-vit", "sclip", "clearclip", "naclip")
RESNET_MODES: tuple[str, ...] = ("maskclip",)
VIT_MODES: tuple[str, ...] = ("maskclip-vit", "sclip", "clearclip", "naclip")


def _tower_modes(visual: nn.Module) -> tuple[str, tuple[str, ...]]:
    """(tower name for messages, the modes it supports); NotImplementedError for other towers."""
    if is_modified_resnet(visual):
        return "ModifiedResNet", RESNET_MODES
    if is_vision_transformer(visual):
        return "VisionTransformer", VIT_MODES
    raise NotImplementedError(f"Dense features are not implemented for {type(visual).__name__}; "
                              "use an open_clip ModifiedResNet (RN50, RN101, …) or VisionTransformer.")


def default_dense_mode(visual: nn.Module) -> str:
    """"maskclip" for a ModifiedResNet, "maskclip-vit" for a VisionTransformer."""
    return _tower_modes(visual)[1][0]


def check_dense_mode(visual: nn.Module, mode: str) -> str:
    """Returns ``mode`` if this tower supports it; ValueError (one line, naming the valid modes) otherwise."""
    tower, valid = _tower_modes(visual)
    if mode in valid:
        return mode
    listed = ", ".join(repr(m) for m in valid)
    if mode in DENSE_MODES:
        hint = " (use 'maskclip-vit' for MaskCLIP on a ViT)" if mode == "maskclip" else ""
        raise ValueError(f"dense mode {mode!r} is not available for a {tower} tower{hint}; valid modes: {listed}")
    raise ValueError(f"unknown dense mode {mode!r}; valid modes for a {tower} tower: {listed}")


def dense_features(visual: nn.Module, images: torch.Tensor, mode: str | None = None) -> torch.Tensor:
    """Normalised images B×3×H×W → unit-norm (over D) dense features B×D×h×w, float32.

    h×w is H/32×W/32 for a ResNet, H/p×W/p for a ViT with patch size p. ``mode=None`` picks
    ``default_dense_mode(visual)``.
    """
    mode = default_dense_mode(visual) if mode is None else check_dense_mode(visual, mode)
    if mode == "maskclip":
        feats = resnet_dense_features(visual, images)
    elif mode == "maskclip-vit":
        feats = maskclip_vit_features(visual, images)
    elif mode == "sclip":
        feats = sclip_features(visual, images)
    elif mode == "clearclip":
        feats = clearclip_features(visual, images)
    else:
        feats = naclip_features(visual, images)
    return F.normalize(feats.float(), dim=1)
