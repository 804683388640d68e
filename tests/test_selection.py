"""Model selection for prompt learning (training/selection.py) and the default recipe's pieces in train_prompts:
held-out seen classes, disjoint validation images, fresh samples, best-iterate selection, early stopping,
the warm start fitted to the templates."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fixtures_data import make_selection_voc
from mvpseg.checkpoint import read_meta
from training import train_prompts
from training.data import TrainStream
from training.runlog import read_jsonl
from training.selection import (FRESH_VALIDATION_OFFSET, BestTracker, choose_holdout, splice_global,
                               validation_indices)


def test_choose_holdout_fraction_keeps_background_and_depends_on_seed():
    names = ("background",) + tuple(f"c{i}" for i in range(15))
    h = choose_holdout(names, 0.25, seed=0)
    assert len(h.held_out) == 4 and 0 not in h.held_out  # round(0.25 · 15), never the catch-all
    assert h.train_vocabulary == tuple(n for i, n in enumerate(names) if i not in h.held_out)
    assert choose_holdout(names, 0.25, seed=0) == h
    assert {choose_holdout(names, 0.25, seed=s).held_out for s in range(6)} != {h.held_out}
    assert choose_holdout(names, 0.0, seed=0).held_out == ()
    assert len(choose_holdout(("a", "b", "c", "d"), 0.1, seed=0).held_out) == 1  # at least one
    assert len(choose_holdout(("a", "b", "c"), 0.9, seed=0).held_out) == 1  # two always left to learn
    with pytest.raises(ValueError, match="holdout-frac"):
        choose_holdout(names, 1.0, seed=0)


def test_holdout_labels_map_to_the_training_vocabulary():
    h = choose_holdout(("a", "b", "c", "d", "e"), 0.4, seed=3)
    labels = torch.tensor([[0, 1, 2], [3, 4, 255]])
    out = h.to_training_labels(labels)
    for old, new in zip(labels.flatten().tolist(), out.flatten().tolist()):
        if old == 255 or old in h.held_out:
            assert new == 255
        else:
            assert h.train_vocabulary[new] == h.names[old]


def test_validation_images_are_never_training_images():
    data = list(range(50))
    val, train = validation_indices(data, 64, seed=1, fresh=False)
    assert len(val) == 10 and len(train) == 40  # at most a fifth of a fixed pool
    assert not set(val) & set(train) and set(val) | set(train) == set(range(50))
    assert validation_indices(data, 64, seed=1, fresh=False) == (val, train)
    fval, ftrain = validation_indices(data, 8, seed=1, fresh=True)
    assert ftrain is None and fval == [FRESH_VALIDATION_OFFSET + i for i in range(8)]
    assert validation_indices(data, 0, seed=1, fresh=False) == ([], None)


def test_fresh_stream_draws_every_position_once():
    class Echo:
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return i, None

    fresh = TrainStream(Echo(), lambda im, lb, rng: im, global_batch=2, max_iters=5, seed=0, fresh=True)
    assert [fresh[i] for i in range(len(fresh))] == list(range(10))  # no sample repeats
    pool = TrainStream(Echo(), lambda im, lb, rng: im, global_batch=2, max_iters=5, seed=0)
    assert sorted(pool[i] for i in range(6)) == [0, 0, 1, 1, 2, 2]  # a pool of 3 cycles


def test_best_tracker_keeps_the_best_state_and_stops_after_patience():
    p = torch.nn.Linear(2, 1)
    t = BestTracker(patience=2)
    assert not t.update(10, {"score": 1.0}, p)
    best = {k: v.clone() for k, v in p.state_dict().items()}
    with torch.no_grad():
        p.weight.add_(1.0)
    assert not t.update(20, {"score": 0.5}, p)
    assert t.update(30, {"score": math.nan}, p)  # NaN never counts as better: 2 bad checks → stop
    assert t.bad == 2 and t.should_stop and t.best_iter == 10
    assert all(torch.equal(t.best_state[k], best[k]) for k in best)
    u = BestTracker()
    u.load_state_dict(t.state_dict())
    assert (u.best_iter, u.best_score, u.bad, u.patience) == (10, 1.0, 2, 2) and len(u.history) == 3
    assert not BestTracker(patience=0).update(1, {"score": -1.0}, p)  # 0 = never stop early


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return make_selection_voc(tmp_path_factory.mktemp("sel"))


def _clip(clip_args):
    from mvpseg.clip_backbone import load_clip
    from training.cli import clip_spec

    args = train_prompts.build_parser().parse_args(["--dataset", "voc", "--data-root", "x", "--out", "y",
                                                    *clip_args, "--device", "cpu"])
    return load_clip(clip_spec(args), torch.device("cpu"))


def _run(root, clip_args, out, *extra):
    return train_prompts.main(["--dataset", "voc", "--data-root", str(root / "data" / "VOCdevkit"),
                               "--out", str(root / out), *clip_args, "--n-ctx", "8", "--crop-size", "64",
                               "--train-scale", "128", "64", "--num-workers", "0", "--cpu-threads", "1",
                               "--device", "cpu", "--no-progress", *extra])


def test_default_recipe_selects_the_best_validated_prompts_and_holds_classes_out(voc):
    root, clip_args = voc
    out = _run(root, clip_args, "sel", "--max-iters", "8", "--val-every", "2", "--patience", "0",
               "--init-fit", "5", "--val-images", "4", "--lr", "0.05")
    meta = read_meta(out)
    sel = meta.extra["selection"]
    assert sel["mode"] == "holdout" and len(sel["held_out_classes"]) == 4  # round(0.25 · 15 seen)
    assert not set(sel["held_out_classes"]) & set(meta.training_classes)  # held-out names never trained on
    history = {h["iter"]: h["score"] for h in sel["history"]}
    assert sorted(history) == [0, 2, 4, 6, 8]  # after the warm start, then every 2 iterations
    assert sel["best_iter"] == max(history, key=lambda i: history[i])
    assert sel["validation_images"] == 4
    # the written prompts are those of the best iteration, not the last: rescoring them gives the best score
    recs = [r for r in read_jsonl(root / "sel" / "log.jsonl") if r.get("event") == "validation_reference"]
    assert len(recs) == 1 and 0 <= recs[0]["score"] <= 100
    from mvpseg.checkpoint import load_prompts
    from mvpseg.model import MVPSeg
    from training.datasets import build_dataset, get_profile
    from training.selection import ValidationSet

    clip = _clip(clip_args)
    data = build_dataset("voc", root / "data" / "VOCdevkit", None, label_space="seen", train=True)
    val_idx, _ = validation_indices(data, 4, 0, fresh=False)
    vs = ValidationSet.build(clip, data, val_idx, get_profile("voc").eval_transform(), torch.device("cpu"))
    model = MVPSeg(clip, load_prompts(out, clip), gamma=10.0)
    holdout = choose_holdout(data.prompt_names, 0.25, 0)
    assert vs.score(model, data.prompt_names, holdout, "holdout")["score"] == pytest.approx(sel["best_score"], abs=1e-6)


def test_early_stopping_and_no_selection(voc):
    root, clip_args = voc
    out = _run(root, clip_args, "early", "--max-iters", "40", "--val-every", "1", "--patience", "1",
               "--init-fit", "30", "--val-images", "4", "--lr", "0.5", "--gpr-select", "joint")
    sel = read_meta(out).extra["selection"]
    # patience 1: the run stops at the first validation that does not improve
    scores = [h["score"] for h in sel["history"]]
    assert sel["stopped_early_at"] == sel["history"][-1]["iter"] < 40
    assert all(b > a for a, b in zip(scores[:-2], scores[1:-1])) and scores[-1] <= max(scores[:-1])
    plain = read_meta(_run(root, clip_args, "nosel", "--max-iters", "3", "--select", "none", "--calib-steps", "2"))
    assert plain.extra["selection"] is None and plain.extra["iterations"] == 3
    start = read_jsonl(root / "nosel" / "log.jsonl")[0]
    assert start["calibrated_tau"][0] != pytest.approx(100 / 3, rel=1e-4)  # calibration ran before iteration 1
    assert len(plain.training_classes) == 15  # every seen class is trained on without selection


def test_splice_global_takes_only_the_global_prompt_from_the_last_state():
    from mvpseg.prompts import LearnedPrompts

    torch.manual_seed(0)
    best, last = (LearnedPrompts(16, n_seg=3, n_ctx=4, gpr_bias=True, residual=True) for _ in range(2))
    with torch.no_grad():
        last.log_tau1.fill_(1.0), last.log_tau2.fill_(-2.0), last.bias.fill_(0.7)
    b, la = best.state_dict(), last.state_dict()
    out = splice_global(b, la)
    assert set(out) == set(b)
    assert torch.equal(out["ctx"][0], la["ctx"][0]) and torch.equal(out["ctx"][1:], b["ctx"][1:])
    assert torch.equal(out["log_tau2"], la["log_tau2"]) and torch.equal(out["bias"], la["bias"])
    assert torch.equal(out["log_tau1"], b["log_tau1"]) and torch.equal(out["ctx0"], b["ctx0"])
    assert not torch.equal(b["ctx"][0], la["ctx"][0])  # the inputs differ where it matters, and are untouched
    assert torch.equal(best.state_dict()["ctx"], b["ctx"])
    best.load_state_dict(out)  # a valid state of the same set


def test_gpr_select_last_ships_the_selected_views_with_the_last_global_prompt(voc):
    """--gpr-select last: no early stop (patience 1 would stop this run, test above), the segmentation views
    and τ1 of the selected iterate, the global prompt, τ2 and β of the final one (its training state)."""
    from mvpseg.checkpoint import load_prompts
    from training.checkpointing import load_state

    root, clip_args = voc
    out = _run(root, clip_args, "glast", "--max-iters", "12", "--val-every", "1", "--patience", "1",
               "--init-fit", "30", "--val-images", "4", "--lr", "0.5", "--cls-loss", "bce", "--gpr-bias", "on",
               "--gpr-select", "last", "--ckpt-every", "1000")
    meta = read_meta(out)
    sel = meta.extra["selection"]
    assert meta.extra["iterations"] == 12 and sel["stopped_early_at"] is None
    assert meta.extra["train_config"]["gpr_select"] == "last"
    assert sel["best_iter"] < 12
    state = load_state(root / "glast" / "checkpoints" / "state_00000012.pt")
    last, best = state["prompts"], state["selection"]["best_state"]
    assert not torch.allclose(last["ctx"][1:], best["ctx"][1:])  # the views moved after the selected iterate
    shipped = load_prompts(out, _clip(clip_args)).state_dict()
    assert torch.allclose(shipped["ctx"][1:], best["ctx"][1:]) and torch.allclose(shipped["ctx"][0], last["ctx"][0])
    assert torch.allclose(shipped["log_tau1"], best["log_tau1"], atol=1e-6)
    assert torch.allclose(shipped["log_tau2"], last["log_tau2"], atol=1e-6)
    assert torch.allclose(shipped["bias"], last["bias"]) and not torch.allclose(last["bias"], best["bias"])


def test_views_start_alike_with_and_without_a_global_prompt():
    from mvpseg.prompts import LearnedPrompts

    torch.manual_seed(3)
    with_global = LearnedPrompts(16, n_seg=3, n_ctx=4, use_global=True)
    torch.manual_seed(3)
    without = LearnedPrompts(16, n_seg=3, n_ctx=4, use_global=False)
    assert torch.equal(with_global.seg_ctx, without.seg_ctx)
    assert not torch.allclose(with_global.ctx[0], with_global.ctx[1])  # the global prompt is a draw of its own


def test_gpr_select_views_ships_row_4s_views_with_the_last_global_prompt(voc):
    """--gpr-select views (H-GPR5): the segmentation views are trained, scored (without GPR) and selected as
    Table 1 row 4 (multi-oc, no global prompt) trains and selects them, to the same stop; training then goes on
    to --max-iters for the global prompt, τ2 and β, which are taken from the last iterate."""
    from mvpseg.checkpoint import load_prompts
    from training.checkpointing import load_state

    root, clip_args = voc
    common = ("--max-iters", "12", "--val-every", "1", "--patience", "2", "--init-fit", "30", "--val-images", "4",
              "--lr", "0.5", "--ckpt-every", "1000", "--calib-steps", "3")
    row4_path = _run(root, clip_args, "row4", "--variant", "multi-oc", *common)
    row4 = read_meta(row4_path)
    out = _run(root, clip_args, "gviews", *common, "--cls-loss", "bce", "--gpr-bias", "on", "--gpr-select", "views")
    meta = read_meta(out)
    sel, sel4 = meta.extra["selection"], row4.extra["selection"]
    assert meta.extra["train_config"]["gpr_select"] == "views"
    assert sel4["stopped_early_at"] is not None and row4.extra["iterations"] < 12  # row 4 stopped early ...
    assert meta.extra["iterations"] == 12 and sel["stopped_early_at"] is None  # ... this run trained on
    assert sel["views_stopped_at"] == sel4["stopped_early_at"]
    assert sel["best_iter"] == sel4["best_iter"]
    assert [h["score"] for h in sel["history"]] == pytest.approx([h["score"] for h in sel4["history"]], abs=1e-6)
    shipped = load_prompts(out, _clip(clip_args)).state_dict()
    views4 = load_prompts(row4_path, _clip(clip_args)).state_dict()
    assert torch.allclose(shipped["ctx"][1:], views4["ctx"], atol=1e-5)  # row 4's views, exactly
    assert torch.allclose(shipped["log_tau1"], views4["log_tau1"], atol=1e-6)
    last = load_state(root / "gviews" / "checkpoints" / "state_00000012.pt")["prompts"]
    assert torch.allclose(shipped["ctx"][0], last["ctx"][0]) and torch.allclose(shipped["bias"], last["bias"])
    assert not torch.allclose(last["ctx"][1:], shipped["ctx"][1:])  # the views moved on and were not kept
    log = read_jsonl(root / "gviews" / "log.jsonl")
    assert max(r["iter"] for r in log if r.get("event") == "validation") == sel["views_stopped_at"]


def test_gpr_select_views_resumes_exactly_after_the_views_stopped(voc):
    """A run killed after the views' selection stopped resumes without validating again and ships the same
    prompts, bit for bit, as the uninterrupted run."""
    root, clip_args = voc
    common = ["--dataset", "voc", "--data-root", str(root / "data" / "VOCdevkit"), *clip_args, "--n-ctx", "8",
              "--crop-size", "64", "--train-scale", "128", "64", "--num-workers", "0", "--cpu-threads", "1",
              "--device", "cpu", "--no-progress", "--max-iters", "12", "--val-every", "1", "--patience", "1",
              "--init-fit", "30", "--val-images", "4", "--lr", "0.5", "--ckpt-every", "4", "--calib-steps", "3",
              "--gpr-select", "views", "--cls-loss", "bce", "--gpr-bias", "on"]
    ref = train_prompts.main([*common, "--out", str(root / "vref")])
    stopped_at = read_meta(ref).extra["selection"]["views_stopped_at"]
    assert stopped_at is not None and stopped_at < 8  # the state of iteration 8 holds a stopped selection
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    proc = subprocess.run([sys.executable, "-m", "training.train_prompts", *common, "--out", str(root / "vkill"),
                           "--simulate-kill-at", "10"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    resumed = train_prompts.main([*common, "--out", str(root / "vkill"), "--resume"])
    a, b = load_file(str(ref)), load_file(str(resumed))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    vals = [r["iter"] for r in read_jsonl(root / "vkill" / "log.jsonl") if r.get("event") == "validation"]
    assert vals == list(range(stopped_at + 1))  # no validation after the views' selection stopped
    assert read_meta(resumed).extra["selection"]["views_stopped_at"] == stopped_at


def test_warm_start_fits_the_template_embeddings(voc):
    from mvpseg.handcrafted import TemplatePrompts
    from mvpseg.prompts import LearnedPrompts
    from mvpseg.learning import fit_to_templates

    _, clip_args = voc
    clip = _clip(clip_args)
    names = ("cat", "dog", "potted plant", "sky")
    targets = TemplatePrompts.maskclip85().encode(clip, names).seg[0]
    torch.manual_seed(0)
    prompts = LearnedPrompts(clip.text_width, n_seg=3, n_ctx=8)
    with torch.no_grad():
        before = float((prompts.encode(clip, names).seg * targets).sum(-1).mean())
    after, _ = fit_to_templates(prompts, clip, None, names, targets, steps=60, lr=0.01)
    check = prompts.encode(clip, names)
    assert after > before + 0.05 and after > 0.9
    views = torch.cat([check.glob[None], check.seg])
    assert float((views * targets).sum(-1).mean()) == pytest.approx(after, abs=0.02)


def test_warm_start_under_ocloss_keeps_the_fit_and_pulls_the_views_apart(voc):
    """Without the OCLoss term the views fit the same targets from different random starts and end up with
    nearly the same mean context (what OCLoss penalises); with it (``--init-fit-oc on``) they fit as well and
    their mean contexts are near-orthogonal — the returned L_OC is Eq. 5's mean |cos| over pairs."""
    from mvpseg.handcrafted import TemplatePrompts
    from mvpseg.losses import oc_loss
    from mvpseg.prompts import LearnedPrompts
    from mvpseg.learning import fit_to_templates

    _, clip_args = voc
    clip = _clip(clip_args)
    names = ("cat", "dog", "potted plant", "sky")
    targets = TemplatePrompts.maskclip85().encode(clip, names).seg[0]
    fits = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        prompts = LearnedPrompts(clip.text_width, n_seg=3, n_ctx=8)
        cos, oc = fit_to_templates(prompts, clip, None, names, targets, steps=60, lr=0.01, oc_weight=weight)
        assert oc == pytest.approx(float(oc_loss(prompts.seg_ctx.detach())), abs=0.05)  # value before the last step
        fits[weight] = (cos, float(oc_loss(prompts.seg_ctx.detach())))
    assert fits[1.0][0] > 0.9 and fits[1.0][0] >= fits[0.0][0] - 0.02  # the fit is kept
    assert fits[1.0][1] < 0.1 and fits[1.0][1] < fits[0.0][1] - 0.2  # the views are pulled apart


