"""``--tensorboard`` on train_prompts and distill: events with the log's scalars and the mask grids, a resume that
does not duplicate steps, no effect on what is learned, and one line (no traceback) without tensorboard."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fixtures_data import make_voc, write_tiny_clip
from training import distill, train_prompts
from training.runlog import read_jsonl, scalars_of
from training.tensorboard_log import MAX_CLASSES, MISSING, TB_DIR

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tb")
    make_voc(root / "data")
    return root, write_tiny_clip(root / "clip")


def prompt_args(root: Path, clip_args, out: str, *extra: str) -> list[str]:
    return ["--dataset", "voc", "--data-root", str(root / "data" / "VOCdevkit"), "--out", str(root / out),
            *clip_args, "--n-ctx", "8", "--crop-size", "64", "--train-scale", "128", "64", "--global-batch", "2",
            "--max-iters", "6", "--val-every", "2", "--val-images", "4", "--init-fit", "3", "--calib-steps", "2",
            "--ckpt-every", "2", "--num-workers", "0", "--cpu-threads", "1", "--device", "cpu", "--no-progress",
            *extra]


def distill_args(root: Path, clip_args, prompts: Path, out: str, *extra: str) -> list[str]:
    return ["--dataset", "voc", "--data-root", str(root / "data" / "VOCdevkit"), "--out", str(root / out),
            "--prompts", str(prompts), *clip_args, "--backbone", "resnet-tiny", "--backbone-weights", "none",
            "--crop-size", "64", "--train-scale", "128", "64", "--global-batch", "2", "--max-iters", "4",
            "--switch-iter", "2", "--ckpt-every", "2", "--eval-limit", "2", "--num-workers", "0", "--cpu-threads",
            "1", "--device", "cpu", "--no-progress", *extra]


def events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def grid_shape(image_event) -> tuple[int, int]:
    """(rows, columns) of tiles in a logged mask grid (tiles are separated by 2-pixel white padding)."""
    arr = np.asarray(Image.open(io.BytesIO(image_event.encoded_image_string)).convert("L"))
    white_rows = (arr == 255).all(1)
    white_cols = (arr == 255).all(0)

    def runs(mask):  # number of non-white bands
        return int(np.sum(~mask[1:] & mask[:-1]) + (0 if mask[0] else 1))

    return runs(white_rows), runs(white_cols)


def test_train_prompts_writes_events_with_the_logs_scalars_and_mask_grids(setup):
    pytest.importorskip("tensorboard")
    root, clip_args = setup
    final = train_prompts.main(prompt_args(root, clip_args, "tb", "--tensorboard", "--tb-every", "4"))
    tb_dir = root / "tb" / TB_DIR
    assert list(tb_dir.glob("events.out.tfevents.*")), "no events file"
    acc = events(tb_dir)
    tags = set(acc.Tags()["scalars"])
    log = read_jsonl(root / "tb" / "log.jsonl")
    assert {"loss/total", "loss/seg", "loss/cls", "loss/oc", "lr", "temperature/tau1", "temperature/tau2",
            "validation/miou_trained"} <= tags
    # the score is the held-out classes' mIoU: NaN (not written) where no validation image holds them and the
    # views predict none of them, as here without GPR's rounding (VOC's default scores the views alone)
    finite = [r["iter"] for r in log if r.get("event") == "validation" and r["score"] is not None]
    assert [s for s, _ in scalars(acc, "validation/score")] == finite if finite else "validation/score" not in tags
    steps = [r for r in log if "loss" in r and r.get("event") is None]
    # every iteration's loss, lr and τ1 as logged in log.jsonl (TensorBoard stores float32)
    for key, tag in (("loss", "loss/total"), ("lr", "lr"), ("tau1", "temperature/tau1")):
        assert [s for s, _ in scalars(acc, tag)] == [r["iter"] for r in steps] == [1, 2, 3, 4, 5, 6]
        np.testing.assert_allclose([v for _, v in scalars(acc, tag)], [r[key] for r in steps], rtol=1e-6)
    vals = [r for r in log if r.get("event") == "validation"]
    assert [s for s, _ in scalars(acc, "validation/miou_trained")] == [r["iter"] for r in vals] == [0, 2, 4, 6]
    # mask grids: before training, every --tb-every iterations and at the last; rows = 3 views + global + final,
    # columns = the image + the classes (at most MAX_CLASSES)
    grids = acc.Images("masks")
    assert [g.step for g in grids] == [0, 4, 6]
    n_classes = len(log[0]["vocabulary"]) + len(log[0]["held_out_classes"])
    assert grid_shape(grids[-1]) == (3 + 1 + 1, 1 + min(MAX_CLASSES, n_classes))
    assert {"masks/legend/text_summary", "run/start/text_summary"} <= set(acc.Tags()["tensors"])

    # TensorBoard only watches: the learned prompts are those of the same run without it
    plain = train_prompts.main(prompt_args(root, clip_args, "plain"))
    a, b = load_file(str(final)), load_file(str(plain))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_distill_events_and_a_resume_without_duplicate_steps(setup):
    pytest.importorskip("tensorboard")
    root, clip_args = setup
    prompts = train_prompts.main(prompt_args(root, clip_args, "teacher", "--max-iters", "2", "--select", "none"))
    out = root / "st"
    assert distill.main(distill_args(root, clip_args, prompts, "st", "--tensorboard", "--tb-every", "2",
                                     "--stop-after", "3")) is None  # interrupted after iteration 3 (state: 2)
    distill.main(distill_args(root, clip_args, prompts, "st", "--tensorboard", "--tb-every", "2", "--resume"))
    acc = events(out / TB_DIR)
    tags = set(acc.Tags()["scalars"])
    assert {"loss/total", "lr", "pixels/pseudo", "pixels/labelled", "eval/MVP-SEG+ (student)/miou_unseen",
            "eval/MVP-SEG (teacher)/hiou"} <= tags
    assert "temperature/tau1" not in tags  # the student has no temperatures
    # the interrupted run's iteration 3 is purged: each step once, values those of log.jsonl (resumed run)
    steps = [r for r in read_jsonl(out / "log.jsonl") if "loss" in r and r.get("event") is None]
    assert [s for s, _ in scalars(acc, "loss/total")] == [r["iter"] for r in steps] == [1, 2, 3, 4]
    np.testing.assert_allclose([v for _, v in scalars(acc, "loss/total")], [r["loss"] for r in steps], rtol=1e-6)
    done = [r for r in read_jsonl(out / "log.jsonl") if r.get("event") == "done"][-1]
    assert scalars(acc, "eval/MVP-SEG+ (student)/miou_unseen") == [
        (4, pytest.approx(done["MVP-SEG+ (student) miou_unseen"], rel=1e-6))]
    # grids: rows = the teacher's 3 views + the student's probabilities
    grids = acc.Images("masks")
    assert sorted({g.step for g in grids}) == [0, 2, 4]
    assert grid_shape(grids[-1])[0] == 3 + 1


def test_scalars_of_maps_each_record_kind():
    assert scalars_of({"iter": 3, "loss": 1.5, "seg": 1.0, "lr": 0.1, "tau1": 30.0, "tau2": None, "phase": "x"}) == (
        3, {"loss/total": 1.5, "loss/seg": 1.0, "lr": 0.1, "temperature/tau1": 30.0})
    assert scalars_of({"event": "validation", "iter": 4, "score": 12.0, "hiou": None, "accepted": True}) == (
        4, {"validation/score": 12.0})
    assert scalars_of({"event": "validation_reference", "score": 9.0}) == (0, {"validation_reference/score": 9.0})
    assert scalars_of({"event": "done", "iter": 8, "student": "s", "MVP-SEG+ (student) hiou": 40.0}) == (
        8, {"eval/MVP-SEG+ (student)/hiou": 40.0})
    assert scalars_of({"event": "start", "config": {}})[1] == {}


def test_without_tensorboard_the_option_fails_in_one_line(setup, monkeypatch, tmp_path):
    root, clip_args = setup
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what a missing package looks like
    for main, argv in ((train_prompts.main, prompt_args(root, clip_args, "none-tp", "--tensorboard")),
                       (distill.main, distill_args(root, clip_args, tmp_path / "p.safetensors", "none-d",
                                                   "--tensorboard", str(tmp_path / "tb")))):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == f"error: {MISSING}" and "\n" not in exc.value.code
        assert "pip install tensorboard" in exc.value.code
    assert not (root / "none-tp").exists() and not (root / "none-d").exists()  # stopped before any work

    # the same from a shell: exit status 1, one line on stderr, no traceback
    code = ("import sys; sys.modules['torch.utils.tensorboard'] = None; sys.modules['tensorboard'] = None; "
            "sys.argv[0] = 'train_prompts'; from training.train_prompts import main; main(sys.argv[1:])")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, *prompt_args(root, clip_args, "none-sh", "--tensorboard")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip() == f"error: {MISSING}"
