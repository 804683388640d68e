"""The MVP-SEG+ student (paper Sec. 3.3): a DeepLab network distilled from MVP-SEG whose classifier is text.

``net``: the network; ``checkpoint``: its checkpoint format and strict loading; ``calibration``: calibrated
stacking of the seen classes (the penalty chosen on training images); ``heads``: the ResNet backbone (dilated) and the
DeepLabv2 / v3+ heads; ``clip_trunk``: the CLIP's own image tower as backbone and MaskCLIP's projection as
head; ``predictor``: ``StudentPredictor``, the inference API beside ``mvpseg.Predictor``.
"""
from .clip_trunk import CLIP_BACKBONE, MASKCLIP_HEAD, CLIPTrunk, MaskCLIPHead
from .heads import (BACKBONES, HEADS, BackboneWeightsUnavailable, ResNetBackbone, load_backbone_weights, make_head,
                    make_resnet)
from .calibration import (PENALTY_GRID, CalibrationCounts, SeenPenaltyChoice, calibration_counts, check_penalty,
                          choose_seen_penalty, empty_counts, seen_mask, stack_seen)
from .checkpoint import (FORMAT, FORMAT_VERSION, LoadedStudent, StudentMeta, clip_spec_of, load_student,
                         read_student_meta, save_student, set_seen_penalty)
from .net import StudentConfig, StudentNet, fuse_views
from .predictor import StudentPredictor

__all__ = ["CLIP_BACKBONE", "MASKCLIP_HEAD", "CLIPTrunk", "MaskCLIPHead",
           "BACKBONES", "HEADS", "BackboneWeightsUnavailable", "ResNetBackbone", "load_backbone_weights", "make_head",
           "make_resnet", "FORMAT", "FORMAT_VERSION", "LoadedStudent", "StudentConfig", "StudentMeta", "StudentNet",
           "fuse_views", "load_student", "read_student_meta", "save_student", "set_seen_penalty", "StudentPredictor",
           "PENALTY_GRID", "CalibrationCounts", "SeenPenaltyChoice", "calibration_counts", "check_penalty",
           "choose_seen_penalty", "clip_spec_of",
           "empty_counts", "seen_mask", "stack_seen"]
