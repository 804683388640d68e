"""Tiny random-weight CLIP models for tests and CPU smoke runs (no download involved)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .clip_backbone import ClipSpec, FrozenCLIP, load_clip, register_model_config

TINY_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},
    "text_cfg": {"context_length": 48, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


# A tiny ViT: patch 8 (64 px → an 8×8 grid), width 64, 2 layers, 4 heads; the text tower is TINY_CONFIG's.
TINY_VIT_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 8, "head_width": 16},
    "text_cfg": TINY_CONFIG["text_cfg"],
}


def tiny_config_file(folder: str | Path, name: str = "mvpseg-tiny", config: dict | None = None) -> Path:
    """Writes ``config`` (default TINY_CONFIG) as ``<folder>/<name>.json`` and returns the path."""
    path = Path(folder) / f"{name}.json"
    path.write_text(json.dumps(config or TINY_CONFIG))
    return path


def tiny_clip(seed: int = 0, device: str = "cpu", name: str = "mvpseg-tiny") -> FrozenCLIP:
    """A deterministic random-weight tiny CLIP (ModifiedResNet [1,1,1,1] width 16, text 64×2, context 48)."""
    return _tiny(name, TINY_CONFIG, seed, device)


def tiny_vit_clip(seed: int = 0, device: str = "cpu", name: str = "mvpseg-tiny-vit", dense_mode: str | None = None,
                  sliding: tuple[int, int] | None = None) -> FrozenCLIP:
    """A deterministic random-weight tiny ViT CLIP (TINY_VIT_CONFIG) with the given dense settings."""
    return _tiny(name, TINY_VIT_CONFIG, seed, device, dense_mode=dense_mode, sliding=sliding)


def _tiny(name: str, config: dict, seed: int, device: str, **dense) -> FrozenCLIP:
    # The config goes straight to open_clip under ``name`` (the copy load_clip would make of a config file), so
    # no file of ours is written for it: a process that builds many tiny CLIPs leaves nothing in the temp folder.
    register_model_config(name, config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return load_clip(ClipSpec(model_name=name, pretrained=None, **dense), device=device)


def write_tiny_vit_clip(folder: str | Path, seed: int = 0, name: str = "mvpseg-tiny-vit") -> list[str]:
    """Saves the tiny ViT CLIP (config JSON + safetensors weights) to ``folder``; returns the CLI arguments
    that load it (``--clip … --model-config … --pretrained …``)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clip = tiny_vit_clip(seed=seed, name=name)
    weights = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()}, str(weights))
    cfg = tiny_config_file(folder, name=name, config=TINY_VIT_CONFIG)
    return ["--clip", name, "--model-config", str(cfg), "--pretrained", str(weights)]
