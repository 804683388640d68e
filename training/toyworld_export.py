"""``python -m training.toyworld_export DIR …`` (same as ``python -m training.toyworld export DIR …``): toy-world
scenes written as a folder dataset. The code lives in ``training/toyworld/export.py``; this module keeps the
command line (and the old import path) working."""
from __future__ import annotations

if not __package__:  # run by path (python training/toyworld_export.py): import as the package would
    import _as_script; __package__ = _as_script.PACKAGE  # noqa: E702

import sys  # noqa: E402

from .toyworld.export import *  # noqa: F401,F403,E402
from .toyworld.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
