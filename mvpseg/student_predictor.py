"""Deprecated import path (until mvpseg 0.3): use ``mvpseg.student.predictor`` (or ``mvpseg.StudentPredictor``)."""
import warnings

from .student.predictor import *  # noqa: F401,F403
from .student.predictor import StudentPredictor  # noqa: F401

warnings.warn("mvpseg.student_predictor moved to mvpseg.student.predictor", DeprecationWarning, stacklevel=2)
