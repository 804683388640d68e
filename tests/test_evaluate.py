"""Evaluation script: numbers equal an independent computation; markdown / JSON; Table 3 grid."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fixtures_data import make_context, make_voc, write_tiny_clip
from mvpseg.checkpoint import CheckpointError, save_prompts
from mvpseg.clip_backbone import ClipSpec, load_clip
from mvpseg.model import MVPSeg
from mvpseg.prompts import LearnedPrompts
from training import evaluate
from training.datasets import VOC20, build_dataset
from training.datasets.transforms import EvalTransform


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    make_voc(root / "data")
    make_context(root / "data")
    clip_args = write_tiny_clip(root / "clip")
    spec = ClipSpec(model_name="mvpseg-tiny", pretrained=clip_args[5], model_config=clip_args[3])
    clip = load_clip(spec)
    torch.manual_seed(3)
    prompts = LearnedPrompts(clip.text_width, n_seg=3, n_ctx=8, use_global=True)
    with torch.no_grad():
        prompts.log_tau2.fill_(math.log(0.05))
    ckpt = save_prompts(root / "p" / "voc.safetensors", prompts, clip, gamma=10.0,
                        training_classes=VOC20.seen_prompt_names)
    return root, clip_args, clip, prompts, ckpt


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def run(root, clip_args, *extra):
    return evaluate.main([*clip_args, "--num-workers", "0", "--cpu-threads", "1", "--device", "cpu",
                          "--no-progress", "--eval-scale", "128", "64", *extra])


def test_scores_equal_independent_computation(env):
    root, clip_args, clip, prompts, ckpt = env
    rep = run(root, clip_args, "--data", f"voc={root / 'data' / 'VOCdevkit'}", "--prompts",
              f"mine={ckpt}", "--baselines")
    got = rep["results"]["voc20"]["mine"]

    # independent path: model forward → bilinear logits → softmax × GPR score → argmax → bincount
    model = MVPSeg(clip, prompts.eval(), gamma=10.0)
    ds = build_dataset("voc", root / "data" / "VOCdevkit", "val")
    tf = EvalTransform(scale=(128, 64))
    mat = np.zeros((20, 20), np.int64)
    with torch.no_grad():
        for i in range(len(ds)):
            image, label = tf(*ds[i])
            out = model(clip.normalize(image[None]), VOC20.prompt_names)
            logits = F.interpolate(out.fused_logits, size=label.shape, mode="bilinear",
                                   align_corners=False)
            prob = logits.softmax(1) * out.gpr_scores[:, :, None, None]
            pred = prob.argmax(1)[0].numpy().ravel()
            gt = label.numpy().ravel()
            keep = gt != 255
            mat += np.bincount(gt[keep] * 20 + pred[keep], minlength=400).reshape(20, 20)
    inter = np.diag(mat)
    union = mat.sum(0) + mat.sum(1) - inter
    iou = [100 * i / u if u else None for i, u in zip(inter, union)]
    assert [c["iou"] for c in got["per_class"]] == pytest.approx(iou, abs=1e-3)
    seen = [v for k, v in enumerate(iou) if k not in VOC20.unseen and v is not None]
    unseen = [v for k, v in enumerate(iou) if k in VOC20.unseen and v is not None]
    assert got["miou_seen"] == pytest.approx(np.mean(seen), abs=1e-3)
    assert got["miou_unseen"] == pytest.approx(np.mean(unseen), abs=1e-3)
    assert got["pixel_acc"] == pytest.approx(100 * np.trace(mat) / mat.sum(), abs=1e-3)
    assert mat.sum() == sum(int((ds[i][1] != 255).sum()) for i in range(len(ds)))


def test_gpr_shifts_of_a_checkpoint_are_applied_with_the_copies_encoded_once_per_image(env, tmp_path, monkeypatch):
    """A checkpoint carrying gpr_shifts 2 (mvpseg/gpr_shifts.py) is scored with GPR averaged over its shifted
    copies — against an independent computation — and the copies are encoded once per image for all sets."""
    import shutil

    import mvpseg.gpr_shifts as gs

    root, clip_args, clip, prompts, ckpt = env
    shifted = tmp_path / "s.safetensors"
    shutil.copy(ckpt, shifted)
    meta = json.loads(ckpt.with_suffix(".json").read_text())
    meta["extra"]["gpr_shifts"] = 2
    shifted.with_suffix(".json").write_text(json.dumps(meta))
    calls = []
    monkeypatch.setattr(evaluate, "shifted_features",
                        lambda *a, **kw: calls.append(a[2]) or gs.shifted_features(*a, **kw))
    rep = run(root, clip_args, "--data", f"voc={root / 'data' / 'VOCdevkit'}", "--prompts", f"a={shifted}",
              "--prompts", f"b={shifted}", "--prompts", f"plain={ckpt}", "--baselines")
    ds = build_dataset("voc", root / "data" / "VOCdevkit", "val")
    assert calls == [2] * len(ds)
    res = rep["results"]["voc20"]
    assert res["a"]["miou"] == res["b"]["miou"] and res["a"]["gpr"] == res["b"]["gpr"]
    assert res["a"]["gpr"] != res["plain"]["gpr"]
    ps = prompts.eval()
    ps.set_gpr_shifts(2)
    tf, mat = EvalTransform(scale=(128, 64)), np.zeros((20, 20), np.int64)
    with torch.no_grad():
        text = ps.encode(clip, VOC20.prompt_names)
        for i in range(len(ds)):
            image, label = tf(*ds[i])
            x = clip.normalize(image[None])
            g = gs.shifted_gpr_logits(gs.shifted_features(clip, x, 2), text.glob, ps).sigmoid()
            out = MVPSeg(clip, ps, gamma=10.0)(x, VOC20.prompt_names)
            prob = F.interpolate(out.fused_logits, size=label.shape, mode="bilinear", align_corners=False).softmax(1)
            pred, gt = (prob * g[:, :, None, None]).argmax(1)[0].numpy().ravel(), label.numpy().ravel()
            keep = gt != 255
            mat += np.bincount(gt[keep] * 20 + pred[keep], minlength=400).reshape(20, 20)
    ps.set_gpr_shifts(1)
    assert res["a"]["pixel_acc"] == pytest.approx(100 * np.trace(mat) / mat.sum(), abs=1e-3)


def test_outputs_and_cross_dataset_grid(env, tmp_path):
    root, clip_args, clip, prompts, ckpt = env
    rep = run(root, clip_args, "--data", f"voc={root / 'data' / 'VOCdevkit'}", "--data",
              f"context={root / 'data' / 'VOCdevkit'}", "--prompts", f"voc-prompts={ckpt}",
              "--baselines", "maskclip-85", "parts", "--out", str(tmp_path / "res"))
    md = (tmp_path / "res" / "results.md").read_text()
    js = json.loads((tmp_path / "res" / "results.json").read_text())
    assert js["results"] == json.loads(json.dumps(rep["results"]))
    assert set(js["results"]) == {"voc20", "context60"}
    assert set(js["results"]["context60"]) == {"voc-prompts", "maskclip-85", "parts"}
    for heading in ("## voc20", "## context60", "## Cross-dataset mIoU(U)",
                    "| method | mIoU(U) | mIoU(S) | mIoU | hIoU |", "| pottedplant * |",
                    "| background |"):
        assert heading in md, heading
    ctx = js["results"]["context60"]["voc-prompts"]
    assert len(ctx["per_class"]) == 60 and len(ctx["unseen"]) == 10
    overlap = js["datasets"]
    assert overlap["voc20"]["unseen_in_training_vocabulary"]["voc-prompts"] == []
    assert "airplane" in overlap["context60"]["unseen_in_training_vocabulary"]["voc-prompts"]
    assert overlap["context60"]["eval_scale"] == [128, 64]


def test_limit_and_errors(env, tmp_path):
    root, clip_args, clip, prompts, ckpt = env
    rep = run(root, clip_args, "--data", f"voc={root / 'data' / 'VOCdevkit'}", "--limit", "1",
              "--baselines", "a-photo-of")
    assert rep["datasets"]["voc20"]["images"] == 1
    with pytest.raises(SystemExit, match="unknown baseline"):
        run(root, clip_args, "--data", f"voc={root / 'data' / 'VOCdevkit'}", "--baselines", "nope")
    with pytest.raises(SystemExit, match="nothing to evaluate"):
        run(root, clip_args, "--data", f"voc={root / 'data' / 'VOCdevkit'}", "--baselines")
    other = write_tiny_clip(tmp_path / "other", seed=1)  # same architecture, other weights
    with pytest.raises(CheckpointError, match="another CLIP"):
        run(root, other, "--data", f"voc={root / 'data' / 'VOCdevkit'}", "--prompts", f"x={ckpt}")


def test_gpr_separation_is_reported_for_sets_with_a_global_prompt(env, tmp_path):
    """Issue #28's measurement: per image, GPR's scores of present vs absent classes (ROC-AUC, separation),
    seen and unseen apart — equal to GPRStats fed directly with the model's outputs; none for the templates."""
    from training.gpr_metrics import GPRStats

    root, clip_args, clip, prompts, ckpt = env
    rep = run(root, clip_args, "--data", f"voc={root / 'data' / 'VOCdevkit'}", "--prompts", f"mine={ckpt}",
              "--baselines", "maskclip-85", "--out", str(tmp_path / "out"))
    got = rep["results"]["voc20"]
    assert got["maskclip-85"]["gpr"] is None and set(got["mine"]["gpr"]) == {"seen", "unseen"}
    model = MVPSeg(clip, prompts.eval(), gamma=10.0)
    ds = build_dataset("voc", root / "data" / "VOCdevkit", "val")
    tf = EvalTransform(scale=(128, 64))
    stats = GPRStats(len(ds.class_names), tuple(ds.unseen_indices))
    with torch.no_grad():
        for i in range(len(ds)):
            image, label = tf(*ds[i])
            out = model(clip.normalize(image[None]), tuple(ds.prompt_names))
            stats.update(out.gpr_logits[0], label)
    want = stats.summary()
    for group in ("seen", "unseen"):
        for key in ("auc", "separation", "g_present", "g_absent"):
            w = want[group][key]
            assert (got["mine"]["gpr"][group][key] is None) if math.isnan(w) else \
                got["mine"]["gpr"][group][key] == pytest.approx(w, abs=1e-4), (group, key)
    assert "GPR class scores, present vs absent" in (tmp_path / "out" / "results.md").read_text()


