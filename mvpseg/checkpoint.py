"""Learned-prompt checkpoints: ``NAME.safetensors`` (tensors) + ``NAME.json`` (metadata). Never pickles.

The JSON records what the prompts were learned against (CLIP name, tag, text width, embedding width and a
fingerprint of the text-tower weights), k, n_ctx, the training classes and the format version. Loading is
strict: missing/extra tensors, wrong shapes, or a CLIP that differs from the one recorded are refused with
a message that says what differs.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .clip_backbone import FrozenCLIP
from .dense import default_dense_mode
from .dense_settings import DenseSettings
from .gpr_floor import GPRFloor
from .handcrafted import HANDCRAFTED_SETS, handcrafted_set
from .prompts import LearnedPrompts
from .util import atomic_write, current_umask, publish_mode  # noqa: F401 (current_umask, publish_mode: old paths)

FORMAT = "mvpseg-prompts"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is unreadable, incomplete or does not fit the loaded CLIP."""


@dataclass(frozen=True)
class PromptMeta:
    clip_model: str
    clip_pretrained: str | None
    clip_fingerprint: str
    text_width: int
    embed_dim: int
    n_seg: int
    n_ctx: int
    use_global: bool
    gamma: float = 10.0
    training_classes: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    # input statistics the prompts were learned under ("imagenet" | "clip" | "custom"); None: written before
    # it was recorded. Prompts run under other statistics lose most of their accuracy without any error.
    normalization: str | None = None
    # dense-feature mode the prompts were learned on (mvpseg.dense); None: written before it was recorded, i.e.
    # the tower's default mode. Prompts fitted to one kind of dense features do not transfer to another.
    # (The sliding window, an inference choice, is recorded in ``extra["sliding"]`` and never refused.)
    dense_mode: str | None = None
    # residual form (LearnedPrompts.set_prior): the handcrafted set the learned change is added to; None: plain
    residual_prior: str | None = None
    format: str = FORMAT
    version: int = FORMAT_VERSION

    @property
    def cls_loss(self) -> str | None:
        """The L_cls form the prompts were learned with ("paper": Eq. 7 as printed, under which the GPR scores
        stay ≈ 1; "bce"), as train_prompts records it; None when not recorded."""
        config = self.extra.get("train_config") if isinstance(self.extra, dict) else None
        return config.get("cls_mode") if isinstance(config, dict) else None


