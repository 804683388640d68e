"""MVPSeg: a frozen CLIP plus one prompt set, the unit that training, evaluation and the predictor share."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .clip_backbone import FrozenCLIP
from .heads import MVPSegOutput, apply_prompts
from .losses import IGNORE_INDEX, LossWeights, compute_losses
from .prompts import LearnedPrompts, PromptSet, TextViews


class MVPSeg(nn.Module):
    """Frozen CLIP (image + text towers) and a prompt set; only the prompt set's parameters can learn.

    ``gamma`` is the constant spatial-softmax scale of GPR (Eq. 6, paper: 10).
    """

    def __init__(self, clip: FrozenCLIP, prompts: PromptSet, gamma: float = 10.0) -> None:
        super().__init__()
        self.clip = clip
        self.prompts = prompts
        self.gamma = float(gamma)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.prompts.parameters() if p.requires_grad]

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images B×3×H×W → frozen dense features B×D×h×w (never tracked by autograd)."""
        return self.clip.dense_features(images)

    def text_features(self, class_names: Sequence[str]) -> TextViews:
        """Vocabulary (C names) → TextViews; gradients flow into learnable prompt vectors."""
        return self.prompts.encode(self.clip, class_names)

    def head(self, features: torch.Tensor, text: TextViews) -> MVPSegOutput:
        return apply_prompts(features, text, self.prompts, self.gamma)

    def forward(self, images: torch.Tensor, class_names: Sequence[str]) -> MVPSegOutput:
        return self.head(self.image_features(images), self.text_features(class_names))

    def losses(self, out: MVPSegOutput, labels: torch.Tensor, weights: LossWeights = LossWeights(),
               cls_mode: str = "bce", ignore_index: int = IGNORE_INDEX,
               seg_reduction: str = "pixel") -> dict[str, torch.Tensor]:
        """Eq. 10 terms for labels B×H×W whose values index the vocabulary (ignore_index elsewhere)."""
        seg_ctx = self.prompts.seg_ctx if isinstance(self.prompts, LearnedPrompts) else None
        return compute_losses(out, labels, seg_ctx, weights, cls_mode, ignore_index, seg_reduction)
