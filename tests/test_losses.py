import math

import pytest
import torch
import torch.nn.functional as F

from mvpseg.heads import segment
from mvpseg.losses import LossWeights, cls_loss, compute_losses, oc_loss, presence_targets, seg_loss
from mvpseg.prompts import TextViews


def test_ocloss_orthogonal_is_zero_identical_is_one():
    k, n, w = 4, 5, 16
    basis = torch.eye(w)[:k]  # orthogonal token-averages
    ctx = basis[:, None, :].repeat(1, n, 1)
    assert float(oc_loss(ctx)) == pytest.approx(0.0, abs=1e-7)
    same = torch.randn(1, n, w).repeat(k, 1, 1)
    assert float(oc_loss(same)) == pytest.approx(1.0, rel=1e-6)  # mean over pairs: 1 for any k
    anti = torch.cat([same[:1], -same[:1]])  # |cos| makes opposite prompts as bad as identical ones
    assert float(oc_loss(anti)) == pytest.approx(1.0, rel=1e-6)
    assert float(oc_loss(torch.randn(1, n, w))) == 0.0


def test_ocloss_matches_direct_formula_and_has_gradient():
    torch.manual_seed(0)
    ctx = torch.randn(3, 32, 24, requires_grad=True)
    p = ctx.detach().mean(1)
    ref = sum(abs(float(p[i] @ p[j]) / float(p[i].norm() * p[j].norm())) for i in range(3) for j in range(i + 1, 3)) / 3
    loss = oc_loss(ctx)
    assert float(loss) == pytest.approx(ref, rel=1e-5)
    loss.backward()
    assert ctx.grad.abs().sum() > 0


def test_paper_weights_rescale_the_summed_ocloss():
    """λ3 = 100 on Eq. 5's sum equals LossWeights.paper(k).oc on the mean, for every k."""
    torch.manual_seed(1)
    for k in (2, 3, 5):
        ctx = torch.randn(k, 4, 8)
        p = F.normalize(ctx.mean(1), dim=-1)
        summed = sum(abs(float(p[i] @ p[j])) for i in range(k) for j in range(i + 1, k))
        assert LossWeights.paper(k).oc * float(oc_loss(ctx)) == pytest.approx(100 * summed, rel=1e-5)
    assert (LossWeights.paper(3).seg, LossWeights.paper(3).cls) == (1.0, 3.0)


def test_presence_targets_ignore_255():
    labels = torch.tensor([[[0, 0], [2, 255]], [[255, 255], [1, 1]]])
    assert presence_targets(labels, 3).tolist() == [[1, 0, 1], [0, 1, 0]]


def test_presence_targets_match_a_direct_count_whatever_the_order_of_ignored_pixels():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (6, 7, 9), generator=g)
    labels[0] = 255
    labels[1, :3] = 9  # beyond the vocabulary: not a class of it
    # class 0 first, then only ignored / out-of-range pixels after it in raster order: the case a scatter of
    # 0s for non-class pixels got wrong (the later 0 overwrote class 0's 1)
    labels[2] = 255
    labels[2, 0, 0] = 0
    labels[3] = 3
    labels[3, 0, :2] = 0
    labels[3, 4:] = 255
    labels[3, -1, -1] = 9
    out = presence_targets(labels, 6)
    direct = torch.tensor([[float((labels[i] == c).any()) for c in range(6)] for i in range(6)])
    assert out.shape == (6, 6) and torch.equal(out, direct) and out[0].sum() == 0
    assert out[2].tolist() == [1, 0, 0, 0, 0, 0] and out[3, 0] == 1


def test_cls_losses_against_formulas():
    z = torch.tensor([[2.0, -1.0, 0.5]])
    y = torch.tensor([[1.0, 0.0, 1.0]])
    g = torch.sigmoid(z)
    paper = -(y * torch.log(g)).sum() / 3
    bce = -(y * torch.log(g) + (1 - y) * torch.log(1 - g)).sum() / 3
    assert float(cls_loss(z, y, "paper")) == pytest.approx(float(paper), rel=1e-6)
    assert float(cls_loss(z, y, "bce")) == pytest.approx(float(bce), rel=1e-6)
    with pytest.raises(ValueError):
        cls_loss(z, y, "other")