def sidecar_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """'x', 'x.safetensors' or 'x.json' → (x.safetensors, x.json)."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def read_sidecar(js: Path, fmt: str, what: str, max_version: int = FORMAT_VERSION) -> dict[str, Any]:
    """The JSON metadata of a checkpoint of format ``fmt``; CheckpointError says what is wrong with it."""
    if not js.is_file():
        raise CheckpointError(f"{what} metadata not found: {js} (a {what} checkpoint is a .safetensors file "
                              "with a .json file of the same name beside it)")
    try:
        raw = json.loads(js.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{what} metadata {js} is not valid JSON: {e}") from e
    if not isinstance(raw, dict) or raw.get("format") != fmt:
        found = raw.get("format") if isinstance(raw, dict) else None
        raise CheckpointError(f"{js} is not an mvpseg {what} checkpoint (format={found!r})")
    if int(raw.get("version", -1)) > max_version:
        raise CheckpointError(f"{js} has format version {raw['version']}; this mvpseg reads up to {max_version}")
    return raw


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], fmt: str, version: int = FORMAT_VERSION) -> None:
    """Atomic safetensors write with the format name and version in the header."""
    atomic_write(path, lambda t: save_file(tensors, str(t), metadata={"format": fmt, "version": str(version)}))


def load_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Reads tensors (never a pickle); CheckpointError for a missing or unreadable file."""
    if not path.is_file():
        raise CheckpointError(f"{what} tensors not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e


def save_prompts(path: str | os.PathLike, prompts: LearnedPrompts, clip: FrozenCLIP, gamma: float = 10.0,
                 training_classes: Sequence[str] = (), extra: dict[str, Any] | None = None,
                 dense: DenseSettings | None = None) -> Path:
    """Writes ``path`` (.safetensors) and its .json sidecar; returns the .safetensors path. ``dense``: the
    settings the prompts were learned with (default: the CLIP's)."""
    st, js = sidecar_paths(path)
    st.parent.mkdir(parents=True, exist_ok=True)
    dense = dense or clip.dense
    extra = dict(extra or {})
    extra.setdefault("sliding", None if dense is None else dense.sliding_record())
    if prompts.gpr_shifts() > 1:  # how GPR reads an image (mvpseg.gpr_shifts): an inference setting it carries
        extra["gpr_shifts"] = prompts.gpr_shifts()
    if prompts.gpr_floor() is not None:  # the floor under a fitted GPR (mvpseg.gpr_floor): three numbers
        extra["gpr_floor"] = prompts.gpr_floor().record()
    meta = PromptMeta(clip.spec.model_name, clip.spec.pretrained, clip.fingerprint, clip.text_width, clip.embed_dim,
                      prompts.n_seg, prompts.n_ctx, prompts.use_global, float(gamma), tuple(training_classes),
                      extra, normalization=clip.normalization, dense_mode=None if dense is None else dense.mode,
                      residual_prior=residual_prior_name(prompts))
    save_safetensors(st, prompts.checkpoint_tensors(), FORMAT)
    atomic_write(js, lambda t: t.write_text(json.dumps(asdict(meta), indent=2)))
    return st


def prompts_from_tensors(meta: PromptMeta, tensors: dict[str, torch.Tensor], name: str,
                         origin: str) -> LearnedPrompts:
    """A learned prompt set from its metadata and checkpoint tensors (``ctx``, ``tau1``, ``tau2``; ``ctx0`` for
    residual sets, whose handcrafted prior is read by name; ``gpr_bias`` for calibrated ones; ``gpr_adapter.*`` for
    sets with a GPR adapter), strictly: what
    prompt checkpoints and student checkpoints (which embed their teacher's prompts) both store."""
    prompts = LearnedPrompts(meta.text_width, meta.n_seg, meta.n_ctx, meta.use_global, name=name)
    if ("ctx0" in tensors) != (meta.residual_prior is not None):
        raise CheckpointError(f"{origin}: the tensors and the metadata disagree on the residual form (tensor 'ctx0' "
                              f"{'present' if 'ctx0' in tensors else 'absent'}, residual_prior "
                              f"{meta.residual_prior!r})")
    try:
        prompts.load_checkpoint_tensors(tensors)
        adapter = prompts.gpr_adapter()
        if adapter is not None and adapter.dim != meta.embed_dim:
            raise ValueError(f"its GPR adapter reads {adapter.dim}-dimensional features, the metadata's CLIP "
                             f"embeds {meta.embed_dim}")
        if meta.residual_prior is not None:
            prompts.set_prior(handcrafted_set(meta.residual_prior), rebase=False)
        extra = meta.extra if isinstance(meta.extra, dict) else {}
        shifts = extra.get("gpr_shifts", 1)
        if not isinstance(shifts, int) or isinstance(shifts, bool):
            raise ValueError(f"its metadata's gpr_shifts is {shifts!r}, not an integer")
        prompts.set_gpr_shifts(shifts)
        prompts.set_gpr_floor(GPRFloor.from_record(extra.get("gpr_floor")))
    except ValueError as e:
        raise CheckpointError(f"{origin}: {e}") from e
    prompts.meta = meta
    return prompts


def residual_prior_name(prompts: LearnedPrompts) -> str | None:
    if not prompts.residual:
        return None
    if prompts.prior is None or prompts.prior.name not in HANDCRAFTED_SETS:
        raise CheckpointError("residual prompts can be saved only with one of the named handcrafted priors "
                              f"({', '.join(HANDCRAFTED_SETS)}): call set_prior first")
    return prompts.prior.name


def read_meta(path: str | os.PathLike) -> PromptMeta:
    _, js = sidecar_paths(path)
    raw = read_sidecar(js, FORMAT, "prompt")
    known = set(PromptMeta.__dataclass_fields__)
    try:
        raw["training_classes"] = tuple(raw.get("training_classes", ()))
        return PromptMeta(**{k: v for k, v in raw.items() if k in known})
    except TypeError as e:
        raise CheckpointError(f"checkpoint metadata {js} is incomplete: {e}") from e


def learned_dense_mode(meta: PromptMeta, clip: FrozenCLIP) -> str | None:
    """The dense mode the prompts were learned with; unrecorded (older checkpoints): the tower's default."""
    if meta.dense_mode is not None:
        return meta.dense_mode
    try:
        return default_dense_mode(clip.model.visual)
    except NotImplementedError:
        return None


def dense_mode_mismatch(meta: PromptMeta, clip: FrozenCLIP, mode: str | None, what: str = "these prompts",
                        now: str = "the CLIP is set to") -> str:
    """The refusal message when prompts learned with one dense mode meet another ("" when they agree)."""
    learned = learned_dense_mode(meta, clip)
    if learned is None or mode is None or learned == mode:
        return ""
    return (f"{what} were learned with dense mode {learned!r}, but {now} {mode!r}: pass --dense "
            f"{learned} (prompts fitted to one kind of dense features give far worse masks with another)")


def check_compatible(meta: PromptMeta, clip: FrozenCLIP, dense_mode: str | None = None,
                     check_dense: bool = True) -> None:
    """Raises CheckpointError when the prompts were learned for a different CLIP, other input statistics or
    another dense mode (``dense_mode``, default: the CLIP's). ``check_dense=False`` (a caller that picks the
    dense mode per request, as the demo does) only requires a mode this CLIP's image tower offers."""
    problems = []
    if meta.text_width != clip.text_width:
        problems.append(f"text width {meta.text_width} vs {clip.text_width}")
    if meta.embed_dim != clip.embed_dim:
        problems.append(f"embedding width {meta.embed_dim} vs {clip.embed_dim}")
    if meta.clip_model != clip.spec.model_name:
        problems.append(f"model '{meta.clip_model}' vs '{clip.spec.model_name}'")
    elif meta.clip_fingerprint != clip.fingerprint:
        problems.append(f"text-tower weights differ (fingerprint {meta.clip_fingerprint} vs {clip.fingerprint}; "
                        f"learned with pretrained={meta.clip_pretrained!r}, loaded {clip.spec.pretrained!r})")
    if meta.normalization is not None and meta.normalization != clip.normalization and not problems:
        raise CheckpointError(f"these prompts were learned with {meta.normalization!r} input normalisation, but the "
                              f"CLIP is loaded with {clip.normalization!r}: pass --normalization "
                              f"{meta.normalization} (the same CLIP under other input statistics gives far worse "
                              "masks)")
    if problems:
        raise CheckpointError("these prompts were learned for another CLIP: " + "; ".join(problems) +
                              f". Load {meta.clip_model} ({meta.clip_pretrained}) to use them.")
    if not check_dense:
        learned = learned_dense_mode(meta, clip)
        try:
            if learned is not None and clip.dense is not None:
                clip.dense_settings(learned)
        except (ValueError, NotImplementedError) as e:
            raise CheckpointError(f"these prompts were learned with dense mode {learned!r}, which this CLIP's image "
                                  f"tower does not offer: {e}") from None
        return
    mismatch = dense_mode_mismatch(meta, clip, dense_mode or clip.dense_mode)
    if mismatch:
        raise CheckpointError(mismatch)


def load_prompts(path: str | os.PathLike, clip: FrozenCLIP | None = None, name: str | None = None,
                 dense_mode: str | None = None, check_dense: bool = True) -> LearnedPrompts:
    """Reads a prompt checkpoint; with ``clip`` given, refuses one that was learned for another CLIP or with
    another dense mode than ``dense_mode`` (default: the CLIP's; ``check_dense=False``: any mode the tower
    offers, for callers that check per request with ``Predictor.dense_conflict``)."""
    st, _ = sidecar_paths(path)
    meta = read_meta(path)
    if clip is not None:
        check_compatible(meta, clip, dense_mode, check_dense)
    prompts = prompts_from_tensors(meta, load_safetensors(st, "prompt"), name or st.stem, str(st))
    if clip is not None:
        prompts.to(clip.device)
    return prompts
