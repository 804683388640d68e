"""Deprecated import path (until mvpseg 0.3): use ``mvpseg.student.heads``."""
import warnings

from .student.heads import *  # noqa: F401,F403
from .student.heads import _tiny_resnet  # noqa: F401

warnings.warn("mvpseg.student_heads moved to mvpseg.student.heads", DeprecationWarning, stacklevel=2)
