"""Training-free dense CLIP features (B×D×h×w, unit norm over D) for open_clip image towers.

Modes (``DENSE_MODES``): "maskclip" (ModifiedResNet, MaskCLIP's value path of the attention pool) and, for a
VisionTransformer, "maskclip-vit", "sclip", "clearclip", "naclip" (the last block run as in each paper's
official code, see ``mvpseg.dense.vit``). ``sliding_dense_features`` averages window features on the
feature grid (``mvpseg.dense.sliding``); ``pamr`` refines masks with the image (``mvpseg.dense.pamr``).
"""
from __future__ import annotations

from .modes import DENSE_MODES, check_dense_mode, default_dense_mode, dense_features
from .pamr import pamr
from .sliding import SlidingWindow, sliding_dense_features, tower_stride

__all__ = ["DENSE_MODES", "SlidingWindow", "check_dense_mode", "default_dense_mode", "dense_features", "pamr",
           "sliding_dense_features", "tower_stride"]
