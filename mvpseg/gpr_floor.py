"""The floor under a fitted GPR: the fit may lower a class's Eq. 6 logit by at most ``margin`` below the
prompts' own reading.

Why: the GPR fit (``mvpseg.learning.gpr_fit``) learns a class-agnostic adapter φ from the presence of *seen*
classes. It lifts the ranking of unseen classes on average, but it can misread one particular unseen name: on one
toy CLIP it suppressed an unseen class the prompts' own GPR scored present (g 0.64 → 0.15, its IoU 17 → 3), and no
check on seen classes can see that. The floor bounds what the fit can take away from any name:

    l_c = max(l_c^fit, l_c^own − margin)

l^fit is GPR's fitted reading (φ, τ2, β, shifts); l^own is Eq. 6 on the unshifted features through no adapter,
with the τ2 and β the prompts learned before the fit (``tau2``, ``bias`` here). Where both readings call a class
absent, the fit's suppression stands; where the fit alone does, the class keeps at least its own odds divided by
e^margin. H-GPR10 (docs/history/gpr-floor-study.md) chose margin 2 on 13 VOC-like runs. ``mvpseg.heads``
applies it (``apply_prompts``), so every reader of g — evaluation, the predictor, the demo, the student's teacher
— sees the bounded scores.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class GPRFloor:
    """The own reading's temperature ``tau2`` (> 0) and bias ``bias`` (logits), and the ``margin`` (logits, ≥ 0)
    by which the fitted reading may fall below it."""
    tau2: float
    bias: float
    margin: float

    def __post_init__(self) -> None:
        values = (self.tau2, self.bias, self.margin)
        if not all(math.isfinite(float(v)) for v in values):
            raise ValueError(f"a GPR floor needs finite tau2, bias and margin, got {values}")
        if not (self.tau2 > 0 and self.margin >= 0):
            raise ValueError(f"a GPR floor needs tau2 > 0 and margin >= 0, got tau2={self.tau2}, "
                             f"margin={self.margin}")

    def record(self) -> dict[str, float]:
        """{"tau2", "bias", "margin"}: what a prompt checkpoint's metadata stores (mvpseg.checkpoint)."""
        return {"tau2": float(self.tau2), "bias": float(self.bias), "margin": float(self.margin)}

    @classmethod
    def from_record(cls, record: Any) -> "GPRFloor | None":
        """Inverse of ``record`` (None stays None); ValueError for anything but those three numbers."""
        if record is None:
            return None
        keys = {f.name for f in fields(cls)}
        if not isinstance(record, dict) or set(record) != keys:
            raise ValueError(f"its metadata's gpr_floor is {record!r}, not {{'tau2', 'bias', 'margin'}} numbers")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in record.values()):
            raise ValueError(f"its metadata's gpr_floor holds a value that is not a number: {record!r}")
        return cls(**{k: float(v) for k, v in record.items()})
