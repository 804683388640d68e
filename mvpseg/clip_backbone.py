"""Loading a frozen open_clip CLIP model and exposing the pieces MVP-SEG needs.

Weights come from an open_clip pretrained tag (``RN50`` / ``openai``), a local checkpoint file,
``hf-hub:org/repo`` or a custom JSON config (the offline toy model). When weights cannot be had we fail
fast with one message that lists every way to provide them, instead of letting the hub client retry
for a minute.
"""
from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

import open_clip

from .dense import DENSE_MODES
from .dense_settings import DenseSettings, SlidingLike, compute_dense, parse_sliding, resolve_dense
from .text_encoder import encode_token_embeddings

log = logging.getLogger(__name__)

# mmseg's ImageNet statistics (MaskCLIP's configs) and CLIP's own, in 0..1 pixel units.
NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}
# Keys of an open_clip model config; anything else in a JSON config (our metadata) is stripped.
_OPEN_CLIP_CFG_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "cast_dtype", "custom_text",
                       "init_logit_scale", "init_logit_bias", "nonscalar_logit_scale"}


class ClipWeightsUnavailable(RuntimeError):
    """Pretrained CLIP weights are neither cached nor downloadable from here."""


class ClipWeightsError(ValueError):
    """A local CLIP weights file is corrupt, truncated, a pickle, or not weights of the requested model."""


@dataclass(frozen=True)
class ClipSpec:
    """Which CLIP to load.

    model_name: open_clip name (``RN50``, ``RN101``, ``RN50x4``, ``ViT-B-16`` …), ``hf-hub:org/repo``, or the
        name of a custom config given in ``model_config``.
    pretrained: an open_clip tag (``openai``), a local checkpoint file, or ``None`` for random weights.
    cache_dir: where downloaded weights are (or will be) kept.
    model_config: path to a JSON open_clip model config (optionally with an ``mvpseg`` metadata block), for
        models that open_clip does not ship, such as the bundled toy model.
    normalization: ``"imagenet"`` (default: MaskCLIP's mmseg configs use ImageNet mean/std), ``"clip"``, or
        ``None`` to take it from the config's ``mvpseg.normalization`` entry, else from a local .safetensors
        weights file's ``normalization`` header entry, else imagenet (with a warning for a custom config).
    dense_mode: dense-feature mode (``mvpseg.dense.DENSE_MODES``); None: the tower's default (maskclip for a
        ResNet, maskclip-vit for a ViT). Checked against the tower when the CLIP is loaded.
    sliding: (window, stride) in pixels for sliding-window dense features, None: the whole image at once.
    """

    model_name: str = "RN50"
    pretrained: str | None = "openai"
    cache_dir: str | None = None
    model_config: str | None = None
    normalization: str | None = None
    dense_mode: str | None = None
    sliding: tuple[int, int] | None = None

    def describe(self) -> str:
        return f"{self.model_name} ({self.pretrained or 'random weights'})"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ClipSpec":
        """From the flags of ``add_clip_args`` ('none' / 'random' as --pretrained mean random weights)."""
        pre = None if str(args.pretrained).lower() in ("none", "random", "") else args.pretrained
        return cls(args.clip, pre, args.cache_dir, args.model_config, getattr(args, "normalization", None),
                   getattr(args, "dense", None), getattr(args, "sliding", None))


def add_clip_args(parser: argparse.ArgumentParser, clip_help: str = "") -> None:
    """The CLIP-selection flags shared by the CLI, the training scripts and the demo."""
    g = parser.add_argument_group("CLIP")
    g.add_argument("--clip", default="RN50", help=clip_help or
                   "open_clip model name (RN50, RN101, RN50x4, ViT-B-16, …), hf-hub:org/repo, or a custom config's name")
    g.add_argument("--pretrained", default="openai",
                   help="open_clip tag, a local checkpoint file, or 'none' for random weights")
    g.add_argument("--model-config", default=None, help="JSON open_clip config of a custom model (e.g. the toy model)")
    g.add_argument("--cache-dir", default=None, help="where pretrained CLIP weights are (or will be) cached")
    g.add_argument("--normalization", default=None, choices=sorted(NORMALIZATIONS),
                   help="input mean/std (default: imagenet, as MaskCLIP's configs)")
    g.add_argument("--dense", default=None, choices=DENSE_MODES, metavar="{" + ",".join(DENSE_MODES) + "}",
                   help="dense-feature mode (default: maskclip for a ResNet, maskclip-vit for a ViT; sclip, "
                        "clearclip, naclip: ViT only)")
    g.add_argument("--sliding", default=None, type=parse_sliding, metavar="WINDOW/STRIDE",
                   help="sliding-window dense features, e.g. 224/112 (multiples of the tower's stride: 32 for "
                        "a ResNet, the patch size for a ViT); default: the whole image at once")