def test_paired_bootstrap_accepts_only_a_consistent_improvement():
    import numpy as np

    from training.selection import prob_better

    h = choose_holdout(("a", "b", "c", "d"), 0.25, seed=0)  # one held-out class
    c = h.held_out[0]
    n, k = 40, 4

    def mats(correct_per_image):
        m = np.zeros((n, k, k), dtype=np.int32)
        for i, ok in enumerate(correct_per_image):
            m[i, c, c] = ok
            m[i, c, (c + 1) % k] = 10 - ok
            for j in range(k):
                if j != c:
                    m[i, j, j] = 10
        return m

    base = mats([5] * n)
    assert prob_better(base, base, h, "holdout") == 0.0  # a tie is never "better"
    assert prob_better(mats([6] * n), base, h, "holdout") == 1.0  # better on every image
    # higher on average, but only through one lucky image: the bootstrap does not trust it
    lucky = mats([10] + [5] * (n - 1))
    p = prob_better(lucky, base, h, "holdout")
    assert 0.3 < p < 0.9
    t = BestTracker(patience=3, confidence=0.9)
    prompts = torch.nn.Linear(1, 1)
    t.update(0, {"score": 50.0, "confusions": base}, prompts, h, "holdout")
    t.update(1, {"score": 51.0, "confusions": lucky}, prompts, h, "holdout")
    assert t.best_iter == 0 and t.history[-1]["accepted"] is False
    t.update(2, {"score": 60.0, "confusions": mats([6] * n)}, prompts, h, "holdout")
    assert t.best_iter == 2 and t.bad == 0


