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
        s = ga._presence_scores(tiny, text, out, tiny.normalize(image[None]))
    assert all(v.shape == (3,) for v in s.values()) and len(s) == 11
    assert torch.equal(s["g (Eq. 6, γ 10)"], out.gpr_logits[0])
    # Eq. 6: g's logit is the γ = 10 pooling over τ2, minus β, so every pooling below ranks as g does at γ 10
    torch.testing.assert_close(ga._pool(out.global_mask[0]) / ps.tau2() - 0.3, out.gpr_logits[0])
    prob = out.fused_logits[0].softmax(0).flatten(1)
    torch.testing.assert_close(s["max fused probability"], prob.max(-1).values)
    assert s["pixel share of the argmax"].sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(s["pooled mean view mask"], ga._pool(out.view_masks[0].mean(0)))
