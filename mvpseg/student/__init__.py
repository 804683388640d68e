"""The MVP-SEG+ student (paper Sec. 3.3): a DeepLab network distilled from MVP-SEG whose classifier is text.

``net``: the network, its checkpoint format and loading; ``heads``: the ResNet backbone (dilated) and the
DeepLabv2 / v3+ heads; ``clip_trunk``: the CLIP's own image tower as backbone and MaskCLIP's projection as
head; ``predictor``: ``StudentPredictor``, the inference API beside ``mvpseg.Predictor``.
"""
from .clip_trunk import CLIP_BACKBONE, MASKCLIP_HEAD, CLIPTrunk, MaskCLIPHead
from .heads import (BACKBONES, HEADS, BackboneWeightsUnavailable, ResNetBackbone, load_backbone_weights, make_head,
                    make_resnet)
from .net import (FORMAT, FORMAT_VERSION, LoadedStudent, StudentConfig, StudentMeta, StudentNet, fuse_views,
                  load_student, read_student_meta, save_student)
from .predictor import StudentPredictor

__all__ = ["CLIP_BACKBONE", "MASKCLIP_HEAD", "CLIPTrunk", "MaskCLIPHead",
           "BACKBONES", "HEADS", "BackboneWeightsUnavailable", "ResNetBackbone", "load_backbone_weights", "make_head",
           "make_resnet", "FORMAT", "FORMAT_VERSION", "LoadedStudent", "StudentConfig", "StudentMeta", "StudentNet",
           "fuse_views", "load_student", "read_student_meta", "save_student", "StudentPredictor"]
