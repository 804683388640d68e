"""``python -m training.report``: curves and a Markdown summary from real tiny runs and from a hand-written log;
one-line errors for a missing folder or log, unreadable lines skipped and counted."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures_data import make_voc, write_tiny_clip
from mvpseg.checkpoint import read_meta
from training import distill, report, train_prompts
from training.runlog import read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def write_log(path: Path, records: list, extra_lines: tuple[str, ...] = ()) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    (path / "log.jsonl").write_text("\n".join(lines) + "\n")
    return path


def hand_written_prompt_run(path: Path) -> Path:
    """A train_prompts log: start at t=1000, 4 iterations, validations at 0/2/4 (best 2), killed after iteration
    2 and resumed 977 s later, a torn last line and a line of garbage."""
    recs = [{"event": "start", "from_iter": 0, "time": 1000.0, "command": "python -m training.train_prompts --x 1",
             "config": {"dataset": "voc20", "lr": 0.002, "max_iters": 4, "recipe": "default", "clip": "RN50"}},
            {"event": "validation_reference", "prompts": "maskclip-85", "miou_trained": 30.0, "miou_held_out": 20.0,
             "hiou": 24.0, "score": 20.0, "time": 1001.0},
            {"event": "validation", "iter": 0, "miou_trained": 31.0, "miou_held_out": 21.0, "hiou": 25.0,
             "score": 21.0, "best_iter": 0, "time": 1002.0}]
    for it in (1, 2):
        recs.append({"iter": it, "lr": 0.002, "loss": 3.0 - it / 2, "seg": 2.0, "cls": 0.5, "oc": 0.1,
                     "tau1": 33.0 - it, "tau2": 0.07, "img_per_s": 4.0, "step_s": 0.5, "time": 1002.0 + it * 10})
        if it == 2:
            recs.append({"event": "validation", "iter": 2, "miou_trained": 35.5, "miou_held_out": 41.5,
                         "hiou": 38.26, "score": 41.5, "best_iter": 2, "time": 1023.0})
    recs += [{"event": "resume", "from_iter": 2, "time": 2000.0,
              "config": {"dataset": "voc20", "lr": 0.002, "max_iters": 4}},
             {"iter": 3, "lr": 0.002, "loss": 1.4, "seg": 1.2, "cls": 0.1, "oc": 0.1, "tau1": 30.0, "tau2": 0.07,
              "time": 2010.0},
             {"iter": 4, "lr": 0.002, "loss": 1.2, "seg": 1.0, "cls": 0.1, "oc": 0.1, "tau1": 29.0, "tau2": 0.07,
              "time": 2020.0},
             {"event": "validation", "iter": 4, "miou_trained": 36.0, "miou_held_out": 39.0, "hiou": 37.44,
              "score": 39.0, "best_iter": 2, "time": 2025.0},
             {"event": "done", "iter": 4, "best_iter": 2, "time": 2026.0}]
    return write_log(path, recs, ('{"iter": 5, "lr": 0.0', "not json at all"))


def decoded_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        return np.asarray(im)


def test_hand_written_logs(tmp_path, capsys):
    run = hand_written_prompt_run(tmp_path / "prompts-run")
    student = write_log(tmp_path / "student-run", [
        {"event": "start", "from_iter": 0, "config": {"dataset": "context60", "backbone": "resnet101",
                                                    "head": "deeplabv3plus", "prompts": "p.safetensors"}},
        *({"iter": i, "phase": "teacher", "lr": 0.01 * (1 - i / 4) ** 0.9, "loss": 2.0 / i, "pseudo_px": 10,
           "labelled_px": 100, "step_s": 1.25} for i in (1, 2, 3, 4)),
        {"event": "done", "iter": 4, "student": "s.safetensors", "MVP-SEG+ (student) miou_seen": 44.25,
         "MVP-SEG+ (student) miou_unseen": 33.75, "MVP-SEG+ (student) hiou": 38.29,
         "MVP-SEG (teacher) miou_seen": 40.0, "MVP-SEG (teacher) miou_unseen": 30.0, "MVP-SEG (teacher) hiou": 34.29}])
    out = tmp_path / "rep"
    assert report.main([str(run), str(student), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "skipped 2 unreadable line(s)" in captured.err and "prompts-run" in captured.err
    assert captured.out.strip() == f"wrote {out / 'curves.png'} and {out / 'summary.md'}"

    img = decoded_png(out / "curves.png")
    assert img.ndim == 3 and img.shape[0] > 4 * 200 and img.shape[1] >= 600  # 4 panels stacked
    md = (out / "summary.md").read_text()
    table = {ln.split(" | ")[0].strip("| "): ln for ln in md.splitlines() if ln.startswith("| prompts-run")
             or ln.startswith("| student-run")}
    row = table["prompts-run"]
    assert "| train_prompts | voc20 | 4 |" in row
    assert "score 41.50 (held-out 41.50, trained 35.50) at iteration 2" in row  # best = best_iter's validation
    assert "score 39.00 (held-out 39.00, trained 36.00) at iteration 4" in row  # last
    # wall time: 1000 → 1023 before the kill, 2000 → 2026 after the resume (the 16 minutes down not counted)
    assert "49.0 s" in row
    row = table["student-run"]
    assert "| distill | context60 | 4 | – |" in row
    assert "MVP-SEG+ (student): mIoU(S) 44.25, mIoU(U) 33.75, hIoU 38.29" in row
    assert "5.0 s" in row  # no timestamps: the sum of step_s
    assert "- command: `python -m training.train_prompts --x 1`" in md
    assert "85 templates on the same validation images: score 20.00" in md
    assert "- resumed 1 time(s)" in md and "- 2 unreadable log line(s) skipped" in md
    assert "| lr | `0.002` |" in md and "| backbone | `\"resnet101\"` |" in md

    # panels follow the families present: a distill log alone has no temperatures
    runs = [report.load_run(student)]
    assert report.plot_curves(runs, tmp_path / "s.png") == ["losses", "learning rate", "validation mIoU"]
    decoded_png(tmp_path / "s.png")


def test_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    write_log(tmp_path / "garbage", [], ("{", "[1, 2]", "nope"))
    cases = [(tmp_path / "absent", "no such run folder"), (tmp_path / "empty", "has no log.jsonl"),
             (tmp_path / "garbage", "holds no readable records (3 unreadable lines)")]
    for path, message in cases:
        assert report.main([str(path), "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    make_voc(root / "data")
    clip_args = write_tiny_clip(root / "clip")
    common = ["--dataset", "voc", "--data-root", str(root / "data" / "VOCdevkit"), *clip_args, "--crop-size",
              "64", "--train-scale", "128", "64", "--global-batch", "2", "--num-workers", "0", "--cpu-threads", "1",
              "--device", "cpu", "--no-progress"]
    prompts = train_prompts.main([*common, "--out", str(root / "prompts"), "--n-ctx", "8", "--max-iters", "6",
                                  "--val-every", "2", "--val-images", "4", "--init-fit", "3", "--calib-steps", "2"])
    distill.main([*common, "--out", str(root / "student"), "--prompts", str(prompts), "--backbone", "resnet-tiny",
                  "--backbone-weights", "none", "--max-iters", "3", "--switch-iter", "1", "--eval-limit", "2"])
    return root, prompts


def test_real_runs(real_runs, capsys):
    root, prompts = real_runs
    assert report.main([str(root / "prompts")]) == 0  # one run: RUN_DIR/report by default
    md = (root / "prompts" / "report" / "summary.md").read_text()
    decoded_png(root / "prompts" / "report" / "curves.png")
    selection = read_meta(prompts).extra["selection"]
    best = next(h for h in selection["history"] if h["iter"] == selection["best_iter"])
    # NaN (null) when no validation image holds a held-out class and none is predicted (the views alone)
    score = "–" if best["score"] is None else f"{best['score']:.2f}"
    assert f"score {score}" in md and f"at iteration {selection['best_iter']}" in md
    assert "| train_prompts | voc20 | 6 |" in md
    assert "- command: `python -m training.train_prompts --dataset voc" in md  # recorded by the script

    out = root / "both"
    assert report.main([str(root / "prompts"), str(root / "student" / "log.jsonl"), "--out", str(out)]) == 0
    md = (out / "summary.md").read_text()
    done = [r for r in read_jsonl(root / "student" / "log.jsonl") if r.get("event") == "done"][-1]
    assert f"MVP-SEG+ (student): mIoU(S) {done['MVP-SEG+ (student) miou_seen']:.2f}" in md
    assert "| distill | voc20 | 3 |" in md
    runs = [report.load_run(root / "prompts"), report.load_run(root / "student")]
    assert report.plot_curves(runs, out / "again.png") == ["losses", "learning rate", "temperatures τ1, τ2",
                                                          "validation mIoU"]
    assert decoded_png(out / "curves.png").shape == decoded_png(out / "again.png").shape
