"""Dense modes through training, evaluation and distillation (issue #15): a tiny random ViT CLIP, seconds each."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fixtures_data import make_voc
from mvpseg.checkpoint import CheckpointError, read_meta
from mvpseg.testing import write_tiny_vit_clip
from training import evaluate, train_prompts
from training.checkpointing import load_state


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense_train")
    make_voc(root / "data")
    return root, write_tiny_vit_clip(root / "clip")


pytestmark = pytest.mark.usefixtures("one_thread")


def train_args(root: Path, clip_args, out: str, *extra) -> list[str]:
    return ["--dataset", "voc", "--data-root", str(root / "data" / "VOCdevkit"), "--out", str(root / out),
            *clip_args, "--recipe", "paper", "--n-ctx", "4", "--crop-size", "64", "--train-scale", "128", "64",
            "--global-batch", "2", "--max-iters", "2", "--warmup-iters", "0", "--ckpt-every", "1",
            "--num-workers", "0", "--cpu-threads", "1", "--device", "cpu", "--no-progress", *extra]


def eval_args(root: Path, clip_args, prompts: Path, *extra) -> list[str]:
    return ["--data", f"voc={root / 'data' / 'VOCdevkit'}", "--prompts", f"run={prompts}", "--baselines",
            "--eval-scale", "128", "64", "--limit", "2", *clip_args, "--num-workers", "0", "--cpu-threads", "1",
            "--device", "cpu", "--no-progress", *extra]


def test_train_records_the_mode_resume_and_evaluate_refuse_another(setup):
    root, clip_args = setup
    final = train_prompts.main(train_args(root, clip_args, "clear", "--dense", "clearclip", "--sliding", "32/16"))
    first = root / "clear" / "checkpoints" / "state_00000001.pt"
    state = load_state(first)
    assert state["config"]["dense"] == "clearclip" and state["config"]["sliding"] == [32, 16]
    resume = ("--resume", str(first))
    with pytest.raises(RuntimeError, match="dense: checkpoint 'clearclip' vs now 'sclip'"):
        train_prompts.main(train_args(root, clip_args, "clear", "--dense", "sclip", "--sliding", "32/16", *resume))
    with pytest.raises(RuntimeError, match=r"sliding: checkpoint \[32, 16\] vs now None"):
        train_prompts.main(train_args(root, clip_args, "clear", "--dense", "clearclip", *resume))
    again = train_prompts.main(train_args(root, clip_args, "clear", "--dense", "clearclip", "--sliding", "32/16",
                                          *resume))
    assert again == final
    meta = read_meta(final)
    assert meta.dense_mode == "clearclip" and meta.extra["sliding"] == [32, 16]
    assert meta.extra["train_config"]["dense"] == "clearclip"

    with pytest.raises(CheckpointError, match="learned with dense mode 'clearclip'.*pass --dense clearclip"):
        evaluate.main(eval_args(root, clip_args, final))
    whole = evaluate.main(eval_args(root, clip_args, final, "--dense", "clearclip"))
    refined = evaluate.main(eval_args(root, clip_args, final, "--dense", "clearclip", "--sliding", "32/16", "--pamr"))
    assert whole["header"]["dense"] == "clearclip" and "whole image" in whole["header"]["inference"]
    assert refined["header"]["inference"].startswith("sliding window 32/16") and "PAMR" in refined["header"]["inference"]
    assert set(whole["results"]["voc20"]) == set(refined["results"]["voc20"]) == {"run"}


def test_default_mode_is_recorded_resolved_and_legacy_states_resume(setup):
    root, clip_args = setup
    train_prompts.main(train_args(root, clip_args, "default"))
    path = root / "default" / "checkpoints" / "state_00000001.pt"
    state = torch.load(path, weights_only=True)
    assert state["config"]["dense"] == "maskclip-vit" and state["config"]["sliding"] is None
    # a state written before the mode was recorded counts as the tower's default
    del state["config"]["dense"], state["config"]["sliding"]
    torch.save(state, path)
    with pytest.raises(RuntimeError, match="dense: checkpoint 'maskclip-vit' vs now 'naclip'"):
        train_prompts.main(train_args(root, clip_args, "default", "--dense", "naclip", "--resume", str(path)))
    final = train_prompts.main(train_args(root, clip_args, "default", "--dense", "maskclip-vit", "--resume",
                                          str(path)))
    assert read_meta(final).dense_mode == "maskclip-vit"


def distill_args(root: Path, clip_args, out: str, prompts: str, *extra) -> list[str]:
    return ["--dataset", "voc", "--data-root", str(root / "data" / "VOCdevkit"), "--out", str(root / out),
            "--prompts", prompts, *clip_args, "--backbone", "resnet-tiny", "--backbone-weights", "none",
            "--crop-size", "64", "--train-scale", "128", "64", "--global-batch", "2", "--max-iters", "2",
            "--switch-iter", "1", "--ckpt-every", "1", "--num-workers", "0", "--cpu-threads", "1", "--device", "cpu",
            "--no-progress", "--no-eval", *extra]


def test_distill_pseudo_labels_use_the_teachers_mode_and_the_student_records_it(setup, monkeypatch):
    import mvpseg.clip_backbone as backbone
    from mvpseg import LearnedPrompts, load_clip, save_prompts
    from mvpseg.clip_backbone import ClipSpec
    from mvpseg.student import read_student_meta
    from training import distill

    root, clip_args = setup
    used: list[str] = []
    real = backbone.compute_dense
    monkeypatch.setattr(backbone, "compute_dense", lambda v, x, s: used.append(s.describe()) or real(v, x, s))
    student = distill.main(distill_args(root, clip_args, "d_sclip", "a-photo-of", "--dense", "sclip",
                                        "--sliding", "32/16"))
    assert used and set(used) == {"sclip, sliding 32/16"}  # every teacher forward (pseudo labels) in that mode
    meta = read_student_meta(student)
    assert meta.teacher_dense_mode == "sclip" and meta.extra["teacher_sliding"] == [32, 16]
    assert meta.extra["train_config"]["dense"] == "sclip"
    with pytest.raises(RuntimeError, match="dense: checkpoint 'sclip' vs now 'naclip'"):
        distill.main(distill_args(root, clip_args, "d_sclip", "a-photo-of", "--dense", "naclip", "--sliding", "32/16",
                                  "--resume", str(root / "d_sclip" / "checkpoints" / "state_00000001.pt")))

    # learned teacher prompts: only under the mode they were learned with
    clip = load_clip(ClipSpec(clip_args[1], clip_args[5], model_config=clip_args[3], dense_mode="clearclip"))
    prompts = save_prompts(root / "clear_prompts.safetensors", LearnedPrompts(clip.text_width, n_seg=2, n_ctx=4), clip)
    with pytest.raises(CheckpointError, match="learned with dense mode 'clearclip'.*pass --dense clearclip"):
        distill.main(distill_args(root, clip_args, "d_refused", str(prompts)))
    student = distill.main(distill_args(root, clip_args, "d_clear", str(prompts), "--dense", "clearclip"))
    assert read_student_meta(student).teacher_dense_mode == "clearclip"


def test_a_mode_the_tower_lacks_is_one_line_from_the_scripts(setup):
    import subprocess
    import sys

    root, clip_args = setup
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "training.evaluate", "--data", f"voc={root / 'data' / 'VOCdevkit'}",
                           *clip_args, "--dense", "maskclip", "--device", "cpu"], cwd=repo, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin",
                                                       "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: dense mode 'maskclip' is not available for a VisionTransformer tower (use 'maskclip-vit' for MaskCLIP "
        "on a ViT); valid modes: 'maskclip-vit', 'sclip', 'clearclip', 'naclip'")
