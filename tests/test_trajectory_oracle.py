"""benchmarks/trajectory_oracle.py (issue #27's ceiling): the default's selection replayed from a run that never
stops early must keep exactly the iterate the default's own early-stopping tracker keeps, and the summary must
count a run without any point of Δ hIoU ≥ 0 as failing."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from training.selection import BestTracker

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import trajectory_oracle as to  # noqa: E402


def _history(scores, patience):
    """Validations every 50 iterations through BestTracker (confidence 0: any higher score is accepted)."""
    tracker, prompts = BestTracker(patience=patience, confidence=0.0), torch.nn.Linear(1, 1)
    for i, s in enumerate(scores):
        if tracker.update(50 * i, {"score": s}, prompts):
            break
    return tracker


@pytest.mark.parametrize("seed", range(20))
def test_replayed_selection_equals_the_early_stopping_tracker(seed):
    rng = np.random.default_rng(seed)
    scores = list(np.round(rng.normal(50, 2, 11), 1))
    full = _history(scores, patience=0)  # the trajectory arm: every validation recorded, no early stop
    assert len(full.history) == 11
    for patience in (1, 2, 4):
        assert to.replay_selection(full.history, patience) == _history(scores, patience).best_iter


def test_replay_keeps_a_late_gain_only_before_the_stop():
    hist = _history([50, 49, 48, 47, 46, 60], patience=0).history
    assert to.replay_selection(hist, 4) == 0  # stopped after four rejections, before iteration 250
    assert to.replay_selection(hist, 5) == 250


def _run(d_u, d_h, points):
    cands = [{"iter": i, "alpha": 1.0, "d_unseen": u, "d_hiou": h, "miou_unseen": u} for i, (u, h) in
             enumerate(points)]
    pick = {"iter": 0, "alpha": 0.0, "d_unseen": d_u, "d_hiou": d_h, "d_unseen_ci": [d_u - 1, d_u + 1]}
    return {"clip": "c", "layout": "voc", "seed": 0, "default": pick, "last": pick, "oracle": pick,
            "oracle_h": None if all(h < 0 for _, h in points) else pick, "candidates": cands}


def test_summary_counts_runs_without_a_point_of_non_negative_hiou():
    md = to.render([_run(2.0, 1.0, [(2.0, 1.0)]), _run(0.5, -0.2, [(0.5, -0.2)])])
    row = next(line for line in md.splitlines() if line.startswith("| oracle_h |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "2" and cells[2].startswith("+1.25") and cells[5] == "1"
