"""Lets a training script run by path (``python training/train_prompts.py …``) exactly as ``python -m
training.train_prompts …`` does. Each script's first lines, before its package-relative imports::

    if not __package__:  # run by path: import as the package would (training/_as_script.py)
        import _as_script; __package__ = _as_script.PACKAGE  # noqa: E702

Run by path, Python puts ``training/`` itself first on ``sys.path`` (so ``import _as_script`` finds this file)
and gives the script no package. Importing this module replaces that entry by the repository root, so
``training`` is importable as a package and none of its modules (``datasets``, ``data``, …) shadows an
installed package of the same name; the script then names its package, which makes its relative imports work.
"""
from __future__ import annotations

import sys
from pathlib import Path

PACKAGE = "training"
_HERE = Path(__file__).resolve().parent
_ROOT = str(_HERE.parent)


def _fix_path() -> None:
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)


_fix_path()
