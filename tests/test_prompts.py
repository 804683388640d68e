import pytest
import torch

from mvpseg import LearnedPrompts, MVPSeg
from mvpseg.losses import LossWeights


def test_shapes_init_and_global_first(tiny):
    torch.manual_seed(0)
    p = LearnedPrompts(tiny.text_width, n_seg=3, n_ctx=32)
    assert p.ctx.shape == (4, 32, tiny.text_width)
    assert abs(float(p.ctx.detach().std()) - 0.02) < 0.002 and abs(float(p.ctx.detach().mean())) < 0.002
    tv = p.encode(tiny, ["cat", "dog"])
    assert tv.seg.shape == (3, 2, tiny.embed_dim) and tv.glob.shape == (2, tiny.embed_dim)
    torch.testing.assert_close(tv.seg.norm(dim=-1), torch.ones(3, 2))
    # p_0 is the global prompt: changing ctx[0] changes only glob
    with torch.no_grad():
        p.ctx[0] += 1.0
    tv2 = p.encode(tiny, ["cat", "dog"])
    torch.testing.assert_close(tv2.seg, tv.seg)
    assert not torch.allclose(tv2.glob, tv.glob)
    assert torch.equal(p.seg_ctx, p.ctx[1:])


def test_class_name_follows_context(tiny):
    p = LearnedPrompts(tiny.text_width, n_seg=1, n_ctx=8, use_global=False)
    prefix, suffix, eot = p._frozen_tokens(tiny, ("potted plant",))
    tokens = tiny.tokenize(["X X X X X X X X potted plant."])[0]
    name_ids = tiny.tokenizer.encode("potted plant.")
    assert tokens[1:9].unique().numel() == 1  # the eight placeholder positions
    assert tokens[9:9 + len(name_ids)].tolist() == name_ids
    assert int(eot[0]) == 9 + len(name_ids)
    torch.testing.assert_close(suffix[0, :len(name_ids)], tiny.token_embeddings(torch.tensor(name_ids)))


def test_over_long_name_rejected(tiny):
    p = LearnedPrompts(tiny.text_width, n_seg=1, n_ctx=32)
    with pytest.raises(ValueError, match="tokens"):
        p.encode(tiny, ["a very long class name " * 3])


def test_only_prompt_vectors_and_temperatures_get_gradients(tiny):
    torch.manual_seed(0)
    model = MVPSeg(tiny, LearnedPrompts(tiny.text_width, n_seg=3, n_ctx=8))
    images = tiny.normalize(torch.rand(2, 3, 64, 96))
    labels = torch.randint(0, 3, (2, 64, 96))
    labels[0, :10] = 255
    out = model(images, ["cat", "dog", "sky"])
    model.losses(out, labels)["total"].backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    trainable = {"prompts.ctx", "prompts.log_tau1", "prompts.log_tau2"}
    assert {n for n, g in grads.items() if g is not None} == trainable
    assert all(float(grads[n].abs().sum()) > 0 for n in trainable)


def test_optimizer_steps_lower_the_loss(tiny):
    torch.manual_seed(0)
    model = MVPSeg(tiny, LearnedPrompts(tiny.text_width, n_seg=3, n_ctx=8))
    images = tiny.normalize(torch.rand(2, 3, 64, 96))
    labels = torch.randint(0, 3, (2, 2, 3)).repeat_interleave(32, 1).repeat_interleave(32, 2)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=1e-3, momentum=0.9)
    feats = model.image_features(images)
    losses = []
    for _ in range(8):
        loss = model.losses(model.head(feats, model.text_features(["cat", "dog", "sky"])), labels,
                            LossWeights())["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] * 0.9, losses
