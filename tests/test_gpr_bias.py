"""Calibrated GPR (issue #28, option --gpr-bias): Eq. 6 with a learned logit offset, g_c = σ(s_c/τ2 − β) — the
formula, its checkpoint round trip (older files without β stay readable), and the calibration moving β."""
from __future__ import annotations

import pytest
import torch

import mvpseg
from mvpseg.heads import gpr_logits, segment
from mvpseg.learning import calibrate_temperatures
from mvpseg.losses import LossWeights
from mvpseg.model import MVPSeg


def test_eq6_with_bias_is_the_direct_formula():
    torch.manual_seed(0)
    m0 = torch.rand(2, 3, 4, 5) * 0.4  # positive cosines, as CLIP's are
    gamma, tau2, beta = 10.0, 0.07, 1.5
    flat = m0.flatten(2)
    w = torch.exp(gamma * flat) / torch.exp(gamma * flat).sum(-1, keepdim=True)
    s = (flat * w).sum(-1)
    torch.testing.assert_close(gpr_logits(m0, gamma, tau2, beta), s / tau2 - beta)
    torch.testing.assert_close(gpr_logits(m0, gamma, tau2), s / tau2)  # β = 0: the paper's Eq. 6
    assert (torch.sigmoid(gpr_logits(m0, gamma, tau2)) > 0.5).all()  # why a bias is needed at all


def test_prompts_learn_and_store_the_bias_only_when_asked(tiny, tmp_path):
    plain = mvpseg.LearnedPrompts(tiny.text_width, n_seg=2, n_ctx=4)
    assert plain.gpr_bias() == 0.0 and "gpr_bias" not in plain.checkpoint_tensors()
    with pytest.raises(ValueError, match="global prompt"):
        mvpseg.LearnedPrompts(tiny.text_width, n_seg=2, n_ctx=4, use_global=False, gpr_bias=True)
    calibrated = mvpseg.LearnedPrompts(tiny.text_width, n_seg=2, n_ctx=4, gpr_bias=True)
    assert calibrated.gpr_bias().requires_grad and any(p is calibrated.bias for p in calibrated.parameters())
    with torch.no_grad():
        calibrated.bias.fill_(2.25)
    path = mvpseg.save_prompts(tmp_path / "c.safetensors", calibrated, tiny)
    back = mvpseg.load_prompts(path, tiny)
    assert float(back.gpr_bias()) == 2.25
    old = mvpseg.load_prompts(mvpseg.save_prompts(tmp_path / "p.safetensors", plain, tiny), tiny)
    assert old.gpr_bias() == 0.0  # files without β read as before
    # the head uses it: the same features and text, every GPR logit lowered by β
    feats = torch.nn.functional.normalize(torch.randn(1, tiny.embed_dim, 4, 4), dim=1)
    text = back.encode(tiny, ("cat", "sky"))
    a = segment(feats, text, back.tau1(), back.tau2(), 10.0)
    b = MVPSeg(tiny, back).head(feats, text)
    torch.testing.assert_close(b.gpr_logits, a.gpr_logits - 2.25)


def test_calibration_fits_the_bias_so_absent_classes_fall_below_one_half(tiny):
    """β joins τ1/τ2 in the calibration (context frozen). Every pixel's feature is the global prompt's embedding
    of "sky", the only class present: s_sky = 1 exceeds every other s_c, yet those are positive too, so without β
    no τ2 puts an absent class below g = 0.5; with β the fitted BCE ends lower (0.43 against 0.77 here) and the
    absent classes fall below 0.5, under the present one."""
    names = ("background", "cat", "dog", "sky")
    labels = torch.full((2, 24, 24), 3, dtype=torch.long)
    final = {}
    for with_bias in (False, True):
        torch.manual_seed(0)
        model = MVPSeg(tiny, mvpseg.LearnedPrompts(tiny.text_width, n_seg=2, n_ctx=4, gpr_bias=with_bias))
        with torch.no_grad():
            glob = model.text_features(names).glob  # C×D, unit norm
        assert (glob @ glob[3] > 0).all()  # positive cosines to "sky" for every name
        feats = glob[3][None, :, None, None].expand(2, -1, 6, 6).contiguous()
        ctx = model.prompts.ctx.detach().clone()

        def cls(out, y):
            return model.losses(out, y, LossWeights(seg=0.0, oc=0.0), "bce")["cls"]

        calibrate_temperatures(model, None, names, [(feats, labels)] * 300, cls, steps=300, lr=0.05)
        with torch.no_grad():
            out = model.head(feats, model.text_features(names))
        scores = out.gpr_scores
        final[with_bias] = (float(cls(out, labels)), scores[:, :3].max().item(), scores[:, 3].min().item())
        assert torch.equal(model.prompts.ctx.detach(), ctx)  # the context never moves in the calibration
    assert final[False][1] > 0.5  # without β an absent class cannot fall below one half
    assert final[True][1] < 0.5 and final[True][1] < final[True][2] and final[True][0] < final[False][0], final
