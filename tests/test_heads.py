import math

import torch
import torch.nn.functional as F

from mvpseg.heads import segment
from mvpseg.prompts import TextViews


def _views(k=3, c=4, d=16, glob=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    seg = F.normalize(torch.randn(k, c, d, generator=g), dim=-1)
    gl = F.normalize(torch.randn(c, d, generator=g), dim=-1) if glob else None
    return TextViews(seg, gl, tuple(f"v{i}" for i in range(k)), tuple(f"c{i}" for i in range(c)))


def _feats(b=2, d=16, h=3, w=5, seed=1):
    return F.normalize(torch.randn(b, d, h, w, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_equations_4_6_8_against_loops():
    feats, text = _feats(), _views()
    tau1, tau2, gamma = 7.5, 0.3, 10.0
    out = segment(feats, text, tau1, tau2, gamma)
    B, D, H, W = feats.shape
    K, C, _ = text.seg.shape
    for b in range(B):
        for c in range(C):
            m_sum = torch.zeros(H, W)
            for i in range(K):
                m = torch.zeros(H, W)
                for y in range(H):
                    for x in range(W):
                        m[y, x] = torch.dot(feats[b, :, y, x], text.seg[i, c]) / (
                            feats[b, :, y, x].norm() * text.seg[i, c].norm())
                torch.testing.assert_close(out.view_masks[b, i, c], m)
                m_sum += m
            torch.testing.assert_close(out.fused_logits[b, c], tau1 * m_sum)
            # Eq. 6: g_c = sigmoid(Σ_x m0(x)·softmax(γ m0)(x) / τ2)
            m0 = torch.einsum("dhw,d->hw", feats[b], text.glob[c]).flatten()
            wts = torch.exp(gamma * m0) / torch.exp(gamma * m0).sum()
            g = 1 / (1 + math.exp(-float((m0 * wts).sum()) / tau2))
            assert abs(float(out.gpr_scores[b, c]) - g) < 1e-6
    # Eq. 4 softmax over classes and Eq. 8 product
    fused = torch.exp(out.fused_logits) / torch.exp(out.fused_logits).sum(1, keepdim=True)
    torch.testing.assert_close(out.fused, fused)
    torch.testing.assert_close(out.final, fused * out.gpr_scores[:, :, None, None])
    torch.testing.assert_close(out.log_final(), torch.log(out.final))


def test_without_global_prompt_final_is_fused():
    out = segment(_feats(), _views(glob=False), 10.0, None)
    assert out.gpr_logits is None and out.global_mask is None
    torch.testing.assert_close(out.final, out.fused)


def test_log_final_upsamples_logits_before_softmax():
    out = segment(_feats(), _views(), 5.0, 0.5)
    up = F.interpolate(out.fused_logits, size=(12, 20), mode="bilinear", align_corners=False)
    ref = torch.log(up.softmax(1) * out.gpr_scores[:, :, None, None])
    torch.testing.assert_close(out.log_final((12, 20)), ref, rtol=1e-5, atol=1e-5)
