"""Captions of toy-world crops for contrastive pretraining: they name the clearly visible classes, unseen ones
included (like web captions), in one of three styles — how the pretraining captions of different CLIPs differ."""
from __future__ import annotations

import numpy as np
import torch

from .world import (CLASS_NAMES, OBJECT_NAMES, PRETRAIN_CONFIG, WorldConfig, magnify, render, sample_rng,
                    sample_scene, visible_classes)

CAPTION_STYLES = ("templates", "terse", "verbose")


_OBJ_T = ("a photo of {o}.", "{o}.", "there is {o} in the scene.", "a picture of {o}.", "this is {o}.",
          "a drawing of {o}.", "a close-up photo of {o}.", "a cartoon of {o}.")
_MIX_T = ("{o} on {s}.", "a photo of {o} on {s}.", "{o} next to {s}.", "{s} with {o}.",
          "a picture of {o} and {s}.", "there is {o} near the {s}.")
_STUFF_T = ("a photo of {s}.", "{s}.", "a patch of {s}.", "a texture of {s}.", "a photo of the {s}.")
_BG_T = ("a photo of the background.", "a plain background.", "an empty background.")


# Class-free filler words. Real captions have every length up to the context size, so CLIP's text
# tower learns all positions; ours are short, so a random preamble sometimes moves the names as far
# right as a learned 32-token context will (without it positions > ~21 stay at their random init).
_FILLER = ("a", "the", "photo", "picture", "image", "of", "this", "is", "in", "scene", "bright", "dark",
           "small", "large", "nice", "cool", "clean", "dirty", "blurry", "cropped", "good", "bad", "drawing",
           "rendering", "sketch", "painting", "cartoon", "toy", "art", "one", "my", "here", "there", "we",
           "see", "look", "at", "with", "some", "view", "shot", "simple", "old", "new", "little", "big")
_MAX_WORDS = 42  # ≈ tokens: stays inside a 48-token context with SOT, EOT and punctuation


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]



def caption(classes: list[int], rng: np.random.Generator, background_share: float = 0.0,
            style: str = "templates") -> str:
    """A caption naming ``classes`` (indices into CLASS_NAMES) in a random order: ``style`` "templates" (the
    bundled toy CLIPs': varied sentences, sometimes a filler preamble), "terse" (alt-text tags: the names alone,
    "red cat, grass.") or "verbose" (a template always behind a filler preamble) — pretraining captions differ
    between real CLIPs in just this way. "templates" draws exactly as before styles existed."""
    if style not in CAPTION_STYLES:
        raise ValueError(f"unknown caption style {style!r}; choose one of {CAPTION_STYLES}")
    if style == "terse":
        names = [CLASS_NAMES[c] for c in rng.permutation([c for c in classes if c != 0])]
        return (", ".join(names) if names else "background") + "."
    objs = [f"a {CLASS_NAMES[c]}" for c in rng.permutation([c for c in classes if c in range(1, 1 + len(OBJECT_NAMES))])]
    stuff = [CLASS_NAMES[c] for c in rng.permutation([c for c in classes if c > len(OBJECT_NAMES)])]
    def pick(ts: tuple[str, ...]) -> str:
        return ts[int(rng.integers(len(ts)))]

    if objs and stuff:
        text = pick(_MIX_T).format(o=_join(objs), s=_join(stuff))
    elif objs:
        text = pick(_OBJ_T).format(o=_join(objs))
    elif stuff:
        text = pick(_STUFF_T).format(s=_join(stuff))
    else:
        return pick(_BG_T)
    if background_share > 0.3 and rng.random() < 0.5:
        text = text[:-1] + " on a plain background."
    room = _MAX_WORDS - len(text.replace(",", " ,").split())
    if room > 0 and (rng.random() < 0.5 or style == "verbose"):
        words = rng.choice(_FILLER, size=int(rng.integers(1, room + 1)))
        text = " ".join(words) + ": " + text
    return text


class CaptionedToyWorld(torch.utils.data.Dataset):
    """(image, caption) pairs for contrastive pretraining: small crops (``PRETRAIN_CONFIG``) whose
    caption names the clearly visible classes, *including unseen ones* (like web captions)."""

    def __init__(self, length: int, seed: int = 0, config: WorldConfig = PRETRAIN_CONFIG,
                 split: str = "pretrain", style: str = "templates") -> None:
        if style not in CAPTION_STYLES:
            raise ValueError(f"unknown caption style {style!r}; choose one of {CAPTION_STYLES}")
        self.length, self.seed, self.config, self.split, self.style = int(length), int(seed), config, split, style

    def __len__(self) -> int:
        return self.length

    def item(self, index: int) -> tuple[np.ndarray, str, list[int]]:
        """``(image H×W×3 uint8, caption, visible class indices)`` of sample ``index``."""
        rng = sample_rng(self.seed, self.split, index)
        scene = sample_scene(rng, self.config)
        r = render(scene)
        classes = visible_classes(scene, r)
        return magnify(r.image, self.config.zoom), caption(classes, rng, float((r.label == 0).mean()),
                                                                   self.style), classes

    def __getitem__(self, index: int) -> tuple[np.ndarray, str]:
        image, text, _ = self.item(index)
        return image, text
