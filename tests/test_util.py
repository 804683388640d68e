"""mvpseg/util.py, the leaf module of shared helpers: atomic writes, file modes, digests; and the old import
paths of modules that moved into sub-packages (re-exported, with a DeprecationWarning)."""
from __future__ import annotations

import importlib
import os
import stat
import sys
import threading
import warnings

import pytest
import torch

from mvpseg import util


def test_atomic_write_replaces_whole_files_and_cleans_up(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    util.atomic_write_bytes(target, b"first")
    assert target.read_bytes() == b"first"
    util.atomic_write(target, lambda tmp: tmp.write_bytes(b"second"))
    assert target.read_bytes() == b"second"
    with pytest.raises(RuntimeError):
        def failing(tmp):
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
        util.atomic_write(target, failing)
    assert target.read_bytes() == b"second"  # untouched by the failed write
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]  # no temporary file left
    util.atomic_write_text(target, "ü")
    assert target.read_text(encoding="utf-8") == "ü"
    # the mode a plain open() would give (0666 minus the umask), not mkstemp's 0600
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o666 & ~util.current_umask()


def test_concurrent_writers_never_share_a_temporary_file(tmp_path):
    """Two threads writing the same path (two demo requests with identical output) each use their own
    temporary file: the result is always one writer's whole content."""
    target = tmp_path / "shared.png"
    payloads = [bytes([i]) * 200_000 for i in (1, 2)]
    errors = []

    def writer(data):
        try:
            for _ in range(50):
                util.atomic_write_bytes(target, data, fsync=False)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and target.read_bytes() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["shared.png"]


def test_digest_depends_on_values_tensors_and_nothing_else():
    a = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    d = util.digest(("x", 1), {"w": a})
    assert d == util.digest(("x", 1), {"w": a.clone()}) and len(d) == 16
    assert d != util.digest(("x", 2), {"w": a})
    assert d != util.digest(("x", 1), {"w": a.reshape(3, 2)})  # shape enters it
    assert d != util.digest(("x", 1), {"w": a.double()})  # dtype enters it
    b = a.clone()
    b[0, 0] = 0.5
    assert d != util.digest(("x", 1), {"w": b})


@pytest.mark.parametrize("old, new, name", [
    ("mvpseg.student_heads", "mvpseg.student.heads", "make_resnet"),
    ("mvpseg.student_predictor", "mvpseg.student.predictor", "StudentPredictor"),
    ("training.pretrain_toyclip", "training.toyworld.pretrain", "zero_shot_accuracy"),
    ("training.toyworld_export", "training.toyworld.export", "main"),
])
def test_old_import_paths_still_work(old, new, name):
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)
    if old.startswith("mvpseg."):  # library paths warn; the training modules keep their command lines
        assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught)


def test_util_is_a_leaf():
    """The point of the module: it imports nothing from mvpseg, so everything can import it."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(util.__file__).read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.startswith(("mvpseg", "."))] and not any(
        isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(tree))