def _read_config(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Returns (open_clip model cfg, mvpseg metadata) from a JSON config file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"CLIP model config not found: {p}")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"CLIP model config {p} is not valid JSON: {e}") from e
    cfg = raw.get("model_cfg", raw)
    meta = raw.get("mvpseg", {})
    missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(cfg)
    if missing:
        raise ValueError(f"CLIP model config {p} lacks {sorted(missing)}")
    return {k: v for k, v in cfg.items() if k in _OPEN_CLIP_CFG_KEYS}, meta


_CONFIG_DIR: Path | None = None


def register_model_config(name: str, cfg: dict[str, Any]) -> None:
    """Makes ``cfg`` available to open_clip's factory (model + tokenizer) under ``name``."""
    global _CONFIG_DIR
    if _CONFIG_DIR is None:
        _CONFIG_DIR = Path(tempfile.mkdtemp(prefix="mvpseg_cfg_"))
        # open_clip reads configs from a folder; ours holds copies only, so it goes with the process
        atexit.register(shutil.rmtree, _CONFIG_DIR, ignore_errors=True)
        open_clip.add_model_config(_CONFIG_DIR)
    (_CONFIG_DIR / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(_CONFIG_DIR)  # rescans the folder


def _offline_message(spec: ClipSpec, reason: str) -> str:
    return (
        f"Cannot load CLIP weights {spec.describe()}: {reason}.\n"
        "Provide them in one of these ways:\n"
        "  1. run once on a connected machine (weights land in the cache), then copy the cache here and pass "
        "--cache-dir DIR (or set HF_HOME);\n"
        "  2. download the checkpoint file yourself and pass its path: --pretrained /path/to/RN50.pt "
        "(or .safetensors / open_clip_pytorch_model.bin);\n"
        "  3. use 'hf-hub:org/repo' with a populated Hugging Face cache;\n"
        "  4. for a quick offline try, use the bundled toy model: --clip toyclip "
        "--model-config assets/toyclip/toyclip.json --pretrained assets/toyclip/toyclip.safetensors."
    )


def _network_available(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") or os.environ.get("MVPSEG_OFFLINE"):
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _tag_is_cached(model_name: str, tag: str, cache_dir: str | None) -> bool:
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        return False
    if "file" in cfg:
        return Path(cfg["file"]).is_file()
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
        for fname in ([filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]):
            hit = try_to_load_from_cache(repo, fname, cache_dir=cache_dir)
            if isinstance(hit, str):
                return True
    url = cfg.get("url", "")
    if url:
        folder = Path(cache_dir) if cache_dir else Path("~/.cache/clip").expanduser()
        if (folder / os.path.basename(url)).is_file():
            return True
    return False


def _check_weights_reachable(spec: ClipSpec) -> None:
    """Raises ClipWeightsUnavailable at once when a download would be needed but cannot happen."""
    name, pre = spec.model_name, spec.pretrained
    if name.startswith("hf-hub:"):
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(name[len("hf-hub:"):], "open_clip_config.json", cache_dir=spec.cache_dir)
        if not isinstance(hit, str) and not _network_available():
            raise ClipWeightsUnavailable(_offline_message(spec, "the Hugging Face Hub is unreachable and the repo "
                                                               "is not in the cache"))
        return
    if pre is None or Path(pre).is_file():
        return
    if open_clip.get_pretrained_cfg(name, pre):
        if not _tag_is_cached(name, pre, spec.cache_dir) and not _network_available():
            raise ClipWeightsUnavailable(_offline_message(spec, "they are not in the cache and no network is "
                                                               "reachable"))
        return
    tags = open_clip.list_pretrained_tags_by_model(name)
    raise ClipWeightsUnavailable(_offline_message(
        spec, f"'{pre}' is neither an existing file nor a known tag (tags for {name}: {tags or 'none'})"))


def _fingerprint(model: nn.Module) -> str:
    """Short hash of the text tower's weights: a prompt checkpoint is only valid for these exact weights."""
    h = hashlib.sha1()
    for t in (model.token_embedding.weight, model.positional_embedding):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes()[: 1 << 20])
    return h.hexdigest()[:16]


class FrozenCLIP(nn.Module):
    """A frozen open_clip model with MaskCLIP dense image features and exact truncated text encoding.

    Both towers are in eval mode with ``requires_grad=False``; ``train()`` calls are ignored so that
    BatchNorm statistics never move. Nothing of this module is stored in prompt checkpoints.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, spec: ClipSpec, normalization: str | Sequence) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.spec = spec
        mean, std = NORMALIZATIONS[normalization] if isinstance(normalization, str) else normalization
        self.normalization = normalization if isinstance(normalization, str) else "custom"
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.embed_dim = int(model.text_projection.shape[-1] if isinstance(model.text_projection, torch.Tensor)
                             else model.text_projection.out_features)
        self.text_width = int(model.token_embedding.weight.shape[1])
        self.context_length = int(model.positional_embedding.shape[0])
        self.fingerprint = _fingerprint(model)
        # Dense inference settings: an explicit mode is validated now (a clear error at load time); without one
        # a tower that has no dense path (e.g. a timm tower) still loads, and fails only if asked for features.
        self.dense: DenseSettings | None = None
        if spec.dense_mode is not None or spec.sliding is not None or _has_dense_path(self.model.visual):
            self.dense = resolve_dense(self.model.visual, spec.dense_mode, spec.sliding)

    @property
    def dense_mode(self) -> str | None:
        """The dense-feature mode ``dense_features`` uses by default (None: this tower has none)."""
        return None if self.dense is None else self.dense.mode

    @property
    def sliding(self):
        """The default ``SlidingWindow`` (None: whole image)."""
        return None if self.dense is None else self.dense.sliding

    def dense_settings(self, mode: str | None = None, sliding: SlidingLike = None) -> DenseSettings:
        """Validated settings for this tower (mode None: the tower's default); ValueError names valid ones."""
        return resolve_dense(self.model.visual, mode, sliding)

    @cached_property
    def text_fingerprint(self) -> str:
        """Digest of every text-tower tensor (all bytes, names, dtypes, shapes), computed once on first use
        (≈ 0.1 s for RN50): text-embedding caches key on it. ``fingerprint`` (prompt checkpoints) samples
        only the embeddings and stays as it is so that existing checkpoints keep loading."""
        from .util import digest

        tensors = {n: t for n, t in list(self.model.named_parameters()) + list(self.model.named_buffers())
                   if not n.startswith("visual.") and n not in ("logit_scale", "logit_bias")}
        return digest((type(self.model).__qualname__,), tensors)

    def train(self, mode: bool = True) -> "FrozenCLIP":  # noqa: D401 - frozen on purpose
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """B×3×H×W float in [0, 1] → normalised model input."""
        return (images - self.pixel_mean) / self.pixel_std

    @torch.no_grad()
    def dense_features(self, images: torch.Tensor, settings: DenseSettings | None = None) -> torch.Tensor:
        """Normalised images B×3×H×W → dense features B×D×h×w (h = H/32 for ResNets, H/p for a ViT), with
        ``settings`` or else this CLIP's own (``self.dense``). Unit norm over D, except that a sliding-window
        average of unit vectors is not re-normalised (``mvpseg.dense.sliding``)."""
        settings = settings or self.dense or self.dense_settings()  # the last raises for an unsupported tower
        return compute_dense(self.model.visual, images, settings)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts → token ids N×context_length (on the model's device)."""
        return self.tokenizer(list(texts)).to(self.device)

    def token_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids N×L → embeddings N×L×W (frozen)."""
        return self.model.token_embedding(tokens)

    def encode_embeddings(self, x: torch.Tensor, eot: torch.Tensor, chunk_size: int | None = None,
                          truncate: bool = True) -> torch.Tensor:
        """Prompt embeddings N×L×W with EOT positions N → text features N×D (not normalised)."""
        return encode_token_embeddings(self.model, x, eot, chunk_size=chunk_size, truncate=truncate)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], chunk_size: int | None = 256) -> torch.Tensor:
        """Plain sentences → unit-norm text features N×D (truncated exactly to each chunk's longest text)."""
        tokens = self.tokenize(texts)
        feats = self.encode_embeddings(self.token_embeddings(tokens), tokens.argmax(-1), chunk_size=chunk_size)
        return nn.functional.normalize(feats.float(), dim=-1)

    def set_text_checkpointing(self, enable: bool) -> None:
        """Activation checkpointing in the text transformer: trades compute for memory on big vocabularies."""
        self.model.transformer.grad_checkpointing = enable


def _has_dense_path(visual: nn.Module) -> bool:
    try:
        resolve_dense(visual)
        return True
    except NotImplementedError:
        return False


def _weights_error(spec: "ClipSpec", e: BaseException) -> ClipWeightsError:
    return ClipWeightsError(f"cannot load CLIP weights {spec.pretrained} for {spec.model_name}: the file is corrupt, "
                            f"truncated, a pickle or weights of another model ({type(e).__name__}); give a "
                            ".safetensors file or a weights-only torch checkpoint of this model")


def _header_normalization(pretrained: str | None) -> str | None:
    """The ``normalization`` entry of a local .safetensors weights file's header (how the toy CLIPs record
    it, their configs staying plain open_clip), or None."""
    if not pretrained or not pretrained.endswith(".safetensors") or not Path(pretrained).is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(pretrained, "pt") as f:
            return (f.metadata() or {}).get("normalization")
    except Exception:  # an unreadable file is reported by the weights loader, with its own message
        return None


def load_clip(spec: ClipSpec = ClipSpec(), device: str | torch.device = "cpu") -> FrozenCLIP:
    """Creates the frozen CLIP described by ``spec`` on ``device``.

    Raises ClipWeightsUnavailable (with instructions) when pretrained weights cannot be obtained.
    """
    meta: dict[str, Any] = {}
    if spec.model_config is not None:
        cfg, meta = _read_config(spec.model_config)
        register_model_config(spec.model_name, cfg)
    if spec.pretrained is not None and not spec.model_name.startswith("hf-hub:"):
        looks_like_path = os.sep in spec.pretrained or Path(spec.pretrained).suffix != ""
        if looks_like_path and not Path(spec.pretrained).is_file():
            raise FileNotFoundError(f"CLIP checkpoint file not found: {spec.pretrained}")
    _check_weights_reachable(spec)
    tag_cfg = (open_clip.get_pretrained_cfg(spec.model_name, spec.pretrained)
               if spec.pretrained and not spec.model_name.startswith("hf-hub:") else {})
    try:
        model = open_clip.create_model(
            spec.model_name, pretrained=spec.pretrained, cache_dir=spec.cache_dir, device=device,
            force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)) if tag_cfg else False,
        )
    except RuntimeError as e:
        if "not found in built-ins" in str(e):
            raise ValueError(f"Unknown CLIP model '{spec.model_name}'. Pass --model-config for a custom model; "
                             f"open_clip knows e.g. RN50, RN101, RN50x4, ViT-B-16.") from e
        if "download" in str(e).lower() or "hub" in str(e).lower():
            raise ClipWeightsUnavailable(_offline_message(spec, str(e).splitlines()[0])) from e
        if spec.pretrained and Path(spec.pretrained).is_file():
            raise _weights_error(spec, e) from e
        raise
    except Exception as e:  # a local file torch / safetensors cannot read (never retried without weights_only)
        if spec.pretrained and Path(spec.pretrained).is_file():
            raise _weights_error(spec, e) from e
        raise
    tokenizer = open_clip.get_tokenizer(spec.model_name, cache_dir=spec.cache_dir)
    norm = spec.normalization or meta.get("normalization") or _header_normalization(spec.pretrained)
    if norm is None:
        norm = "imagenet"
        if spec.model_config is not None and spec.pretrained is not None:
            # A custom CLIP's input statistics cannot be guessed, and the wrong ones cost most of the accuracy
            # without any error (25.0 → 6.5 unseen mIoU measured): say which were assumed and how to change them.
            log.warning("neither the CLIP model config %s nor its weights file say which input normalisation it "
                        "was pretrained with; assuming ImageNet mean/std. If it used CLIP's own statistics, pass "
                        "--normalization clip (ClipSpec(normalization='clip')), or record it: a \"mvpseg\": "
                        "{\"normalization\": …} entry in the config or \"normalization\" in the safetensors "
                        "header.", Path(spec.model_config).name)
    if isinstance(norm, str) and norm not in NORMALIZATIONS:
        raise ValueError(f"Unknown normalization '{norm}'; choose from {sorted(NORMALIZATIONS)}")
    return FrozenCLIP(model, tokenizer, spec, norm).to(device)
