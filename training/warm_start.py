"""Where prompt learning starts: the template fit and the temperature calibration now live in the library
(``mvpseg.learning``: ``PromptLearner.warm_start`` / ``.calibrate``, shared with the demo's Learn tab); this
module keeps the training stream's seed offset for the calibration (docs/history/recipe-addenda.md, the third
to sixth addenda) and the old import path of ``fit_to_templates``.
"""
from __future__ import annotations

from mvpseg.learning import calibrate_temperatures, fit_to_templates  # noqa: F401 (old import path)

# Seed offset of the calibration's sample stream (train_prompts): its own draw for a fixed pool, so the
# learning stream is the same with or without calibration. Fixed: the measured runs used it.
CALIBRATION_SEED_OFFSET = 104729