def test_prior_prompts_auto_leaves_the_85_templates_only_for_a_set_that_wins_consistently():
    import numpy as np

    from training.recipe import TrainConfig

    h = choose_holdout(("background", "a", "b", "c"), 0.25, seed=0)
    n, k = 40, 4

    def mats(correct_per_image):  # per-image confusions: class 1 right `ok` of 10 pixels, the rest perfect
        m = np.zeros((n, k, k), dtype=np.int32)
        for i, ok in enumerate(correct_per_image):
            m[i, 1, 1], m[i, 1, 2] = ok, 10 - ok
            for j in (0, 2, 3):
                m[i, j, j] = 10
        return m

    cfg = TrainConfig(dataset="toyworld", data_root="", out="")
    base = mats([5] * n)
    assert train_prompts.choose_prior(cfg, {}, h) == ("maskclip-85", {})
    fixed = TrainConfig(dataset="toyworld", data_root="", out="", prior_prompts="parts")
    assert train_prompts.choose_prior(fixed, {}, h)[0] == "parts"
    # parts better on every image: chosen, and the scores are the seen-class mIoU of each set
    name, scores = train_prompts.choose_prior(
        cfg, {"maskclip-85": base, "a-photo-of": base, "parts": mats([7] * n)}, h)
    assert name == "parts" and scores["parts"] > scores["maskclip-85"] == scores["a-photo-of"]
    # higher on average through one lucky image only: the 85 templates stay
    lucky = mats([10] + [5] * (n - 1))
    name, scores = train_prompts.choose_prior(cfg, {"maskclip-85": base, "a-photo-of": lucky, "parts": base}, h)
    assert name == "maskclip-85" and scores["a-photo-of"] > scores["maskclip-85"]


