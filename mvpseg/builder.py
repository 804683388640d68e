"""Builders: the one place that turns names and paths into a ready model or predictor."""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import load_prompts
from .clip_backbone import ClipSpec, FrozenCLIP, load_clip
from .dense_settings import DenseSettings
from .handcrafted import HANDCRAFTED_SETS, handcrafted_set
from .hub import resolve_checkpoint
from .model import MVPSeg
from .predictor import Predictor
from .prompts import LearnedPrompts, PromptSet

REPO_ROOT = Path(__file__).resolve().parent.parent
TOY_CLIP_SPEC = ClipSpec(model_name="toyclip", pretrained=str(REPO_ROOT / "assets/toyclip/toyclip.safetensors"),
                         model_config=str(REPO_ROOT / "assets/toyclip/toyclip.json"))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto'/None → cuda when available, else cpu; a requested but missing CUDA is an error, not a fallback."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but no CUDA device is available")
    return dev


def baseline_prompt_sets() -> dict[str, PromptSet]:
    """The handcrafted sets: MaskCLIP's 85 templates, the part-based views and the single template."""
    return {name: handcrafted_set(name) for name in HANDCRAFTED_SETS}


def build_mvpseg(clip: ClipSpec | FrozenCLIP = ClipSpec(), n_seg: int = 3, n_ctx: int = 32, use_global: bool = True,
                 checkpoint: str | None = None, gamma: float = 10.0, device: str | None = "cpu") -> MVPSeg:
    """A trainable MVPSeg: fresh learned prompts, or those of ``checkpoint`` (a file or ``hf-hub:ORG/REPO``,
    checked against the CLIP)."""
    frozen = clip if isinstance(clip, FrozenCLIP) else load_clip(clip, resolve_device(device))
    if checkpoint is not None:
        prompts: PromptSet = load_prompts(resolve_checkpoint(checkpoint), frozen)
        gamma = prompts.meta.gamma
    else:
        prompts = LearnedPrompts(frozen.text_width, n_seg=n_seg, n_ctx=n_ctx, use_global=use_global)
    return MVPSeg(frozen, prompts.to(frozen.device), gamma=gamma)


def build_predictor(clip: ClipSpec | FrozenCLIP = ClipSpec(), checkpoints: dict[str, str] | None = None,
                    baselines: bool = True, device: str | None = "cpu", short_side: int = 512,
                    max_long_side: int = 2048, text_cache_dir: str | Path | None = None,
                    dense: DenseSettings | None = None, pamr: bool = False, check_dense: bool = True) -> Predictor:
    """A Predictor with the learned prompt sets in ``checkpoints`` (name → path or ``hf-hub:ORG/REPO``, downloaded
    by ``mvpseg.hub``) first, then the baselines;
    ``text_cache_dir`` keeps text embeddings on disk across restarts (see ``Predictor``). ``dense``: dense mode
    and sliding window (default: the CLIP's, i.e. its spec's ``--dense``/``--sliding``); learned prompts are
    refused when they were learned with another mode (``check_dense=False``: kept when the tower offers their
    mode; ``Predictor.dense_conflict`` then tells per request). ``pamr``: refine label maps with PAMR."""
    frozen = clip if isinstance(clip, FrozenCLIP) else load_clip(clip, resolve_device(device))
    dense = dense or frozen.dense
    sets: dict[str, PromptSet] = {}
    gamma = 10.0
    for name, path in (checkpoints or {}).items():
        sets[name] = load_prompts(resolve_checkpoint(path), frozen, name=name,
                                  dense_mode=None if dense is None else dense.mode, check_dense=check_dense)
        gamma = sets[name].meta.gamma
    if baselines:
        sets.update(baseline_prompt_sets())
    return Predictor(frozen, sets, gamma=gamma, short_side=short_side, max_long_side=max_long_side,
                     text_cache_dir=text_cache_dir, dense=dense, pamr=pamr)