def test_per_image_confusions_sum_to_the_reported_scores(env, tmp_path):
    """--save-confusions (bootstrap intervals of benchmarks/family_study.py): one N×C×C matrix per image and
    method, whose sum gives exactly the mIoU the report prints; refused without --out."""
    from training.metrics import summarize

    root, clip_args, clip, prompts, ckpt = env
    rep = run(root, clip_args, "--data", f"voc={root / 'data' / 'VOCdevkit'}", "--prompts", f"mine={ckpt}",
              "--baselines", "a-photo-of", "--out", str(tmp_path / "out"), "--save-confusions")
    with np.load(tmp_path / "out" / "confusions-voc20.npz") as z:
        mats = {k: z[k] for k in z.files}
    n = rep["datasets"]["voc20"]["images"]
    assert set(mats) == {"mine", "a-photo-of"} and mats["mine"].shape[0] == n and n > 1
    for name, m in mats.items():
        got = rep["results"]["voc20"][name]
        s = summarize(m.sum(0), got["class_names"], got["unseen"])
        assert s.miou_unseen == pytest.approx(got["miou_unseen"], abs=1e-3)
        assert s.miou == pytest.approx(got["miou"], abs=1e-3)
    assert not np.array_equal(mats["mine"][0], mats["mine"][1])  # per image, not repeated totals
    with pytest.raises(SystemExit, match="needs --out"):
        run(root, clip_args, "--data", f"voc={root / 'data' / 'VOCdevkit'}", "--baselines", "a-photo-of",
            "--save-confusions")
