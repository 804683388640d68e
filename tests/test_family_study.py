"""benchmarks/family_study.py's statistics: mIoU(U)/(S) of resampled confusions equal training.metrics', and the
per-run deltas and intervals come from the evaluation rows and per-image confusions recipe_ablation writes."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from training.metrics import summarize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import family_study as fs  # noqa: E402


def _mats(rng, n, c, good):
    """n per-image confusions; ``good`` share of labelled pixels on the diagonal."""
    out = np.zeros((n, c, c), np.int64)
    for i in range(n):
        for t in range(c):
            k = rng.integers(20, 60)
            right = int(k * good)
            out[i, t, t] += right
            out[i, t, rng.integers(0, c)] += k - right
    return out


def test_resampled_miou_matches_summarize():
    rng = np.random.default_rng(0)
    mats = _mats(rng, 5, 6, 0.6)
    unseen = np.array([False, True, False, False, True, False])
    u, s = fs.miou_unseen_seen(mats, unseen)
    for i in range(5):
        want = summarize(mats[i], [f"c{j}" for j in range(6)], [1, 4])
        assert u[i] == pytest.approx(want.miou_unseen, abs=1e-9) and s[i] == pytest.approx(want.miou_seen, abs=1e-9)
    assert fs.hiou(np.array([40.0]), np.array([60.0]))[0] == pytest.approx(48.0)


def test_run_stats_against_the_best_handcrafted_set(tmp_path):
    rng = np.random.default_rng(1)
    c, names = 4, ["a", "b", "c", "d"]
    unseen = [1, 3]
    mats = {"maskclip-85": _mats(rng, 30, c, 0.5), "parts": _mats(rng, 30, c, 0.4),
            "a-photo-of": _mats(rng, 30, c, 0.45), "default": _mats(rng, 30, c, 0.8)}
    rows = {}
    for k, m in mats.items():
        s = summarize(m.sum(0), names, unseen)
        rows[k] = {"miou_unseen": s.miou_unseen, "miou_seen": s.miou_seen, "hiou": s.hiou,
                   "per_class": [{"class": n, "unseen": j in unseen} for j, n in enumerate(names)]}
    (tmp_path / "eval-0").mkdir()
    np.savez(tmp_path / "eval-0" / "confusions-toyworld.npz", **mats)
    (tmp_path / "eval.json").write_text(json.dumps(rows))
    got = fs.run_stats(tmp_path, ["default"])["default"]
    best = max(rows[b]["miou_unseen"] for b in ("maskclip-85", "parts", "a-photo-of"))
    assert got["d_unseen"] == pytest.approx(rows["default"]["miou_unseen"] - best)
    lo, hi = got["d_unseen_ci"]
    assert lo < got["d_unseen"] < hi and lo > 0  # far better on every resample
    # against another arm (Table 1 row 5 − row 4): the difference of the two rows, a paired interval around it
    mats["no-gpr"] = _mats(rng, 30, c, 0.6)
    s = summarize(mats["no-gpr"].sum(0), names, unseen)
    rows["no-gpr"] = {**rows["default"], "miou_unseen": s.miou_unseen, "miou_seen": s.miou_seen, "hiou": s.hiou}
    np.savez(tmp_path / "eval-0" / "confusions-toyworld.npz", **mats)
    (tmp_path / "eval.json").write_text(json.dumps(rows))
    both = fs.run_stats(tmp_path, ["default", "no-gpr"], ref="no-gpr")
    assert both["default"]["d_ref"] == pytest.approx(rows["default"]["miou_unseen"] - s.miou_unseen)
    lo, hi = both["default"]["d_ref_ci"]
    assert 0 < lo < both["default"]["d_ref"] < hi and "d_ref" not in both["no-gpr"]
