"""mvpseg: MVP-SEG multi-view prompt learning for open-vocabulary semantic segmentation (frozen CLIP)."""
from .builder import TOY_CLIP_SPEC, baseline_prompt_sets, build_mvpseg, build_predictor, resolve_device
from .checkpoint import CheckpointError, load_prompts, save_prompts
from .clip_backbone import ClipSpec, ClipWeightsError, ClipWeightsUnavailable, FrozenCLIP, load_clip
from .handcrafted import PartPrompts, TemplatePrompts
from .heads import MVPSegOutput
from .image_io import ImageError, load_image
from .losses import LossWeights
from .model import MVPSeg
from .predictor import Prediction, Predictor, VocabularyError, parse_vocabulary
from .prompts import LearnedPrompts, PromptSet, TextViews
from .student import (LoadedStudent, StudentConfig, StudentNet, StudentPredictor, fuse_views, load_student,
                      save_student)

__version__ = "0.1.0"
__all__ = [
    "TOY_CLIP_SPEC", "baseline_prompt_sets", "build_mvpseg", "build_predictor", "resolve_device",
    "CheckpointError", "load_prompts", "save_prompts", "ClipSpec", "ClipWeightsError", "ClipWeightsUnavailable",
    "FrozenCLIP",
    "load_clip", "PartPrompts", "TemplatePrompts", "MVPSegOutput", "ImageError", "load_image", "LossWeights",
    "MVPSeg", "Prediction", "Predictor", "VocabularyError", "parse_vocabulary", "LearnedPrompts", "PromptSet",
    "TextViews", "__version__",
]
__all__ += ["LoadedStudent", "StudentConfig", "StudentNet", "StudentPredictor", "fuse_views", "load_student",
            "save_student"]
