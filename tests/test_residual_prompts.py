"""Residual prompts (issue #27): t^i_c = norm(h_c + e^i_c − e0^i_c), exactly the handcrafted set at the start."""
import json

import pytest
import torch
import torch.nn.functional as F

from mvpseg import CheckpointError, LearnedPrompts, load_prompts, save_prompts
from mvpseg.handcrafted import handcrafted_set

NAMES = ["cat", "dog", "sky"]


def _residual(tiny, prior="a-photo-of", seed=0):
    torch.manual_seed(seed)
    p = LearnedPrompts(tiny.text_width, n_seg=2, n_ctx=6, residual=True)
    p.set_prior(handcrafted_set(prior))
    return p


def _prior_embedding(tiny, name, names=NAMES):
    return F.normalize(handcrafted_set(name).encode(tiny, names).seg.mean(0), dim=-1)


def test_at_the_start_every_view_is_the_handcrafted_set(tiny):
    p = _residual(tiny, "parts")
    tv = p.encode(tiny, NAMES)
    h = _prior_embedding(tiny, "parts")  # the normalised mean of the three part views
    torch.testing.assert_close(tv.seg, h.expand(2, -1, -1), atol=1e-6, rtol=0)
    torch.testing.assert_close(tv.glob, h, atol=1e-6, rtol=0)


def test_after_learning_the_formula_and_gradients(tiny):
    p = _residual(tiny)
    ctx0 = p.ctx.detach().clone()
    with torch.no_grad():
        p.ctx.add_(0.3 * torch.randn_like(p.ctx))
    tv = p.encode(tiny, NAMES)
    e = p.encode_context(tiny, NAMES, p.ctx.detach())
    e0 = p.encode_context(tiny, NAMES, ctx0)
    want = F.normalize(_prior_embedding(tiny, "a-photo-of")[None] + e - e0, dim=-1)
    torch.testing.assert_close(torch.cat([tv.glob[None], tv.seg]), want, atol=1e-6, rtol=0)
    assert not torch.allclose(tv.seg, want[0].expand_as(tv.seg))  # learning moved the views apart
    tv.seg.sum().backward()
    assert p.ctx.grad is not None and p.ctx.grad.abs().sum() > 0
    assert p.ctx0.grad is None and not p.ctx0.requires_grad


def test_plain_form_is_unchanged_and_residual_needs_its_prior(tiny):
    torch.manual_seed(0)
    plain = LearnedPrompts(tiny.text_width, n_seg=2, n_ctx=6)
    assert not plain.residual and "ctx0" not in plain.state_dict()
    torch.testing.assert_close(torch.cat([plain.encode(tiny, NAMES).glob[None], plain.encode(tiny, NAMES).seg]),
                               plain.encode_context(tiny, NAMES, plain.ctx))
    bare = LearnedPrompts(tiny.text_width, n_seg=2, n_ctx=6, residual=True)
    with pytest.raises(RuntimeError, match="set_prior"):
        bare.encode(tiny, NAMES)


def test_rebase_and_text_identity(tiny):
    p = _residual(tiny)
    before = p.text_identity()
    with torch.no_grad():
        p.ctx.add_(0.3)
    changed = p.encode(tiny, NAMES).seg
    p.set_prior(handcrafted_set("a-photo-of"), rebase=False)  # keeps ctx0: the same embeddings
    torch.testing.assert_close(p.encode(tiny, NAMES).seg, changed)
    p.set_prior(handcrafted_set("a-photo-of"))  # rebase: handcrafted again
    torch.testing.assert_close(p.encode(tiny, NAMES).seg[0], _prior_embedding(tiny, "a-photo-of"), atol=1e-6,
                               rtol=0)
    assert not torch.equal(p.text_identity()[1]["ctx0"], before[1]["ctx0"])
    p.set_prior(handcrafted_set("parts"), rebase=False)
    assert p.text_identity()[0] != before[0]  # another prior: another cache key


def test_checkpoint_round_trip_and_refusals(tiny, tmp_path):
    p = _residual(tiny, "parts")
    with torch.no_grad():
        p.ctx.add_(0.2 * torch.randn_like(p.ctx))
    path = save_prompts(tmp_path / "r.safetensors", p, tiny)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["residual_prior"] == "parts"
    q = load_prompts(path, tiny)
    assert q.residual and q.prior.name == "parts" and torch.equal(q.ctx0, p.ctx0)
    torch.testing.assert_close(q.encode(tiny, NAMES).seg, p.encode(tiny, NAMES).seg)
    meta["residual_prior"] = None  # the tensors hold ctx0, the metadata says plain
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="residual"):
        load_prompts(path, tiny)
    meta["residual_prior"] = "no-such-set"
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="no-such-set"):
        load_prompts(path, tiny)
    custom = LearnedPrompts(tiny.text_width, n_seg=2, n_ctx=6, residual=True)
    with pytest.raises(CheckpointError, match="set_prior"):
        save_prompts(tmp_path / "c.safetensors", custom, tiny)


def test_shared_prefix_encoder_composes_the_same(tiny):
    from training.shared_prefix import SharedPrefixEncoder

    p = _residual(tiny)
    with torch.no_grad():
        p.ctx.add_(0.2 * torch.randn_like(p.ctx))
    a = SharedPrefixEncoder(tiny).encode(p, NAMES)
    b = p.encode(tiny, NAMES)
    torch.testing.assert_close(a.seg, b.seg, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.glob, b.glob, atol=1e-5, rtol=0)