def test_temperature_calibration_moves_only_the_temperatures_and_lowers_the_loss(voc):
    """``calibrate_temperatures`` fits log τ1 / log τ2 alone: the context is bit-identical afterwards, the
    training loss (L_seg + λ_cls L_cls) on the calibration batches falls, and the fused argmax — which does not
    depend on τ1 — is unchanged without GPR."""
    from mvpseg.losses import LossWeights
    from mvpseg.model import MVPSeg
    from mvpseg.prompts import LearnedPrompts
    from mvpseg.learning import calibrate_temperatures

    _, clip_args = voc
    clip = _clip(clip_args)
    names = ("background", "cat", "dog", "sky")
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(2, 3, 64, 64, generator=g), torch.randint(0, 4, (2, 64, 64), generator=g))
               for _ in range(4)]

    def loss_and_argmax(model):
        with torch.no_grad():
            text = model.text_features(names)
            outs = [model.head(model.image_features(x), text) for x, _ in batches]
            loss = sum(float(model.losses(o, y, LossWeights(oc=0.0))["total"]) for o, (_, y) in zip(outs, batches))
        return loss, [o.fused_logits.argmax(1) for o in outs]

    for use_global in (True, False):
        torch.manual_seed(0)
        model = MVPSeg(clip, LearnedPrompts(clip.text_width, n_seg=3, n_ctx=4, use_global=use_global))
        ctx_before = model.prompts.ctx.detach().clone()
        loss0, arg0 = loss_and_argmax(model)
        with torch.no_grad():  # the calibration works on dense features (cached or computed per batch)
            feats = [(model.image_features(x), y) for x, y in batches]
        tau1, tau2 = calibrate_temperatures(model, None, names, feats * 5,
                                            lambda out, y: model.losses(out, y, LossWeights(oc=0.0))["total"],
                                            steps=20, lr=0.05)
        loss1, arg1 = loss_and_argmax(model)
        assert torch.equal(model.prompts.ctx.detach(), ctx_before)
        assert tau1 == pytest.approx(float(model.prompts.tau1().detach())) and tau1 != pytest.approx(100 / 3, rel=1e-3)
        assert loss1 < loss0 - 1e-3
        assert all(torch.equal(a, b) for a, b in zip(arg0, arg1))
        assert (tau2 is not None) is use_global


