"""Building blocks of the MVP-SEG+ student: a dilated torchvision ResNet and the DeepLab heads.

MaskCLIP+ (and therefore MVP-SEG+) fine-tunes a ResNet-101 dilated to output stride 8 with

* a **DeepLabv2** head for VOC and COCO-Stuff: four parallel 3×3 convolutions with dilations 6/12/18/24, each
  conv + BN + ReLU, *summed* (mmseg ``ASPPHeadV2``);
* a **DeepLabv3+** head for Context: image pooling + a depthwise-separable ASPP (dilations 1/12/24/36), a 3×3
  bottleneck, and a decoder that fuses the stride-4 ``layer1`` features reduced to 48 channels (mmseg
  ``DepthwiseSeparableASPPHead``).

Both heads output ``channels`` = the CLIP embedding width, because the classifier is a product with frozen
text embeddings (``mvpseg.student``). Differences from MaskCLIP+: torchvision's ResNet (v1.5, 7×7 stem) instead
of mmseg's ResNetV1c (3-conv stem); BatchNorm is converted to SyncBatchNorm by the training script on CUDA.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.resnet import BasicBlock, ResNet

log = logging.getLogger("mvpseg.student")

# torchvision ResNets that can be built (and, except the tiny one, loaded with ImageNet weights).
TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
TINY_RESNET = "resnet-tiny"  # BasicBlock [1,1,1,1], widths 16/32/64/128: CPU tests and the toy world
BACKBONES = TORCHVISION_RESNETS + (TINY_RESNET,)
TINY_WIDTHS = (16, 32, 64, 128)


def _tiny_resnet() -> ResNet:
    """A narrow 10-layer ResNet built from torchvision's blocks (random init only)."""
    net = ResNet(BasicBlock, [1, 1, 1, 1])
    w = TINY_WIDTHS
    net.conv1 = nn.Conv2d(3, w[0], kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(w[0])
    net.inplanes, net.dilation = w[0], 1
    net.layer1 = net._make_layer(BasicBlock, w[0], 1)
    net.layer2 = net._make_layer(BasicBlock, w[1], 1, stride=2)
    net.layer3 = net._make_layer(BasicBlock, w[2], 1, stride=2)
    net.layer4 = net._make_layer(BasicBlock, w[3], 1, stride=2)
    net.fc = nn.Linear(w[3], 1000)
    for m in net.modules():  # the same init torchvision applies
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


def make_resnet(name: str) -> ResNet:
    """An undilated, randomly initialised torchvision ResNet (``fc`` included, so ImageNet weights load strictly)."""
    if name == TINY_RESNET:
        return _tiny_resnet()
    if name not in TORCHVISION_RESNETS:
        raise ValueError(f"unknown student backbone '{name}'; choose from {', '.join(BACKBONES)}")
    return getattr(torchvision.models, name)(weights=None)


def dilate_layer(layer: nn.Sequential, dilation: int, first_dilation: int) -> None:
    """Turns a strided ResNet stage into a dilated one in place (output stride unchanged by this stage).

    The first block keeps ``first_dilation`` (the previous stage's), the others use ``dilation``: the same
    scheme as torchvision's ``replace_stride_with_dilation`` and mmseg's ``contract_dilation``. Works for
    Bottleneck and BasicBlock (torchvision refuses dilation for BasicBlock; patching the convs is exact).
    """
    for j, block in enumerate(layer):
        d = first_dilation if j == 0 else dilation
        for name, m in block.named_children():
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
                m.stride, m.dilation, m.padding = (1, 1), (d, d), (d, d)
            elif name == "downsample":
                m[0].stride = (1, 1)


def dilate_to_stride(layer3: nn.Sequential, layer4: nn.Sequential, output_stride: int,
                     dilate=dilate_layer) -> None:
    """Dilates the last two stages of a stride-32 ResNet in place so that it outputs at ``output_stride``: 8
    (layer3 ×2, layer4 ×4), 16 (layer4 ×2) or 32 (as pretrained). ``dilate(stage, dilation, first_dilation)``
    is the block type's in-place stage dilation (``dilate_layer`` for torchvision's blocks)."""
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    if output_stride == 8:
        dilate(layer3, 2, 1)
        dilate(layer4, 4, 2)
    elif output_stride == 16:
        dilate(layer4, 2, 1)


class ResNetBackbone(nn.Module):
    """Stem + layer1..4 of a torchvision ResNet, dilated to ``output_stride`` 8 or 16 (32 = undilated).

    forward: B×3×H×W (ImageNet-normalised) → (low-level B×C1×H/4×W/4, high-level B×C4×H/os×W/os).
    """

    def __init__(self, net: ResNet, output_stride: int = 8) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        dilate_to_stride(self.layer3, self.layer4, output_stride)
        self.output_stride = output_stride
        self.low_channels = _out_channels(self.layer1[-1])
        self.out_channels = _out_channels(self.layer4[-1])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        return low, self.layer4(self.layer3(self.layer2(low)))


def _out_channels(block: nn.Module) -> int:
    last = block.conv3 if hasattr(block, "conv3") else block.conv2
    return int(last.out_channels)


class ConvBNReLU(nn.Sequential):
    """mmseg's ConvModule: conv (no bias) → BN → ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, dilation: int = 1, groups: int = 1) -> None:
        pad = 0 if kernel == 1 else dilation * (kernel // 2)
        super().__init__(nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SeparableConv(nn.Sequential):
    """mmseg's DepthwiseSeparableConvModule: depthwise 3×3 conv+BN+ReLU, then pointwise 1×1 conv+BN+ReLU."""

    def __init__(self, cin: int, cout: int, dilation: int = 1) -> None:
        super().__init__(ConvBNReLU(cin, cin, 3, dilation, groups=cin), ConvBNReLU(cin, cout, 1))


def _init_head(module: nn.Module) -> None:
    # mmcv's ConvModule init: Kaiming normal (fan_out, ReLU) for convs, BN weight 1 / bias 0.
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class DeepLabV2Head(nn.Module):
    """DeepLabv2 ASPP: Σ_d ReLU(BN(conv3×3_d(x))) over ``dilations``. B×Cin×h×w → B×channels×h×w."""

    def __init__(self, in_channels: int, channels: int, dilations: tuple[int, ...] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(ConvBNReLU(in_channels, channels, 1 if d == 1 else 3, d) for d in dilations)
        _init_head(self)

    def forward(self, low: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


class DeepLabV3PlusHead(nn.Module):
    """DeepLabv3+ with a depthwise-separable ASPP and a low-level decoder.

    (low B×C1×H/4×W/4, x B×Cin×h×w) → B×channels×H/4×W/4.
    """

    def __init__(self, in_channels: int, low_channels: int, channels: int,
                 dilations: tuple[int, ...] = (1, 12, 24, 36), low_out: int = 48) -> None:
        super().__init__()
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvBNReLU(in_channels, channels, 1))
        self.aspp = nn.ModuleList(ConvBNReLU(in_channels, channels, 1) if d == 1 else
                                  SeparableConv(in_channels, channels, d) for d in dilations)
        self.bottleneck = ConvBNReLU((len(dilations) + 1) * channels, channels, 3)
        self.low_bottleneck = ConvBNReLU(low_channels, low_out, 1)
        self.fuse = nn.Sequential(SeparableConv(channels + low_out, channels), SeparableConv(channels, channels))
        _init_head(self)

    def forward(self, low: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        pooled = F.interpolate(self.image_pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        x = self.bottleneck(torch.cat([pooled] + [branch(x) for branch in self.aspp], dim=1))
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([x, self.low_bottleneck(low)], dim=1))


HEADS = ("deeplabv2", "deeplabv3plus")


def make_head(kind: str, backbone: ResNetBackbone, channels: int,
              dilations: tuple[int, ...] | None = None, low_out: int = 48) -> nn.Module:
    if kind == "deeplabv2":
        return DeepLabV2Head(backbone.out_channels, channels, tuple(dilations or (6, 12, 18, 24)))
    if kind == "deeplabv3plus":
        return DeepLabV3PlusHead(backbone.out_channels, backbone.low_channels, channels,
                                 tuple(dilations or (1, 12, 24, 36)), low_out)
    raise ValueError(f"unknown student head '{kind}'; choose from {', '.join(HEADS)}")


# ---------------------------------------------------------------------------------------------------- weights
class BackboneWeightsUnavailable(RuntimeError):
    """ImageNet weights for the student backbone were required but cannot be had."""


# --backbone-weights choices → torchvision weight tags. V1 are the classic weights, the closest to the
# open-mmlab ``resnet101_v1c`` weights MaskCLIP+ starts from; V2 are torchvision's newer recipe.
IMAGENET_TAGS = {"imagenet": "IMAGENET1K_V1", "imagenet-v2": "IMAGENET1K_V2"}


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file loaded with ``weights_only=True`` (never arbitrary pickles)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # common wrappers
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise BackboneWeightsUnavailable(f"{path} does not hold a plain state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _load_into(net: ResNet, sd: dict[str, torch.Tensor], origin: str) -> None:
    own = net.state_dict()
    missing = sorted(k for k in own if k not in sd and not k.startswith("fc."))
    unexpected = sorted(k for k in sd if k not in own)
    wrong = sorted(k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape))
    if missing or unexpected or wrong:
        raise BackboneWeightsUnavailable(
            f"{origin} does not fit this ResNet: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shapes {wrong[:5]} (a torchvision ResNet state dict of the same depth is expected)")
    net.load_state_dict({**own, **sd}, strict=True)


def _imagenet_url(name: str, tag: str) -> str:
    depth = name.removeprefix("resnet")
    return getattr(torchvision.models, f"ResNet{depth}_Weights")[tag].url


def load_backbone_weights(net: ResNet, name: str, source: str | None, require: bool = False) -> str:
    """Initialises ``net`` from ``source`` and returns a one-line description of what was loaded.

    source: ``"imagenet"`` / ``"imagenet-v2"`` (torchvision weights: the torch hub cache, else a download),
        a local ``.pth`` / ``.safetensors`` file, or ``None`` / ``"none"`` for random init.
    require: raise BackboneWeightsUnavailable instead of falling back to random init with a warning.
    """
    if source is None or str(source).lower() in ("none", "random", ""):
        return "random init"
    path = Path(source)
    if source not in IMAGENET_TAGS:
        if not path.is_file():
            raise FileNotFoundError(f"backbone weights file not found: {path}")
        _load_into(net, _read_state_dict(path), str(path))
        return f"weights from {path}"
    reason = None
    if name not in TORCHVISION_RESNETS:
        reason = f"torchvision has no ImageNet weights for '{name}'"
    else:
        url = _imagenet_url(name, IMAGENET_TAGS[source])
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        from ..clip_backbone import _network_available  # same offline rules as the CLIP loader

        if not cached.is_file() and not _network_available("download.pytorch.org"):
            reason = f"{cached.name} is not in the torch hub cache ({cached.parent}) and no network is reachable"
        else:
            try:
                sd = torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True, weights_only=True)
                _load_into(net, sd, url)
                return f"ImageNet ({name} {IMAGENET_TAGS[source]}, torchvision)"
            except (OSError, RuntimeError, ValueError) as e:
                reason = f"loading {url} failed: {e}"
    msg = (f"ImageNet weights for the student backbone are unavailable: {reason}. Put the torchvision file in "
           f"{Path(torch.hub.get_dir()) / 'checkpoints'} (or pass --backbone-weights /path/to/file.pth).")
    if require:
        raise BackboneWeightsUnavailable(msg)
    log.warning("%s Continuing with a RANDOMLY initialised backbone: expect far lower accuracy.", msg)
    return f"random init (ImageNet weights unavailable: {reason})"
