"""The floor under a fitted GPR (mvpseg/gpr_floor.py, --gpr-floor, H-GPR10): the bounded logits against
max(l_fit, l_own − m) written out, that it binds only where the fit fell below, that the shifted reading is bounded
alike, that only g changes, the checkpoint round trip and refusals, and the predictor's use of it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import mvpseg
import mvpseg.gpr_shifts as gs
from mvpseg.checkpoint import CheckpointError, load_prompts, save_prompts
from mvpseg.gpr_floor import GPRFloor
from mvpseg.heads import apply_prompts

NAMES = ("cat", "dog", "sky", "tree", "car")


def _fitted(tiny, k: int = 1):
    """A set with a 'fitted' GPR reading (adapter, τ2, β) unlike its own one."""
    torch.manual_seed(0)
    ps = mvpseg.LearnedPrompts(tiny.text_width, n_seg=2, n_ctx=4, gpr_bias=True)
    net = ps.enable_gpr_adapter(tiny.embed_dim, 6, seed=1)
    with torch.no_grad():
        net.w2.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
        ps.bias.fill_(3.0)
        ps.log_tau2.fill_(float(np.log(0.03)))
    ps.set_gpr_shifts(k)
    return ps.eval()


def _image(seed: int = 0, size: int = 64) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _own(f: torch.Tensor, glob: torch.Tensor, tau2: float, bias: float) -> torch.Tensor:
    """Eq. 6 written out on the features themselves: softmax(γ m)-weighted mean of m, over τ2, minus β. B×C."""
    m = torch.einsum("bdhw,cd->bchw", f, glob).flatten(2)
    return (m * (10.0 * m).softmax(-1)).sum(-1) / tau2 - bias


def test_floored_logits_are_the_max_of_the_fit_and_the_own_reading_less_the_margin(tiny):
    ps = _fitted(tiny)
    x = tiny.dense_features(_image(0)).float()
    with torch.no_grad():
        text = ps.encode(tiny, NAMES)
        fit = apply_prompts(x, text, ps)
        assert fit.gpr_floor is None
        own = _own(x, text.glob, 0.08, 0.0)
        for margin in (0.0, 0.5, 2.0):
            ps.set_gpr_floor(GPRFloor(0.08, 0.0, margin))
            out = apply_prompts(x, text, ps)
            torch.testing.assert_close(out.gpr_logits, torch.maximum(fit.gpr_logits, own - margin))
            torch.testing.assert_close(out.gpr_floor, own - margin)
            assert torch.equal(out.fused_logits, fit.fused_logits) and torch.equal(out.view_masks, fit.view_masks)
            assert torch.equal(out.global_mask, fit.global_mask)
        # the case it exists for: classes the fit reads far lower than the own reading are lifted, no others
        lifted = fit.gpr_logits < own - 2.0
        assert lifted.any() and (~lifted).any()
        assert torch.equal(out.gpr_logits[~lifted], fit.gpr_logits[~lifted])
        assert (out.gpr_logits[lifted] > fit.gpr_logits[lifted]).all()
        ps.set_gpr_floor(GPRFloor(0.08, 0.0, 1e6))  # a floor far below changes nothing
        assert torch.equal(apply_prompts(x, text, ps).gpr_logits, fit.gpr_logits)
        assert apply_prompts(x, text, ps, gpr=False).gpr_logits is None


def test_without_an_adapter_the_floor_reads_the_heads_own_global_mask(tiny):
    """A set refitted without φ (shifts only): the bound comes from the global mask the head already computed."""
    torch.manual_seed(0)
    ps = mvpseg.LearnedPrompts(tiny.text_width, n_seg=2, n_ctx=4, gpr_bias=True).eval()
    with torch.no_grad():
        ps.bias.fill_(3.0)
    x = tiny.dense_features(_image(3)).float()
    with torch.no_grad():
        text = ps.encode(tiny, NAMES)
        fit = apply_prompts(x, text, ps)
        ps.set_gpr_floor(GPRFloor(0.08, 0.0, 2.0))
        out = apply_prompts(x, text, ps)
        own = _own(x, text.glob, 0.08, 0.0)
    torch.testing.assert_close(out.gpr_logits, torch.maximum(fit.gpr_logits, own - 2.0))
    assert (out.gpr_logits > fit.gpr_logits).any()


def test_the_shifted_reading_is_bounded_by_the_unshifted_own_reading(tiny):
    ps = _fitted(tiny, k=2)
    ps.set_gpr_floor(GPRFloor(0.08, -1.0, 2.0))
    x = _image(1)
    with torch.no_grad():
        text = ps.encode(tiny, NAMES)
        copies = gs.shifted_features(tiny, x, 2)
        f = tiny.dense_features(x).float()
        out = gs.with_shifted_gpr(apply_prompts(f, text, ps), lambda k: copies, text.glob, ps)
        raw = gs.shifted_gpr_logits(copies, text.glob, ps)
        torch.testing.assert_close(out.gpr_logits, torch.maximum(raw, _own(f, text.glob, 0.08, -1.0) - 2.0))


def test_checkpoint_carries_the_floor_and_refuses_bad_ones(tiny, tmp_path):
    ps = _fitted(tiny)
    plain = save_prompts(tmp_path / "plain.safetensors", ps, tiny)
    assert "gpr_floor" not in json.loads(plain.with_suffix(".json").read_text())["extra"]
    assert load_prompts(plain, tiny).gpr_floor() is None
    ps.set_gpr_floor(GPRFloor(0.08, -1.25, 2.0))
    path = save_prompts(tmp_path / "p.safetensors", ps, tiny)
    back = load_prompts(path, tiny)
    assert back.gpr_floor() == GPRFloor(0.08, -1.25, 2.0)
    x = tiny.dense_features(_image(2)).float()
    with torch.no_grad():
        text = ps.encode(tiny, NAMES)
        torch.testing.assert_close(apply_prompts(x, text, back).gpr_logits, apply_prompts(x, text, ps).gpr_logits)
    side = path.with_suffix(".json")
    good = json.loads(side.read_text())
    for bad in ({"tau2": 0.08, "bias": 0.0}, {"tau2": -1.0, "bias": 0.0, "margin": 2.0},
                {"tau2": 0.08, "bias": 0.0, "margin": -0.1}, {"tau2": 0.08, "bias": "0", "margin": 2.0},
                {"tau2": 0.08, "bias": True, "margin": 2.0}, [0.08, 0.0, 2.0]):
        meta = json.loads(json.dumps(good))
        meta["extra"]["gpr_floor"] = bad
        side.write_text(json.dumps(meta))
        with pytest.raises(CheckpointError, match="gpr_floor|GPR floor"):
            load_prompts(path, tiny)
    with pytest.raises(ValueError, match="finite"):
        GPRFloor(0.08, float("nan"), 2.0)
    with pytest.raises(ValueError, match="global prompt"):
        mvpseg.LearnedPrompts(tiny.text_width, n_seg=2, n_ctx=4, use_global=False).set_gpr_floor(
            GPRFloor(0.08, 0.0, 2.0))


def test_predictor_scores_classes_with_the_floor(tiny):
    floored = _fitted(tiny, k=2)
    floored.set_gpr_floor(GPRFloor(0.08, -1.0, 0.5))
    p = mvpseg.Predictor(tiny, {"fit": _fitted(tiny, k=2), "floored": floored})
    p.set_image((np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8))
    a, b = p.predict(", ".join(NAMES), "fit"), p.predict(", ".join(NAMES), "floored")
    with torch.no_grad():
        own = _own(tiny.dense_features(p._input).float(), p.text_features(NAMES, "floored").glob, 0.08, -1.0)
    torch.testing.assert_close(b.output.gpr_logits, torch.maximum(a.output.gpr_logits, own - 0.5))
    assert not torch.equal(a.output.gpr_logits, b.output.gpr_logits)