def test_gpr_adapter_run_keeps_row_4s_views_trains_the_global_branch_on_and_resumes_exactly(voc):
    """--gpr-adapter with --gpr-iters and --gpr-pool (H-GPR6): the views are those of the same run without an
    adapter (φ draws from its own generator and no view gradient depends on it); after the views stop only the
    global branch trains, to --gpr-iters, from --max-iters on with minibatches of the pool, with no further
    validation; φ ships trained; a run killed in the pool phase resumes (pool rebuilt) bit for bit."""
    from mvpseg.checkpoint import load_prompts

    root, clip_args = voc
    common = ["--max-iters", "12", "--val-every", "1", "--patience", "1", "--init-fit", "30", "--val-images", "4",
              "--lr", "0.5", "--ckpt-every", "4", "--calib-steps", "3", "--gpr-select", "views", "--cls-loss", "bce",
              "--gpr-bias", "on"]
    plain = _run(root, clip_args, "aplain", *common)
    adapted = [*common, "--gpr-adapter", "8", "--gpr-iters", "16", "--gpr-pool", "6", "--gpr-batch", "3"]
    ref = _run(root, clip_args, "aref", *adapted)
    meta = read_meta(ref)
    assert meta.extra["iterations"] == 16 and meta.extra["train_config"]["gpr_adapter"] == 8
    stopped_at = meta.extra["selection"]["views_stopped_at"]
    assert stopped_at is not None and stopped_at < 12
    clip = _clip(clip_args)
    shipped, views = load_prompts(ref, clip), load_prompts(plain, clip)
    assert torch.allclose(shipped.ctx[1:], views.ctx[1:], atol=1e-5)
    assert torch.allclose(shipped.log_tau1, views.log_tau1, atol=1e-6)
    assert shipped.gpr_adapter().w2.abs().max() > 0 and views.gpr_adapter() is None
    steps = [r for r in read_jsonl(root / "aref" / "log.jsonl") if "step_s" in r]
    assert [r["iter"] for r in steps] == list(range(1, 17)) and all(r["oc"] == 0 for r in steps[stopped_at:])
    assert all(r["img_per_s"] > 0 for r in steps)
    vals = [r["iter"] for r in read_jsonl(root / "aref" / "log.jsonl") if r.get("event") == "validation"]
    assert vals == list(range(stopped_at + 1))
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    args = ["--dataset", "voc", "--data-root", str(root / "data" / "VOCdevkit"), *clip_args, "--n-ctx", "8",
            "--crop-size", "64", "--train-scale", "128", "64", "--num-workers", "0", "--cpu-threads", "1",
            "--device", "cpu", "--no-progress", *adapted, "--out", str(root / "akill")]
    proc = subprocess.run([sys.executable, "-m", "training.train_prompts", *args, "--simulate-kill-at", "14"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    resumed = train_prompts.main([*args, "--resume"])
    a, b = load_file(str(ref)), load_file(str(resumed))
    assert set(a) == set(b) and "gpr_adapter.w1" in a and all(torch.equal(a[k], b[k]) for k in a)
    for bad in (["--gpr-iters", "20"], ["--gpr-pool", "8"]):
        with pytest.raises(SystemExit, match="views"):
            _run(root, clip_args, "abad", *bad, "--gpr-select", "joint")
    with pytest.raises(SystemExit, match="global prompt"):
        _run(root, clip_args, "abad", "--gpr-adapter", "8", "--variant", "multi-oc")


def test_feature_pool_keeps_what_it_was_given_and_draws_by_seed_rank_and_step():
    from training.gpr_pool import FeaturePool

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(3, 4, 2, 2, generator=g), torch.randint(0, 256, (3, 5, 5), generator=g)) for _ in range(4)]
    pool = FeaturePool(iter(batches), 7)  # stops reading once it holds 7 (the last batch is never drawn)
    assert len(pool) == 7 and pool.labels.dtype == torch.uint8
    assert torch.equal(pool.features, torch.cat([b[0] for b in batches])[:7])
    assert torch.equal(pool.labels.long(), torch.cat([b[1] for b in batches])[:7])
    f, y = pool.batch(5, seed=1, rank=0, step=3)
    f2, y2 = pool.batch(5, seed=1, rank=0, step=3)
    assert torch.equal(f, f2) and torch.equal(y, y2) and y.dtype == torch.int64 and f.shape == (5, 4, 2, 2)
    rows = [int((pool.features == r).all(-1).all(-1).all(-1).nonzero()[0]) for r in f]  # every image is a pool image
    assert torch.equal(y, pool.labels[rows].long())
    assert not torch.equal(pool.batch(5, 1, 0, 4)[0], f) and not torch.equal(pool.batch(5, 1, 1, 3)[0], f)
    with pytest.raises(ValueError, match="0..255"):
        FeaturePool(iter([(torch.zeros(1, 2, 1, 1), torch.full((1, 2, 2), 300))]), 1)
