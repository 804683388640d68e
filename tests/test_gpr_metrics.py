"""GPR's present/absent statistics (issue #28's measurement): the histogram AUC against a direct pairwise
count, separation against direct means, seen and unseen classes apart (the evaluate script's GPR block:
tests/test_evaluate.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.gpr_metrics import GPRStats, auc_from_histograms


def _pairwise_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(pos > neg) + ½ P(pos == neg) over every pair, written out."""
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def test_histogram_auc_equals_the_pairwise_definition():
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 50, 300), rng.integers(10, 60, 200)  # integer scores: many ties
    hp, hn = np.bincount(pos, minlength=60), np.bincount(neg, minlength=60)
    assert auc_from_histograms(hp, hn) == pytest.approx(_pairwise_auc(pos, neg), abs=1e-12)
    assert auc_from_histograms(np.eye(5)[4], np.eye(5)[0]) == 1.0 and auc_from_histograms(np.eye(5)[0], np.eye(5)[4]) == 0.0
    assert math.isnan(auc_from_histograms(np.zeros(5), np.ones(5)))


def test_stats_match_direct_formulas_per_group_and_resolve_scores_near_one():
    """Three images, four classes (class 3 unseen); logits near g = 1 (5.1 vs 6.2: g 0.994 vs 0.998) still
    rank, the AUC follows the logits' ranking and the separation the means of g."""
    logits = torch.tensor([[6.2, 5.1, -1.0, 0.5], [6.3, 5.0, 2.0, -0.5], [5.2, 6.1, 0.0, 3.0]])
    labels = torch.tensor([[[0, 0], [1, 255]], [[0, 2], [2, 2]], [[1, 1], [3, 255]]])
    present = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    stats = GPRStats(4, unseen=(3,))
    for lg, lb in zip(logits, labels):
        stats.update(lg, lb)
    s = stats.summary()
    seen = torch.zeros(4, dtype=torch.bool)
    seen[:3] = True
    for group, mask in (("seen", seen), ("unseen", ~seen)):
        lg, pr = logits[:, mask].flatten().numpy(), present[:, mask].flatten().numpy()
        assert s[group]["auc"] == pytest.approx(_pairwise_auc(lg[pr], lg[~pr]))
        g = 1 / (1 + np.exp(-lg))
        assert s[group]["separation"] == pytest.approx(g[pr].mean() - g[~pr].mean())
        assert s[group]["g_present"] == pytest.approx(g[pr].mean())
