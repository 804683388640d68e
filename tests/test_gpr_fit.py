"""Fitting GPR's reading of the features after training (mvpseg.learning.gpr_fit, train_prompts --gpr-fit, H-GPR7):
presence targets against a direct count, the fit's logits against Eq. 6 written out, what it may and may not
change, determinism, DDP's gradient hook, bad input, and the training run with its exact resume."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fixtures_data import make_selection_voc
from mvpseg.gpr_floor import GPRFloor
from mvpseg.heads import segment
from mvpseg.learning import GPRFitSettings, fit_gpr
from mvpseg.prompts import LearnedPrompts, TextViews
from training import train_prompts

# the recipe's fit and shifts off, explicitly (the fixture is small enough that the recipe drops them itself:
# the first test checks that both ways ship the same file)
NO_GPR_FIT = ("--gpr-fit", "0", "--gpr-shifts", "1")
SMALL = GPRFitSettings(width=16, steps=60, batch=8, lr=1e-2, seed=3)


def _problem(n=40, d=12, c=5, seed=0):
    """Random unit features N×D×3×3 and class embeddings; a class is present where one of its image's patches
    lies close to it (planted), so presence is readable from the features."""
    g = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(c, d, generator=g), dim=-1)
    feats = torch.randn(n, d, 3, 3, generator=g)
    present = (torch.rand(n, c, generator=g) < 0.3).float()
    for i, j in present.nonzero().tolist():
        feats[i, :, j % 3, (j + i) % 3] = 3 * text[j] + 0.3 * torch.randn(d, generator=g)
    return F.normalize(feats, dim=1), text, present


def _prompts(width=8):
    torch.manual_seed(0)
    return LearnedPrompts(width, n_seg=2, n_ctx=4, use_global=True)


def test_fit_lowers_the_loss_changes_only_gprs_reading_and_matches_eq6_written_out():
    feats, text, present = _problem()
    ps = _prompts()
    before = {k: v.clone() for k, v in ps.state_dict().items()}
    losses = fit_gpr(ps, text, feats, present, SMALL)
    assert len(losses) == SMALL.steps and losses[-1] < 0.5 * losses[0]
    after = ps.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k not in ("log_tau2",))  # context, τ1 kept
    assert not torch.equal(before["log_tau2"], after["log_tau2"]) and "bias" in after
    net = ps.gpr_adapter()
    assert net is not None and net.width == SMALL.width and net.w2.abs().max() > 0
    # the model's head reads g exactly as the fit trained it: Eq. 6 on φ(f), with τ2 and β
    with torch.no_grad():
        out = segment(feats, TextViews(text[None], text, ("v",), tuple("abcde")), 1.0, ps.tau2(), 10.0,
                      ps.gpr_bias(), ps.gpr_adapter())
        cos = torch.einsum("bdn,cd->bcn", net(feats).flatten(2), text)
        w = (10.0 * cos).softmax(-1)
        direct = (cos * w).sum(-1) / ps.log_tau2.exp() - ps.bias
    assert torch.allclose(out.gpr_logits, direct, atol=1e-5)
    assert torch.allclose(net(feats).norm(dim=1), torch.ones(feats.shape[0], 3, 3), atol=1e-5)


def test_fit_restarts_tau2_and_bias_and_is_a_function_of_its_seed():
    feats, text, present = _problem()
    a, b, c = _prompts(), _prompts(), _prompts()
    with torch.no_grad():
        b.log_tau2.fill_(math.log(0.7))  # a learned τ2 and β before the fit do not change what it gives
    b.enable_gpr_bias(4.0)
    fit_gpr(a, text, feats, present, SMALL)
    fit_gpr(b, text, feats, present, SMALL)
    fit_gpr(c, text, feats, present, GPRFitSettings(**{**SMALL.__dict__, "seed": 4}))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["gpr_adapter_net.w1"], sc["gpr_adapter_net.w1"])


def test_fit_hands_every_gradient_to_the_reducer_before_each_step():
    feats, text, present = _problem()
    seen = []

    def reduce(params):  # DDP's average over processes; here it records the gradients, then zeroes them
        seen.append([p.grad.clone() for p in params])
        for p in params:
            p.grad.mul_(0.0)  # a reducer that zeroes the gradients leaves the parameters where Adam found them

    ps = _prompts()
    fit_gpr(ps, text, feats, present, GPRFitSettings(width=16, steps=3, batch=8, seed=3), reduce_grads=reduce)
    assert len(seen) == 3 and len(seen[0]) == 6 and any(g.abs().max() > 0 for g in seen[0])
    assert ps.gpr_adapter().w2.abs().max() == 0 and ps.bias == 0 and torch.isclose(ps.tau2(), torch.tensor(0.05))


def test_fit_refuses_what_it_cannot_fit():
    feats, text, present = _problem()
    with pytest.raises(ValueError, match="global prompt"):
        fit_gpr(LearnedPrompts(8, n_seg=2, n_ctx=4, use_global=False), text, feats, present, SMALL)
    with pytest.raises(ValueError, match="do not agree"):
        fit_gpr(_prompts(), text[:3], feats, present, SMALL)
    with pytest.raises(ValueError, match="do not agree"):
        fit_gpr(_prompts(), text, feats[:5], present, SMALL)
    with pytest.raises(ValueError, match="at least one"):
        fit_gpr(_prompts(), text, feats[:0], present[:0], SMALL)
    for bad in (dict(width=0), dict(steps=0), dict(lr=0.0), dict(tau2_init=-1.0)):
        with pytest.raises(ValueError, match="GPR fit needs"):
            GPRFitSettings(**bad)


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return make_selection_voc(tmp_path_factory.mktemp("fit"))


def _base(root, clip_args, iters: int, ckpt_every: int) -> list[str]:
    """A short train_prompts command line on the fixture's VOC tree with calibrated GPR on row 4's views."""
    return ["--dataset", "voc", "--data-root", str(root / "data" / "VOCdevkit"), *clip_args, "--n-ctx", "8",
            "--crop-size", "64", "--train-scale", "128", "64", "--num-workers", "0", "--cpu-threads", "1",
            "--device", "cpu", "--no-progress", "--max-iters", str(iters), "--val-every", "2", "--init-fit", "10",
            "--val-images", "4", "--ckpt-every", str(ckpt_every), "--calib-steps", "2", "--cls-loss", "bce",
            "--gpr-bias", "on", "--gpr-select", "views", *NO_GPR_FIT]


def test_gpr_fit_run_keeps_the_learned_prompts_ships_the_fit_and_refits_exactly_on_resume(voc):
    """--gpr-fit: the shipped prompts' context and τ1 are those of the same run without it (the fit comes after
    selection); the file carries the fitted adapter, τ2 and β and the fit's record; a run killed after its last
    iteration, before the fit, resumes and writes the same file bit for bit; bad combinations are refused."""
    from mvpseg.checkpoint import load_prompts, read_meta
    from mvpseg.clip_backbone import load_clip
    from training.cli import clip_spec

    root, clip_args = voc
    base = _base(root, clip_args, iters=6, ckpt_every=3)
    plain = train_prompts.main([*base, "--out", str(root / "plain")])
    fitted = [*base, "--gpr-fit", "10", "--gpr-fit-width", "8", "--gpr-floor", "2"]
    ref = train_prompts.main([*fitted, "--out", str(root / "ref")])
    clip = load_clip(clip_spec(train_prompts.build_parser().parse_args(base + ["--out", "x"])), torch.device("cpu"))
    a, b = load_prompts(plain, clip), load_prompts(ref, clip)
    assert torch.equal(a.ctx, b.ctx) and torch.equal(a.log_tau1, b.log_tau1)  # views and global prompt alike
    assert a.gpr_adapter() is None and b.gpr_adapter().width == 8 and b.gpr_adapter().w2.abs().max() > 0
    assert not torch.equal(a.log_tau2, b.log_tau2)
    record = read_meta(ref).extra["gpr_fit"]
    assert record["images"] == 10 and record["width"] == 8 and record["steps"] == 1500
    assert record["loss_last"] < record["loss_first"]
    assert math.isclose(record["tau2"], float(b.tau2()), rel_tol=1e-5)
    assert read_meta(plain).extra["gpr_fit"] is None
    # the floor keeps the prompts' own reading: τ2 and β of the same run without the fit (H-GPR10)
    assert a.gpr_floor() is None and b.gpr_floor() == GPRFloor(float(a.tau2()), float(a.bias), 2.0)
    assert record["floor"] == b.gpr_floor().record()
    # the recipe's own fit and shifts (no flag): the fixture's few training images are fewer than the 6,000 the fit
    # draws, so both are dropped and the run ships what --gpr-fit 0 --gpr-shifts 1 ships
    assert base[-len(NO_GPR_FIT):] == list(NO_GPR_FIT)
    auto = train_prompts.main([*base[:-len(NO_GPR_FIT)], "--out", str(root / "auto")])
    config = read_meta(auto).extra["train_config"]
    assert (config["gpr_fit"], config["gpr_shifts"]) == (0, 1) and read_meta(auto).extra["gpr_fit"] is None
    p, q = load_file(str(plain)), load_file(str(auto))
    assert set(p) == set(q) and all(torch.equal(p[k], q[k]) for k in p)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    kill = [*fitted, "--out", str(root / "kill")]
    proc = subprocess.run([sys.executable, "-m", "training.train_prompts", *kill, "--simulate-kill-at", "6"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (root / "kill" / "prompts.safetensors").exists()
    resumed = train_prompts.main([*kill, "--resume"])
    x, y = load_file(str(ref)), load_file(str(resumed))
    assert set(x) == set(y) and "gpr_adapter.w1" in x and all(torch.equal(x[k], y[k]) for k in x)
    assert read_meta(resumed).extra["gpr_floor"] == read_meta(ref).extra["gpr_floor"]
    for bad, match in ((["--variant", "multi-oc"], "global prompt"), (["--gpr-adapter", "8"], "exclude"),
                       (["--gpr-fit-width", "0"], ">= 1"), (["--gpr-fit-steps", "0"], ">= 1")):
        with pytest.raises(SystemExit, match=match):
            train_prompts.main([*fitted, *bad, "--out", str(root / "bad")])
    with pytest.raises(SystemExit, match=">= 0"):
        train_prompts.main([*base, "--gpr-fit", "-1", "--out", str(root / "bad")])
    for bad, match in ((["--gpr-floor", "2"], "needs --gpr-fit or --gpr-shifts"),
                       (["--gpr-fit", "10", "--gpr-floor", "-1"], ">= 0"),
                       (["--gpr-fit", "10", "--gpr-floor", "two"], "margin")):
        with pytest.raises(SystemExit, match=match):
            train_prompts.main([*base, *bad, "--out", str(root / "bad")])


def test_gpr_shifts_run_recalibrates_tau2_and_bias_on_the_shifted_reading_and_records_k(voc):
    """--gpr-shifts 2 (H-GPR8): training as without it (context and τ1 equal), then τ2 and β alone refitted on
    the shifted copies of training images; the checkpoint carries k, so evaluation and the demo read g that way."""
    from mvpseg.checkpoint import load_prompts, read_meta
    from mvpseg.clip_backbone import load_clip
    from training.cli import clip_spec

    root, clip_args = voc
    base = _base(root, clip_args, iters=4, ckpt_every=4)
    plain = train_prompts.main([*base, "--out", str(root / "s-plain")])
    shifted = train_prompts.main([*base, "--gpr-shifts", "2", "--out", str(root / "s-two")])
    clip = load_clip(clip_spec(train_prompts.build_parser().parse_args(base + ["--out", "x"])), torch.device("cpu"))
    a, b = load_prompts(plain, clip), load_prompts(shifted, clip)
    assert torch.equal(a.ctx, b.ctx) and torch.equal(a.log_tau1, b.log_tau1)
    assert (a.gpr_shifts(), b.gpr_shifts()) == (1, 2) and b.gpr_adapter() is None
    assert not torch.equal(a.log_tau2, b.log_tau2) and not torch.equal(a.bias, b.bias)
    record = read_meta(shifted).extra["gpr_fit"]
    assert record["shifts"]["k"] == 2 and record["shifts"]["loss_last"] < record["shifts"]["loss_first"]
    assert "width" not in record and math.isclose(record["tau2"], float(b.tau2()), rel_tol=1e-5)
    for bad, match in ((["--gpr-shifts", "0"], ">= 1"), (["--gpr-shifts", "2", "--variant", "multi-oc"],
                                                          "global prompt")):
        with pytest.raises(SystemExit, match=match):
            train_prompts.main([*base, *bad, "--out", str(root / "bad")])
