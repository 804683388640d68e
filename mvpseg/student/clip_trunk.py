"""The CLIP image tower as the student's backbone, and MaskCLIP's projection as its head (issue #24).

MaskCLIP+ starts its DeepLab student from ImageNet weights: a backbone pretrained *without segmentation labels*.
Where those are not at hand (offline, the toy world) or not the best start, the frozen CLIP's own ModifiedResNet
is such a backbone, and one that already speaks the text's language: with MaskCLIP's dense projection
(``Proj_c ∘ Proj_v``, paper Eq. 2) as the head, the student *starts at its teacher* — its logits f·w_c at
initialisation are MaskCLIP's dense scores against the fused MVP-SEG views (Eq. 4 without GPR, argmax
unchanged by the per-pixel normalisation) — and distillation then moves it from there, as the residual prompts
of ``mvpseg.prompts`` start at the handcrafted classifier.

* ``CLIPTrunk``: stem + layer1..4 of an open_clip ``ModifiedResNet`` dilated to output stride 8 or 16 (the
  anti-aliasing average pools of the strided blocks become identities and later 3×3 convolutions are dilated,
  torchvision's ``replace_stride_with_dilation`` scheme). BatchNorm statistics stay frozen (the CLIP's own; small
  student batches would only add noise), their affine parameters train.
* ``MaskCLIPHead``: ``c_proj(v_proj(x))`` folded into one 1×1 convolution (both are linear): B×C4×h×w → B×D×h×w.

A checkpoint records the tower's shape (``clip_vision_config``) so it can be rebuilt without the CLIP's weights.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..dense.resnet import is_modified_resnet
from .heads import dilate_to_stride

CLIP_BACKBONE = "clip"  # StudentConfig.backbone: the CLIP's ModifiedResNet
MASKCLIP_HEAD = "maskclip"  # StudentConfig.head: the folded MaskCLIP projection (needs the CLIP backbone)


def clip_vision_config(visual: nn.Module) -> dict[str, Any]:
    """The constructor arguments of an open_clip ``ModifiedResNet`` (what rebuilding it needs)."""
    if not is_modified_resnet(visual):
        raise ValueError("the student's 'clip' backbone needs a ResNet CLIP (open_clip ModifiedResNet); this CLIP's "
                         f"image tower is a {type(visual).__name__}: use --backbone resnet50 (or another ResNet)")
    pool = visual.attnpool
    return {"layers": [len(getattr(visual, f"layer{i}")) for i in range(1, 5)],
            "width": int(visual.conv3.out_channels), "heads": int(pool.num_heads),
            "output_dim": int(pool.c_proj.out_features), "image_size": int(visual.image_size)}


def build_modified_resnet(cfg: dict[str, Any]) -> nn.Module:
    """A randomly initialised ``ModifiedResNet`` of the recorded shape (weights come from the checkpoint)."""
    from open_clip.modified_resnet import ModifiedResNet

    return ModifiedResNet(layers=list(cfg["layers"]), output_dim=int(cfg["output_dim"]), heads=int(cfg["heads"]),
                          image_size=int(cfg["image_size"]), width=int(cfg["width"]))


def _dilate_stage(layer: nn.Sequential, dilation: int, first_dilation: int) -> None:
    """A strided ModifiedResNet stage made dilated in place: the first block keeps ``first_dilation`` and loses
    its stride (its ``avgpool`` and the shortcut's pool ``-1`` become identities), later blocks use ``dilation``."""
    for j, block in enumerate(layer):
        d = first_dilation if j == 0 else dilation
        block.conv2.dilation, block.conv2.padding = (d, d), (d, d)
        if isinstance(block.avgpool, nn.AvgPool2d):
            block.avgpool = nn.Identity()
        if block.downsample is not None and isinstance(getattr(block.downsample, "-1", None), nn.AvgPool2d):
            setattr(block.downsample, "-1", nn.Identity())
        block.stride = 1


class CLIPTrunk(nn.Module):
    """Stem + layer1..4 of a ModifiedResNet, dilated to ``output_stride`` (8, 16 or 32 = as pretrained).

    forward: B×3×H×W (normalised with the CLIP's statistics) → (low B×C1×H/4×W/4, high B×C4×H/os×W/os).
    """

    def __init__(self, visual: nn.Module, output_stride: int = 8) -> None:
        super().__init__()
        names = ("conv1", "bn1", "act1", "conv2", "bn2", "act2", "conv3", "bn3", "act3", "avgpool")
        self.stem = nn.Sequential(*(getattr(visual, n) for n in names))
        self.layer1, self.layer2, self.layer3, self.layer4 = visual.layer1, visual.layer2, visual.layer3, visual.layer4
        dilate_to_stride(self.layer3, self.layer4, output_stride, _dilate_stage)
        self.output_stride = output_stride
        self.low_channels = int(self.layer1[-1].conv3.out_channels)
        self.out_channels = int(self.layer4[-1].conv3.out_channels)

    def train(self, mode: bool = True) -> "CLIPTrunk":
        super().train(mode)
        for m in self.modules():  # frozen statistics: the CLIP's, not those of a few student crops
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low = self.layer1(self.stem(x.to(self.stem[0].weight.dtype)))
        return low, self.layer4(self.layer3(self.layer2(low)))


class MaskCLIPHead(nn.Module):
    """MaskCLIP's dense projection as one 1×1 convolution: (low, x B×Cin×h×w) → B×D×h×w.

    ``from_attnpool`` folds the attention pool's value and output projections: W = W_c W_v, b = W_c b_v + b_c,
    so at initialisation the head reproduces ``mvpseg.dense.resnet.resnet_dense_features`` exactly.
    """

    def __init__(self, in_channels: int, channels: int, context: int = 0) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, channels, 1)
        # optional residual context branch (3×3 conv, ReLU, 1×1 conv); its last conv starts at zero, so the head
        # still starts at MaskCLIP's projection
        self.context = None
        if context > 0:
            self.context = nn.Sequential(nn.Conv2d(in_channels, context, 3, padding=1), nn.ReLU(inplace=True),
                                         nn.Conv2d(context, channels, 1))
            nn.init.zeros_(self.context[2].weight)
            nn.init.zeros_(self.context[2].bias)

    @torch.no_grad()
    def from_attnpool(self, pool: nn.Module) -> "MaskCLIPHead":
        wv, bv = pool.v_proj.weight.float(), pool.v_proj.bias.float()
        wc, bc = pool.c_proj.weight.float(), pool.c_proj.bias.float()
        self.proj.weight.copy_((wc @ wv)[:, :, None, None])
        self.proj.bias.copy_(wc @ bv + bc)
        return self

    def forward(self, low: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(x, self.proj.weight.to(x.dtype), self.proj.bias.to(x.dtype))
        return out if self.context is None else out + self.context(x)
