"""MaskCLIP dense image features (paper Eq. 2): F = Proj_c(Proj_v(X)).

For a ModifiedResNet (RN50, RN101, RN50x4, …) X is the last-stage feature map (stride 32). The attention
pool's value and output projections are applied as 1×1 convolutions *with their biases*; query, key and
the positional embedding are dropped, so every location is classified on its own and any input size works.
For a ViT the same idea is applied to the last block (MaskCLIP's ViT variant): the value path of its
attention, then out_proj, ln_post and the projection, without the query/key mixing.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


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


def _vit_pos_embed(visual: nn.Module, gh: int, gw: int) -> torch.Tensor:
    """Positional embedding resized (bicubic) from the pretraining grid to gh×gw, class token kept."""
    pos = visual.positional_embedding
    cls_pos, grid_pos = pos[:1], pos[1:]
    n = int(math.isqrt(grid_pos.shape[0]))
    if (n, n) == (gh, gw):
        return pos
    grid = grid_pos.reshape(1, n, n, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(gh, gw), mode="bicubic", align_corners=False).to(pos.dtype)
    return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)], 0)


def vit_dense_features(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """VisionTransformer: B×3×H×W → B×D×(H/p)×(W/p) (not normalised)."""
    x = visual.conv1(images.to(visual.conv1.weight.dtype))
    b, _, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(b, 1, -1)
    x = torch.cat([cls, x], 1) + _vit_pos_embed(visual, gh, gw).to(x.dtype)
    x = visual.ln_pre(x)
    blocks = visual.transformer.resblocks
    for blk in blocks[:-1]:
        x = blk(x)
    last = blocks[-1]
    attn: nn.MultiheadAttention = last.attn
    y = last.ln_1(x)
    width = y.shape[-1]
    v = F.linear(y, attn.in_proj_weight[2 * width:], attn.in_proj_bias[2 * width:])
    v = attn.out_proj(v)
    v = visual.ln_post(v[:, 1:])
    if visual.proj is not None:
        v = v @ visual.proj
    return v.transpose(1, 2).reshape(b, -1, gh, gw)


def dense_features(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Normalised images B×3×H×W → unit-norm dense features B×D×h×w for a ResNet or ViT CLIP tower."""
    if hasattr(visual, "attnpool") and hasattr(visual, "layer4"):
        feats = resnet_dense_features(visual, images)
    elif hasattr(visual, "transformer") and hasattr(visual, "conv1"):
        feats = vit_dense_features(visual, images)
    else:
        raise NotImplementedError(f"Dense features are not implemented for {type(visual).__name__}; "
                                  "use an open_clip ModifiedResNet (RN50, RN101, …) or VisionTransformer.")
    return F.normalize(feats.float(), dim=1)
