"""MaskCLIP dense features for a ModifiedResNet (paper Eq. 2): F = Proj_c(Proj_v(X)).

For a ModifiedResNet (RN50, RN101, RN50x4, …) X is the last-stage feature map (stride 32). The attention
pool's value and output projections are applied as 1×1 convolutions *with their biases*; query, key and
the positional embedding are dropped, so every location is classified on its own and any input size works.
This is the official MaskCLIP head for ResNets (chongzhou96/MaskCLIP, mmseg/models/decode_heads/
maskclip_head.py: ``feat = self.c_proj(self.v_proj(x))``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

#: Output stride of every open_clip ModifiedResNet (stem /4, then layer2–4 /2 each).
RESNET_STRIDE = 32


def is_modified_resnet(visual: nn.Module) -> bool:
    return hasattr(visual, "attnpool") and hasattr(visual, "layer4")


def _linear_as_conv(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """1×1 convolution with a Linear layer's weight and bias: B×Cin×h×w → B×Cout×h×w."""
    return F.conv2d(x, layer.weight[:, :, None, None].to(x.dtype),
                    None if layer.bias is None else layer.bias.to(x.dtype))


def resnet_dense_features(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """ModifiedResNet: B×3×H×W → B×D×(H/32)×(W/32) (not normalised)."""
    x = images.to(visual.conv1.weight.dtype)
    x = visual.stem(x)
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
    pool = visual.attnpool
    return _linear_as_conv(_linear_as_conv(x, pool.v_proj), pool.c_proj)
