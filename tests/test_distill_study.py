"""benchmarks/distill_study.py's statistics: per-run deltas come from the eval rows training.distill writes, the
paired bootstrap intervals from its per-image confusions, and MVP-SEG+ − MaskCLIP+ from both runs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from training.metrics import summarize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import distill_study as ds  # noqa: E402

NAMES = [f"c{j}" for j in range(5)]
UNSEEN = [1, 3]


def _mats(rng, n, good):
    out = np.zeros((n, 5, 5), np.int64)
    for i in range(n):
        for t in range(5):
            k = int(rng.integers(20, 60))
            out[i, t, t] += int(k * good)
            out[i, t, rng.integers(0, 5)] += k - int(k * good)
    return out


def _write(folder: Path, student: np.ndarray, teacher: np.ndarray, s_name: str, t_name: str) -> dict:
    folder.mkdir(parents=True)
    rows = {}
    for name, m in ((s_name, student), (t_name, teacher)):
        sc = summarize(m.sum(0), NAMES, UNSEEN)
        rows[name] = {"miou_unseen": sc.miou_unseen, "miou_seen": sc.miou_seen, "hiou": sc.hiou,
                      "per_class": [{"class": c, "unseen": j in UNSEEN} for j, c in enumerate(NAMES)]}
    (folder / "eval.json").write_text(json.dumps({"results": rows}))
    np.savez_compressed(folder / "confusions.npz", **{s_name: student, t_name: teacher})
    return rows


def test_run_stats_and_summary(tmp_path):
    rng = np.random.default_rng(0)
    seed_dir = tmp_path / "fam-x" / "voc" / "seed0"
    good, bad, mid = _mats(rng, 30, 0.9), _mats(rng, 30, 0.4), _mats(rng, 30, 0.6)
    plus = _write(seed_dir / "mvp-seg+", good, bad, "MVP-SEG+ (student)", "MVP-SEG (teacher)")
    mc = _write(seed_dir / "maskclip+", mid, bad, "maskclip-85+ (student)", "maskclip-85 (teacher)")
    stats = ds.run_stats(seed_dir)
    want = plus["MVP-SEG+ (student)"]["miou_unseen"] - plus["MVP-SEG (teacher)"]["miou_unseen"]
    assert stats["mvp-seg+"]["d_unseen"] == pytest.approx(want) and want > 10
    lo, hi = stats["mvp-seg+"]["d_unseen_ci"]
    assert lo < want < hi and lo > 0  # a clear gain: the interval excludes 0
    gap = stats["plus_vs_maskclip_plus"]
    assert gap["d_unseen"] == pytest.approx(plus["MVP-SEG+ (student)"]["miou_unseen"] -
                                            mc["maskclip-85+ (student)"]["miou_unseen"])
    assert gap["ci"][0] < gap["d_unseen"] < gap["ci"][1]
    assert ds.run_stats(tmp_path / "fam-x" / "voc" / "seed1") is None  # not run
    out = ds.summarise(tmp_path)
    assert len(out["runs"]) == 1 and "Over 1 runs" in out["markdown"] and "| fam-x | +" in out["markdown"]
    assert (tmp_path / "study.json").is_file()
    # --rescore N's files (eval-N.json, confusions-N.npz beside the study's) are read and summarised apart
    for arm in ("mvp-seg+", "maskclip+"):
        for name in ("eval.json", "confusions.npz"):
            stem, ext = name.split(".")
            (seed_dir / arm / f"{stem}-600.{ext}").write_bytes((seed_dir / arm / name).read_bytes())
    (seed_dir / "maskclip+" / "eval.json").unlink()  # the study's own files no longer complete
    assert ds.run_stats(seed_dir) is None
    assert ds.run_stats(seed_dir, suffix="-600")["mvp-seg+"]["d_unseen"] == pytest.approx(want)
    assert len(ds.summarise(tmp_path, "-600")["runs"]) == 1 and (tmp_path / "study-600.json").is_file()


def test_student_key_prefers_the_calibrated_row():
    new = {"MVP-SEG+ (student)": {}, "MVP-SEG+ (student, no seen penalty)": {}, "MVP-SEG (teacher)": {}}
    assert ds.student_key(new) == "MVP-SEG+ (student)"
    assert ds.student_key(new, calibrated=False) == "MVP-SEG+ (student, no seen penalty)"
    old = {"MVP-SEG (teacher)": {}, "maskclip-85+ (student)": {}}  # before calibrated stacking: one row
    assert ds.student_key(old) == ds.student_key(old, calibrated=False) == "maskclip-85+ (student)"
    assert ds.student_key({"student (calibrated)": {}, "teacher": {}}) == "student (calibrated)"