def _out(seed=0, glob=True):
    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(2, 8, 2, 3, generator=g), dim=1)
    seg = F.normalize(torch.randn(2, 3, 8, generator=g), dim=-1)
    gl = F.normalize(torch.randn(3, 8, generator=g), dim=-1) if glob else None
    return segment(feats, TextViews(seg, gl, ("a", "b"), ("x", "y", "z")), 6.0, 0.4 if glob else None)


def test_seg_loss_is_pixel_cross_entropy_of_final_masks():
    out = _out()
    labels = torch.randint(0, 3, (2, 4, 6), generator=torch.Generator().manual_seed(3))
    labels[0, 0, :] = 255
    final = torch.exp(out.log_final((4, 6)))
    vals = [-math.log(float(final[b, labels[b, y, x], y, x]))
            for b in range(2) for y in range(4) for x in range(6) if labels[b, y, x] != 255]
    assert float(seg_loss(out, labels)) == pytest.approx(sum(vals) / len(vals), rel=1e-5)
    all_ignored = torch.full((2, 4, 6), 255)
    assert float(seg_loss(out, all_ignored)) == 0.0


def test_total_is_weighted_sum():
    out = _out()
    labels = torch.randint(0, 3, (2, 4, 6))
    ctx = torch.randn(3, 4, 8)
    w = LossWeights(1.0, 3.0, 100.0)
    d = compute_losses(out, labels, ctx, w)
    assert float(d["total"]) == pytest.approx(float(d["seg"] + 3 * d["cls"] + 100 * d["oc"]), rel=1e-6)
    assert float(d["oc"]) == pytest.approx(float(oc_loss(ctx)), rel=1e-6)
    no_gpr = compute_losses(_out(glob=False), labels, ctx[:1], w)
    assert float(no_gpr["cls"]) == 0.0 and float(no_gpr["oc"]) == 0.0


def test_class_reduction_weighs_every_present_class_alike():
    out = _out()
    labels = torch.zeros(2, 4, 6, dtype=torch.long)  # class 0 dominates the pixels
    labels[0, 0, 0], labels[1, 3, 5], labels[1, 2, 2] = 1, 2, 2
    labels[0, 1, :] = 255
    final = torch.exp(out.log_final((4, 6)))
    per = {c: [] for c in range(3)}
    for b in range(2):
        for y in range(4):
            for x in range(6):
                c = int(labels[b, y, x])
                if c != 255:
                    per[c].append(-math.log(float(final[b, c, y, x])))
    ref = sum(sum(v) / len(v) for v in per.values()) / 3
    assert float(seg_loss(out, labels, reduction="class")) == pytest.approx(ref, rel=1e-5)
    pixel = sum(sum(v) for v in per.values()) / sum(len(v) for v in per.values())
    assert float(seg_loss(out, labels, reduction="pixel")) == pytest.approx(pixel, rel=1e-5)
    with pytest.raises(ValueError, match="seg reduction"):
        seg_loss(out, labels, reduction="sum")


def test_anchor_loss_against_its_formula_and_gradient():
    from mvpseg.losses import anchor_loss

    g = torch.Generator().manual_seed(5)
    views = F.normalize(torch.randn(3, 4, 8, generator=g), dim=-1).requires_grad_(True)
    targets = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    ref = 0.0
    for c in range(4):
        m = views[:, c].detach().mean(0)
        ref += 1 - float(m @ targets[c]) / float(m.norm())
    loss = anchor_loss(views, targets)
    assert float(loss) == pytest.approx(ref / 4, rel=1e-5)
    loss.backward()
    assert views.grad.abs().sum() > 0
    same = targets[None].repeat(3, 1, 1)
    assert float(anchor_loss(same, targets)) == pytest.approx(0.0, abs=1e-6)
