"""``python -m training.pretrain_toyclip …`` (or ``python training/pretrain_toyclip.py …``): pretrains a toy CLIP
on captioned toy-world scenes. The code lives in ``training/toyworld/pretrain.py``; this module keeps the
command line (and the old import path) working."""
from __future__ import annotations

if not __package__:  # run by path (python training/pretrain_toyclip.py): import as the package would
    import _as_script; __package__ = _as_script.PACKAGE  # noqa: E702

from .toyworld.pretrain import *  # noqa: F401,F403,E402
from .toyworld.pretrain import main  # noqa: E402

if __name__ == "__main__":
    main()
