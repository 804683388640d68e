"""benchmarks/gpr_analysis.py presence: the candidate presence scores against direct formulas (issue #28)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpr_analysis as ga  # noqa: E402
from mvpseg.heads import segment  # noqa: E402
from mvpseg.prompts import LearnedPrompts  # noqa: E402


def test_pool_is_eq6_softmax_pooling():
    torch.manual_seed(0)
    m = torch.rand(3, 4, 5) * 2 - 1
    flat = m.flatten(1)
    w = torch.exp(7.0 * flat) / torch.exp(7.0 * flat).sum(-1, keepdim=True)
    torch.testing.assert_close(ga._pool(m, 7.0), (flat * w).sum(-1))
    torch.testing.assert_close(ga._pool(m, 0.0), flat.mean(-1))  # γ = 0: the mean
    torch.testing.assert_close(ga._pool(m, 1e4), flat.max(-1).values, atol=1e-3, rtol=0)  # γ → ∞: the max


def test_presence_scores_of_one_image(tiny):
    torch.manual_seed(1)
    ps = LearnedPrompts(tiny.text_width, n_seg=3, n_ctx=4, gpr_bias=True).eval()
    with torch.no_grad():
        ps.bias.fill_(0.3)
        vocab = ("red cat", "blue dog", "green owl")
        text = ps.encode(tiny, vocab).detach()
        image = torch.rand(3, 96, 96)
        out = segment(tiny.dense_features(tiny.normalize(image[None])).float(), text, ps.tau1(), ps.tau2(), 10.0,
                      ps.gpr_bias())
        prior = torch.nn.functional.normalize(torch.randn(3, text.seg.shape[-1]), dim=-1)
        s = ga._presence_scores(tiny, text, out, tiny.normalize(image[None]), prior)
        feats = tiny.dense_features(tiny.normalize(image[None])).float()[0]  # D×h×w
    assert all(v.shape == (3,) for v in s.values()) and len(s) == 15
    for i in range(3):
        torch.testing.assert_close(s[f"pooled view {i} mask"], ga._pool(out.view_masks[0, i]))
    cos = torch.einsum("cd,dhw->chw", prior, torch.nn.functional.normalize(feats, dim=0))
    torch.testing.assert_close(s["pooled prior mask"], ga._pool(cos))
    assert torch.equal(s["g (Eq. 6, γ 10)"], out.gpr_logits[0])
    # Eq. 6: g's logit is the γ = 10 pooling over τ2, minus β, so every pooling below ranks as g does at γ 10
    torch.testing.assert_close(ga._pool(out.global_mask[0]) / ps.tau2() - 0.3, out.gpr_logits[0])
    prob = out.fused_logits[0].softmax(0).flatten(1)
    torch.testing.assert_close(s["max fused probability"], prob.max(-1).values)
    assert s["pixel share of the argmax"].sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(s["pooled mean view mask"], ga._pool(out.view_masks[0].mean(0)))


def test_oracle_probes_against_direct_formulas():
    torch.manual_seed(2)
    x = torch.nn.functional.normalize(torch.randn(5, 8, 9), dim=1)  # B×D×N unit-norm dense features
    linear, params = ga.probe(8, 3, 0)
    w, bias, log_scale = params
    with torch.no_grad():
        bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    cos = torch.nn.functional.normalize(w, dim=-1) @ x  # B×C×N
    direct = (cos * torch.softmax(10 * cos, -1)).sum(-1) * log_scale.exp() - bias
    torch.testing.assert_close(linear(x), direct)
    mlp, params = ga.probe(8, 3, 16)
    out = mlp(x)
    assert out.shape == (5, 3)
    w1, b1, w2, b2, w3, b3, log_gamma = params
    gelu = torch.nn.functional.gelu
    h = gelu(torch.einsum("hd,bdn->bhn", w1[..., 0], x) + b1[:, None])
    h = gelu(torch.einsum("gh,bhn->bgn", w2[..., 0], h) + b2[:, None])
    z = torch.einsum("ch,bhn->bcn", w3[..., 0], h) + b3[:, None]  # B×C×N: one logit per class and patch
    torch.testing.assert_close(out, (z * torch.softmax(log_gamma.exp() * z, -1)).sum(-1))
    torch.testing.assert_close(mlp(x[:, :, torch.randperm(9)]), out)  # the pooling ignores where patches are
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)


def test_adapter_probe_starts_at_eq6_and_learns_from_seen_columns_only():
    torch.manual_seed(3)
    x = torch.randn(6, 8, 9)  # B×D×N dense features (not unit-norm: the probe normalises them)
    text = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    plain, (log_scale, bias) = ga.adapter_probe(text, 0)
    cos = text @ torch.nn.functional.normalize(x, dim=1)  # B×C×N
    eq6 = (cos * torch.softmax(10 * cos, -1)).sum(-1) * log_scale.exp() - bias
    torch.testing.assert_close(plain(x), eq6)
    adapted, params = ga.adapter_probe(text, 16)
    torch.testing.assert_close(adapted(x), eq6)  # φ's output layer starts at zero: the start is Eq. 6 itself
    y = (torch.rand(6, 4) > 0.5).float()
    ga._fit(adapted, params, x, y, [0, 1], steps=5, full_batch=True)
    out = adapted(x)
    assert not torch.allclose(out[:, 2:], eq6[:, 2:])  # the shared φ moves the columns it was not trained on too
    flipped = y.clone()
    flipped[:, 2:] = 1 - flipped[:, 2:]  # other labels for the columns outside training: nothing changes
    torch.manual_seed(4)
    again, params = ga.adapter_probe(text, 16)
    torch.manual_seed(4)
    again2, params2 = ga.adapter_probe(text, 16)
    ga._fit(again, params, x, y, [0, 1], steps=5, full_batch=True)
    ga._fit(again2, params2, x, flipped, [0, 1], steps=5, full_batch=True)
    torch.testing.assert_close(again(x), again2(x))


def test_predict_with_another_g(tiny):
    torch.manual_seed(5)
    ps = LearnedPrompts(tiny.text_width, n_seg=3, n_ctx=4, gpr_bias=True).eval()
    with torch.no_grad():
        text = ps.encode(tiny, ("red cat", "blue dog", "green owl")).detach()
        out = segment(tiny.dense_features(tiny.normalize(torch.rand(1, 3, 96, 96))).float(), text, ps.tau1(),
                      ps.tau2(), 10.0, ps.gpr_bias())
    assert torch.equal(ga._predict(out, (32, 32), 1.0, out.gpr_logits), ga._predict(out, (32, 32), 1.0))
    views = ga._predict(out, (32, 32), 0.0)
    top = int(views.flatten().mode().values)
    g = torch.full((1, 3), 20.0)
    g[0, top] = -50.0  # a class scored absent loses every pixel under Eq. 8; the others keep the views' order
    refined = ga._predict(out, (32, 32), 1.0, g)
    assert not (refined == top).any()
    keep = views != top
    assert torch.equal(refined[keep], views[keep])
