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
