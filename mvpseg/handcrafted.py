"""Handcrafted prompt sets behind the same interface as learned prompts.

* ``TemplatePrompts.maskclip85()`` – MaskCLIP's baseline: the 80 CLIP ImageNet templates + 5 scene templates;
  per class every template is encoded and L2-normalised, the embeddings are averaged and renormalised.
* ``TemplatePrompts.single()`` – the single template "a photo of a {}.".
* ``PartPrompts()`` – the paper's part-based views ("the head of {}", "the leg of {}", "the tail of {}"), one
  view per template, shown per view like learned prompts.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .clip_backbone import FrozenCLIP
from .prompts import PromptSet, TextViews

IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)
SCENE_TEMPLATES: tuple[str, ...] = (
    "there is a {} in the scene.", "there is the {} in the scene.", "this is a {} in the scene.",
    "this is the {} in the scene.", "this is one {} in the scene.",
)
MASKCLIP_TEMPLATES: tuple[str, ...] = IMAGENET_TEMPLATES + SCENE_TEMPLATES
PART_TEMPLATES: tuple[str, ...] = ("the head of {}.", "the leg of {}.", "the tail of {}.")

CLIP_LOGIT_SCALE = 100.0


class _HandcraftedBase(PromptSet):
    """Frozen text embeddings; nothing to learn. Subclasses list their views as tuples of templates."""

    def __init__(self, views: Sequence[Sequence[str]], view_names: Sequence[str], name: str,
                 chunk_size: int = 256) -> None:
        super().__init__()
        for tpls in views:
            for t in tpls:
                if t.count("{}") != 1:
                    raise ValueError(f"template must contain exactly one '{{}}': {t!r}")
        self.views = tuple(tuple(v) for v in views)
        self.view_names = tuple(view_names)
        self.name = name
        self.chunk_size = chunk_size
        # the last few vocabularies' embeddings: nothing here is learned, and one set is often asked for the same
        # vocabulary several times (the anchor's targets, the residual form's base, a validation score), which
        # costs 85 text passes per class each time with the MaskCLIP templates
        self._encoded: dict[tuple, TextViews] = {}

    def text_identity(self) -> tuple[tuple, dict[str, torch.Tensor]]:
        """The templates of every view (nothing learned)."""
        return (type(self).__qualname__, self.views, self.view_names), {}

    def name_token_budget(self, clip: FrozenCLIP) -> int:
        """Tokens a class name may take so that every template still fits CLIP's context (SOT, EOT)."""
        longest = max(len(clip.tokenizer.encode(t.replace("{}", ""))) for tpls in self.views for t in tpls)
        return clip.context_length - 2 - longest

    def tau1(self) -> float:
        # A temperature-100 softmax (CLIP's logit scale) over the mean of the K views.
        return CLIP_LOGIT_SCALE / len(self.views)

    @torch.no_grad()
    def encode(self, clip: FrozenCLIP, class_names: Sequence[str]) -> TextViews:
        """C names → seg K×C×D: per view, the renormalised mean of its normalised template embeddings (kept for
        the last few vocabularies per CLIP and device)."""
        names = tuple(class_names)
        key = (names, str(clip.device), clip.fingerprint)
        if key not in self._encoded:
            if len(self._encoded) >= 4:
                self._encoded.pop(next(iter(self._encoded)))
            self._encoded[key] = self._encode(clip, names)
        return self._encoded[key]

    def _encode(self, clip: FrozenCLIP, names: tuple[str, ...]) -> TextViews:
        sentences = [t.format(n) for tpls in self.views for t in tpls for n in names]
        feats = clip.encode_text(sentences, chunk_size=self.chunk_size)  # (ΣT·C)×D, unit norm
        out, start = [], 0
        for tpls in self.views:
            block = feats[start:start + len(tpls) * len(names)].view(len(tpls), len(names), -1)
            out.append(F.normalize(block.mean(0), dim=-1))
            start += len(tpls) * len(names)
        return TextViews(torch.stack(out), None, self.view_names, names)


class TemplatePrompts(_HandcraftedBase):
    """One view averaged over a list of templates."""

    def __init__(self, templates: Sequence[str], name: str = "templates", view_name: str = "templates") -> None:
        super().__init__([templates], [view_name], name)

    @classmethod
    def maskclip85(cls) -> "TemplatePrompts":
        return cls(MASKCLIP_TEMPLATES, name="maskclip-85", view_name="85 templates")

    @classmethod
    def single(cls) -> "TemplatePrompts":
        return cls(("a photo of a {}.",), name="a-photo-of", view_name="a photo of a {}.")


class PartPrompts(_HandcraftedBase):
    """One view per template: the paper's handcrafted part-based multi-view prompts (Table 2)."""

    def __init__(self, templates: Sequence[str] = PART_TEMPLATES, name: str = "parts") -> None:
        names = [t.replace("{}", "…").rstrip(".") for t in templates]
        super().__init__([[t] for t in templates], names, name)


# The handcrafted sets by name (what prompt checkpoints in residual form record as their prior).
HANDCRAFTED_SETS = {"maskclip-85": TemplatePrompts.maskclip85, "parts": PartPrompts,
                    "a-photo-of": TemplatePrompts.single}


def handcrafted_set(name: str) -> _HandcraftedBase:
    """A fresh handcrafted set by name: "maskclip-85", "parts" or "a-photo-of"."""
    if name not in HANDCRAFTED_SETS:
        raise ValueError(f"unknown handcrafted prompt set {name!r}; choose from {', '.join(HANDCRAFTED_SETS)}")
    return HANDCRAFTED_SETS[name]()
