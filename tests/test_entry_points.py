"""Entry points: every training script with a ``main`` runs by path (``python training/x.py``) as well as with
``-m``, and the ``mvpseg`` console command declared in pyproject.toml is ``mvpseg.__main__:main(argv=None) -> int``."""
from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for p in (REPO / "training").glob("*.py") if re.search(r"^if __name__ == .__main__.:", p.read_text(),
                                                                         re.M))


def test_the_scripts_are_found():
    names = {p.stem for p in SCRIPTS}
    assert {"train_prompts", "distill", "evaluate", "report", "toyworld_export", "pretrain_toyclip"} <= names


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing but the shim puts the repo on the path
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MVPSEG_OFFLINE": "1"}


def test_every_training_script_runs_by_path(tmp_path):
    """``python training/x.py --help`` from another folder exits 0 and prints the script's usage (the scripts
    start in parallel: each imports torch)."""
    scripts = SCRIPTS + [REPO / "training" / "toyworld"]  # a package: its __main__ (examples, or export …)
    procs = {p.stem: subprocess.Popen([sys.executable, str(p), "--help"], cwd=tmp_path, env=_env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in scripts}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}: {err[-2000:]}"
        assert out.startswith("usage:"), f"{name}: {out[:200]}"
        assert "Traceback" not in err
    # by path, the package's modules are imported from the package, and training/ is not on sys.path (so its
    # modules cannot shadow installed packages: training/datasets vs the datasets package, say)
    probe = subprocess.run([sys.executable, "-c", "import sys; sys.path[0] = 'training'; import _as_script; "
                            "import training.runlog as r; print(r.__name__, 'training' in sys.path, "
                            f"{str(REPO)!r} in sys.path)"], cwd=REPO, env=_env(), capture_output=True, text=True,
                           timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["training.runlog", "False", "True"]


def test_a_script_run_by_path_does_work(tmp_path):
    """Not only --help: ``python training/report.py RUN`` writes its report."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text('{"event": "start", "config": {"dataset": "x"}}\n'
                                   '{"iter": 1, "loss": 2.0, "lr": 0.1}\n{"iter": 2, "loss": 1.0, "lr": 0.1}\n')
    proc = subprocess.run([sys.executable, str(REPO / "training" / "report.py"), str(run)], cwd=tmp_path,
                          env={**_env(), "MPLBACKEND": "Agg"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run / "report" / "curves.png").is_file() and "| 2 |" in (run / "report" / "summary.md").read_text()


def test_console_script_entry():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    target = project["scripts"]["mvpseg"]
    assert target == "mvpseg.__main__:main"
    module, func = target.split(":")
    main = getattr(importlib.import_module(module), func)
    sig = inspect.signature(main)
    assert list(sig.parameters) == ["argv"] and sig.parameters["argv"].default is None
    assert sig.return_annotation in (int, "int")
    # installed (pip install .): the console script resolves to the same function
    entries = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "mvpseg"]
    if entries:
        assert entries[0].load() is main
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert main(["pull", "not a reference"]) == 2  # an error is an exit status, not a traceback
    # the console script is `sys.exit(main())`: run the same in a process
    proc = subprocess.run([sys.executable, "-c", "import sys; from mvpseg.__main__ import main; sys.exit(main())",
                           "push", "--help"], cwd=REPO, env={**_env(), "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: mvpseg push")


def test_recorded_training_command(monkeypatch):
    from training.cli import command_line

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert command_line("training.train_prompts", ["--out", "a b"]) == "python -m training.train_prompts --out 'a b'"
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert command_line("training.distill", ["--x"]) == "torchrun --nproc_per_node 4 --nnodes 2 -m training.distill --x"
