"""Atomic training-state checkpoints and ``--resume``.

A training state is a dict of tensors and primitives (model/optimiser state dicts, RNG states,
iteration, config) written with ``torch.save`` to a temporary file in the same folder, fsync'ed and
renamed over the target, so a crash never leaves a half-written checkpoint.  It is read back with
``torch.load(weights_only=True)``: no arbitrary unpickling.  ``latest.json`` names the newest state.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mvpseg.util import atomic_write_bytes, atomic_write_text  # noqa: F401 (re-exported for the scripts)

from .distributed import set_rng_state

STATE_VERSION = 1


class ResumeError(RuntimeError):
    """A training state cannot be read or does not match the run being resumed (a user error)."""


def atomic_torch_save(obj, path: Path) -> None:
    atomic_write_bytes(path, lambda f: torch.save(obj, f))


def load_state(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's own message suggests weights_only=False, i.e. running arbitrary code from the file: not shown
        raise ResumeError(f"cannot read training checkpoint {path}: it is truncated, corrupt or not a training "
                           f"state written by mvpseg ({type(exc).__name__}); pickled objects are never loaded") from exc
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ResumeError(f"{path} is not a version-{STATE_VERSION} training state")
    return state


class CheckpointManager:
    """``<dir>/state_<iter>.pt`` files plus ``latest.json``; keeps the newest ``keep`` states."""

    def __init__(self, directory: Path, keep: int = 2) -> None:
        self.dir = Path(directory)
        self.keep = max(1, keep)

    def path_for(self, iteration: int) -> Path:
        return self.dir / f"state_{iteration:08d}.pt"

    def save(self, iteration: int, state: dict) -> Path:
        state = {**state, "version": STATE_VERSION, "iteration": iteration}
        path = self.path_for(iteration)
        atomic_torch_save(state, path)
        atomic_write_text(self.dir / "latest.json",
                          json.dumps({"iteration": iteration, "path": path.name}))
        for old in sorted(self.dir.glob("state_*.pt"))[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def latest_readable(self) -> Path | None:
        """The newest state that loads, falling back past unreadable ones (a crash or a full disk can leave
        the newest damaged) with a warning naming each; None when there is none."""
        import logging

        newest = self.latest()
        candidates = ([newest] if newest else []) + sorted(self.dir.glob("state_*.pt"), reverse=True)
        for path in dict.fromkeys(candidates):
            try:
                load_state(path)
                return path
            except RuntimeError as e:
                logging.getLogger("mvpseg.train").warning("%s; trying the previous state", e)
        return None

    def latest(self) -> Path | None:
        pointer = self.dir / "latest.json"
        if pointer.is_file():
            try:
                path = self.dir / json.loads(pointer.read_text())["path"]
                if path.is_file():
                    return path
            except (ValueError, KeyError):
                pass
        states = sorted(self.dir.glob("state_*.pt"))
        return states[-1] if states else None

    def resolve(self, resume: str | None) -> Path | None:
        """``None`` → no resume; ``"auto"`` → latest here (None if there is none); else a path."""
        if resume is None:
            return None
        if resume == "auto":
            return self.latest_readable()
        return Path(resume)


def check_config_compatible(saved: dict, current: dict, keys, defaults: dict | None = None) -> None:
    """Refuse when a setting in ``keys`` differs; ``defaults`` stands in for a key that a state written
    before that setting existed lacks (so upgrading the code does not strand an interrupted run)."""
    saved = {**(defaults or {}), **saved}
    diff = {k: (saved.get(k), current.get(k)) for k in keys if saved.get(k) != current.get(k)}
    if diff:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ResumeError(f"cannot resume: settings differ from the checkpoint ({lines})")


def restore_state(path: Path, config: dict, keys, modules: dict, optimizer, scaler, schedule: dict,
                  defaults: dict | None = None, optional: dict | None = None) -> int:
    """``--resume``: read the state at ``path``, refuse it when a setting in ``keys`` or the LR schedule
    differs from ``config`` / ``schedule``, load ``modules`` (state-dict key → module), optimiser,
    AMP scaler and RNG states; ``optional`` modules are loaded when the state has them (states written
    before they existed do not). Returns the iteration to continue from."""
    state = load_state(path)
    check_config_compatible(state["config"], config, keys, defaults)
    if state.get("scheduler") != schedule:
        raise ResumeError(f"cannot resume: LR schedule differs from {path}")
    for key, module in modules.items():
        try:
            module.load_state_dict(state[key])
        except (KeyError, RuntimeError) as e:  # e.g. a state written before a parameter was renamed
            raise ResumeError(f"cannot resume from {path}: its '{key}' state does not match this version of "
                               f"the code ({str(e).splitlines()[0]}); resume with the version that wrote it, "
                               f"or start a new run folder") from e
    for key, module in (optional or {}).items():
        if state.get(key) is not None:
            module.load_state_dict(state[key])
    optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return int(state["iteration"])
