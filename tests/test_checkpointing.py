"""training/checkpointing.py: atomic states, weights-only reads, resume falls back past a damaged newest state."""
from __future__ import annotations

import logging
import pickle

import pytest
import torch

from training.checkpointing import CheckpointManager, load_state


class _Evil:  # a pickle that would run code if it were ever unpickled
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_resume_auto_falls_back_to_the_previous_state_when_the_newest_is_unreadable(tmp_path, caplog):
    m = CheckpointManager(tmp_path, keep=3)
    for it in (10, 20, 30):
        m.save(it, {"w": torch.full((2,), float(it))})
    assert m.resolve("auto") == m.path_for(30)
    m.path_for(30).write_bytes(m.path_for(30).read_bytes()[:40])  # truncated by a crash / full disk
    with caplog.at_level(logging.WARNING):
        chosen = m.resolve("auto")
    assert chosen == m.path_for(20) and torch.equal(load_state(chosen)["w"], torch.full((2,), 20.0))
    assert "state_00000030.pt" in caplog.text and "trying the previous state" in caplog.text
    for it in (10, 20):
        m.path_for(it).write_bytes(b"garbage")
    assert m.resolve("auto") is None


@pytest.mark.parametrize("content", ["garbage", "pickle"])
def test_a_foreign_or_damaged_state_is_refused_without_unpickling_or_unsafe_advice(tmp_path, capsys, content):
    path = tmp_path / "state.pt"
    if content == "pickle":
        path.write_bytes(pickle.dumps(_Evil()))
    else:
        path.write_bytes(b"\x00not a torch file")
    with pytest.raises(RuntimeError, match="cannot read training checkpoint .*never loaded") as err:
        load_state(path)
    assert "weights_only=False" not in str(err.value) and "unpickled!" not in capsys.readouterr().out


def test_training_clis_report_bad_weights_and_bad_resume_states_in_one_line(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    garbage = tmp_path / "RN50.pt"
    garbage.write_bytes(pickle.dumps(_Evil()))
    toy = ["--clip", "toyclip", "--model-config", str(repo / "assets/toyclip/toyclip.json"), "--device", "cpu",
           "--num-workers", "0", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    env.pop("MVPSEG_DEBUG", None)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "training.train_prompts", "--dataset", "toyworld",
                               "--data-root", "seed=0", *args], cwd=repo, env=env, capture_output=True, text=True,
                              timeout=300)

    bad_weights = run("--out", str(tmp_path / "a"), *toy, "--pretrained", str(garbage))
    state = tmp_path / "state.pt"
    state.write_bytes(b"\x00garbage")
    bad_state = run("--out", str(tmp_path / "b"), *toy, "--pretrained",
                    str(repo / "assets/toyclip/toyclip.safetensors"), "--resume", str(state))
    for proc, says, file in ((bad_weights, "cannot load CLIP weights", garbage),
                             (bad_state, "cannot read training checkpoint", state)):
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 1 and last.startswith(f"error: {says}") and str(file) in last
        assert "Traceback" not in proc.stderr and "weights_only=False" not in proc.stderr
        assert "unpickled!" not in proc.stdout


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_states_and_reports_get_the_umask_mode_not_mkstemps_0600(tmp_path, umask):
    import os

    from mvpseg.checkpoint import current_umask
    from training.checkpointing import atomic_write_text

    old = os.umask(umask)
    try:
        assert current_umask() == umask
        m = CheckpointManager(tmp_path / "run", keep=2)
        m.save(5, {"w": torch.zeros(2)})
        atomic_write_text(tmp_path / "results.json", "{}")
        for path in (m.path_for(5), tmp_path / "run" / "latest.json", tmp_path / "results.json"):
            assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    finally:
        os.umask(old)
