"""The GPR adapter φ (mvpseg/gpr_adapter.py, option --gpr-adapter): its formula against a direct computation, the
identity at its start, that only GPR reads it, its checkpoint round trip and refusals, and the global-only
learning step (its gradients are those of the full step; the views do not move)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mvpseg
from mvpseg.gpr_adapter import GPRAdapter
from mvpseg.heads import apply_prompts, gpr_logits, segment, view_masks
from mvpseg.learning import PromptLearner
from mvpseg.learning.recipe import LearnRecipe
from mvpseg.model import MVPSeg
from training.shared_prefix import SharedPrefixEncoder


def _feats(dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(2, dim, 5, 6, generator=g), dim=1)


def _trained(adapter: GPRAdapter, seed: int = 1) -> GPRAdapter:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return adapter


def test_adapter_is_the_direct_formula_and_the_identity_at_its_start():
    f = _feats(8)
    fresh = GPRAdapter(8, 5, seed=3)
    torch.testing.assert_close(fresh(f), f)  # W2 = 0, b2 = 0: norm(f + 0) = f
    a = _trained(GPRAdapter(8, 5))
    x = f.permute(0, 2, 3, 1)  # B×h×w×D: one feature vector per position
    hidden = F.gelu(x @ a.w1.T + a.b1)
    direct = F.normalize(x + hidden @ a.w2.T + a.b2, dim=-1).permute(0, 3, 1, 2)
    torch.testing.assert_close(a(f), direct)
    torch.testing.assert_close(a(f).norm(dim=1), torch.ones(2, 5, 6))
    torch.testing.assert_close(a(3.0 * f), a(f))  # it reads unit-norm features, whatever their scale

    # its own generator: the global random state is untouched and the draw depends only on the seed
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    b, c = GPRAdapter(8, 5, seed=7), GPRAdapter(8, 5, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(b.w1, c.w1) and not torch.equal(b.w1, GPRAdapter(8, 5, seed=8).w1)
    assert float(b.w1.abs().max()) <= 1 / np.sqrt(8)


def test_only_gpr_reads_the_adapted_features(tiny):
    torch.manual_seed(0)
    ps = mvpseg.LearnedPrompts(tiny.text_width, n_seg=2, n_ctx=4, gpr_bias=True)
    names = ("cat", "dog", "sky")
    text = ps.encode(tiny, names)
    f = _feats(tiny.embed_dim)
    plain = apply_prompts(f, text, ps, 10.0)
    adapter = ps.enable_gpr_adapter(tiny.embed_dim, 16, seed=0)
    torch.testing.assert_close(apply_prompts(f, text, ps, 10.0).gpr_logits, plain.gpr_logits)  # identity at start
    _trained(adapter)
    out = apply_prompts(f, text, ps, 10.0)
    direct = gpr_logits(view_masks(adapter(f), text.glob[None])[:, 0], 10.0, ps.tau2(), ps.bias)
    torch.testing.assert_close(out.gpr_logits, direct)
    assert not torch.allclose(out.gpr_logits, plain.gpr_logits)
    torch.testing.assert_close(out.fused_logits, plain.fused_logits)  # the views keep the frozen features
    torch.testing.assert_close(out.view_masks, plain.view_masks)
    torch.testing.assert_close(MVPSeg(tiny, ps).head(f, text).gpr_logits, direct)  # the model's head applies it
    no_gpr = apply_prompts(f, text, ps, 10.0, gpr=False)
    assert no_gpr.gpr_logits is None and torch.allclose(no_gpr.final, plain.fused)
    # gradients reach φ through Eq. 6 (and the global prompt's text)
    out.gpr_logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    with pytest.raises(ValueError, match="global prompt"):
        mvpseg.LearnedPrompts(tiny.text_width, n_seg=2, n_ctx=4, use_global=False).enable_gpr_adapter(8, 4)


def test_predictor_applies_the_adapter(tiny):
    torch.manual_seed(0)
    ps = mvpseg.LearnedPrompts(tiny.text_width, n_seg=2, n_ctx=4, gpr_bias=True)
    _trained(ps.enable_gpr_adapter(tiny.embed_dim, 16))
    pred = mvpseg.build_predictor(tiny, short_side=64, max_long_side=256)
    pred.add_prompt_set("learned", ps)
    pred.set_image(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8))
    r = pred.predict("cat, dog, sky", prompts="learned")
    with torch.no_grad():
        text = ps.encode(tiny, ("cat", "dog", "sky"))
        feats = pred.image_features.float()
        direct = torch.sigmoid(segment(feats, text, ps.tau1(), ps.tau2(), pred.gamma, ps.bias,
                                       ps.gpr_adapter()).gpr_logits)[0]
        eq6 = torch.sigmoid(segment(feats, text, ps.tau1(), ps.tau2(), pred.gamma, ps.bias).gpr_logits)[0]
    np.testing.assert_allclose(r.gpr_scores, direct.numpy(), rtol=1e-4, atol=1e-5)
    assert np.abs(r.gpr_scores - eq6.numpy()).max() > 1e-3  # not Eq. 6 on the frozen features


def test_checkpoint_round_trip_and_refusals(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    ps = mvpseg.LearnedPrompts(tiny.text_width, n_seg=2, n_ctx=4, gpr_bias=True)
    _trained(ps.enable_gpr_adapter(tiny.embed_dim, 6))
    path = mvpseg.save_prompts(tmp_path / "a.safetensors", ps, tiny)
    tensors = load_file(str(path))
    assert {k for k in tensors if k.startswith("gpr_adapter.")} == {f"gpr_adapter.{k}" for k in ("w1", "b1", "w2", "b2")}
    back = mvpseg.load_prompts(path, tiny)
    for k, v in ps.gpr_adapter().state_dict().items():
        assert torch.equal(back.gpr_adapter().state_dict()[k], v)
    f = _feats(tiny.embed_dim)
    text = ps.encode(tiny, ("cat", "sky"))
    torch.testing.assert_close(apply_prompts(f, text, back, 10.0).gpr_logits, apply_prompts(f, text, ps, 10.0).gpr_logits)
    # a file without an adapter reads as before
    plain = mvpseg.LearnedPrompts(tiny.text_width, n_seg=2, n_ctx=4)
    assert mvpseg.load_prompts(mvpseg.save_prompts(tmp_path / "p", plain, tiny), tiny).gpr_adapter() is None

    def broken(name: str, change) -> str:
        bad = dict(tensors)
        change(bad)
        st = tmp_path / f"{name}.safetensors"
        save_file(bad, str(st))
        (tmp_path / f"{name}.json").write_text((tmp_path / "a.json").read_text())
        with pytest.raises(mvpseg.CheckpointError) as e:
            mvpseg.load_prompts(st, tiny)
        return str(e.value)

    assert "expected" in broken("missing", lambda t: t.pop("gpr_adapter.b2"))
    assert "shape" in broken("shape", lambda t: t.update({"gpr_adapter.w2": torch.zeros(tiny.embed_dim, 5)}))
    assert "NaN" in broken("nan", lambda t: t["gpr_adapter.b1"].fill_(float("nan")))
    other = GPRAdapter(tiny.embed_dim + 2, 6).checkpoint_tensors()
    assert "embeds" in broken("dim", lambda t: t.update(other))


def test_global_only_step_has_the_full_steps_gradients_and_keeps_the_views(tiny):
    """``step_global`` (one text pass of the global prompt) gives the global branch (its context row, τ2, β, φ)
    the gradients ``step`` gives it, and leaves the views' rows of ``ctx`` and τ1 as they were."""
    names = ("cat", "dog", "sky")
    g = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(2, tiny.embed_dim, 4, 4, generator=g), dim=1)
    labels = torch.randint(0, 3, (2, 16, 16), generator=g)
    labels[1, :8] = 255
    recipe = LearnRecipe(cls_mode="bce", lambda_prior=0.0, init_fit=0, calib_steps=0, residual=False)

    def learner(encoder: bool):
        torch.manual_seed(0)
        ps = mvpseg.LearnedPrompts(tiny.text_width, n_seg=2, n_ctx=4, gpr_bias=True)
        _trained(ps.enable_gpr_adapter(tiny.embed_dim, 8))
        return PromptLearner(MVPSeg(tiny, ps), recipe, encoder=SharedPrefixEncoder(tiny) if encoder else None)

    full, alone = learner(False), learner(True)
    grads = {}
    for name, lr in (("full", full), ("alone", alone)):
        lr.opt = torch.optim.SGD(lr.params, lr=0.0)  # gradients only: nothing moves
        before = {k: v.detach().clone() for k, v in lr.prompts.state_dict().items()}
        if name == "full":
            lr.step(feats, labels, names)
        else:
            seg = lr.text(names).seg.detach()
            lr.step_global(feats, labels, names, seg)
        grads[name] = {n: None if p.grad is None else p.grad.clone() for n, p in lr.prompts.named_parameters()}
        assert all(torch.equal(before[k], v) for k, v in lr.prompts.state_dict().items())
    for n, gr in grads["alone"].items():
        if n == "ctx":
            torch.testing.assert_close(gr[0], grads["full"][n][0], rtol=1e-3, atol=1e-5)
            assert gr[1:].abs().max() == 0  # the views get no gradient from the global branch's loss
        elif n != "log_tau1":
            torch.testing.assert_close(gr, grads["full"][n], rtol=1e-3, atol=1e-5)
    # with a real optimiser step the global branch moves and the views stay exactly where they were
    alone.opt = torch.optim.AdamW(alone.params, lr=0.05, weight_decay=0.1)
    alone.step(feats, labels, names)  # momentum for every tensor, the views' included
    views, tau1 = alone.prompts.ctx.detach()[1:].clone(), alone.prompts.log_tau1.detach().clone()
    glob, w2 = alone.prompts.ctx.detach()[0].clone(), alone.prompts.gpr_adapter().w2.detach().clone()
    alone.step_global(feats, labels, names, alone.text(names).seg.detach())
    assert torch.equal(alone.prompts.ctx[1:], views) and torch.equal(alone.prompts.log_tau1, tau1)
    assert not torch.equal(alone.prompts.ctx[0], glob) and not torch.equal(alone.prompts.gpr_adapter().w2, w2)


@pytest.mark.parametrize("residual", [False, True])
def test_global_prompt_encoded_alone_equals_its_row_of_the_full_encoding(tiny, residual):
    from mvpseg.handcrafted import handcrafted_set

    torch.manual_seed(0)
    ps = mvpseg.LearnedPrompts(tiny.text_width, n_seg=2, n_ctx=4, residual=residual)
    if residual:
        ps.set_prior(handcrafted_set("a-photo-of"))
        with torch.no_grad():
            ps.ctx.add_(0.05 * torch.randn_like(ps.ctx))  # away from ctx0, so the residual term is not zero
    names = ("cat", "dog", "sky")
    full = ps.encode(tiny, names).glob
    torch.testing.assert_close(ps.encode_global(tiny, names), full, rtol=1e-5, atol=1e-6)
    plain = SharedPrefixEncoder(tiny).encode_plain(ps, names, rows=slice(0, 1))
    assert plain.shape == (1, 3, tiny.embed_dim)
    torch.testing.assert_close(ps.encode_global(tiny, names, plain), full, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no global prompt"):
        mvpseg.LearnedPrompts(tiny.text_width, n_seg=2, n_ctx=4, use_global=False).encode_global(tiny, names)
