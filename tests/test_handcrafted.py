import torch
import torch.nn.functional as F

from mvpseg.handcrafted import IMAGENET_TEMPLATES, MASKCLIP_TEMPLATES, PART_TEMPLATES, PartPrompts, TemplatePrompts


def test_template_lists():
    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert len(MASKCLIP_TEMPLATES) == 85 and "there is a {} in the scene." in MASKCLIP_TEMPLATES
    assert all(t.count("{}") == 1 for t in MASKCLIP_TEMPLATES)


def test_maskclip85_is_renormalised_mean_of_normalised_embeddings(tiny):
    names = ["cat", "traffic light"]
    tv = TemplatePrompts.maskclip85().encode(tiny, names)
    assert tv.seg.shape == (1, 2, tiny.embed_dim) and tv.glob is None
    for c, name in enumerate(names):
        with torch.no_grad():
            e = F.normalize(tiny.model.encode_text(tiny.tokenize([t.format(name) for t in MASKCLIP_TEMPLATES])), dim=-1)
        torch.testing.assert_close(tv.seg[0, c], F.normalize(e.mean(0), dim=0), rtol=1e-4, atol=1e-5)


def test_part_prompts_one_view_per_template(tiny):
    names = ["dog", "bird", "cow"]
    tv = PartPrompts().encode(tiny, names)
    assert tv.seg.shape == (3, 3, tiny.embed_dim) and len(tv.view_names) == 3
    for i, tpl in enumerate(PART_TEMPLATES):
        ref = tiny.encode_text([tpl.format(n) for n in names])
        torch.testing.assert_close(tv.seg[i], ref, rtol=1e-4, atol=1e-5)
    assert PartPrompts().tau1() == 100.0 / 3


def test_a_set_encodes_each_vocabulary_once_and_keeps_a_few(tiny, monkeypatch):
    """Handcrafted sets learn nothing, so a repeated vocabulary costs no text pass (the anchor's targets, the
    residual form's base and a validation score ask for the same one); the oldest of more than 4 is dropped."""
    calls = []
    real = tiny.encode_text
    monkeypatch.setattr(tiny, "encode_text",
                        lambda sentences, **kw: calls.append(len(sentences)) or real(sentences, **kw))
    s = PartPrompts()
    a = s.encode(tiny, ["cat", "dog"])
    b = s.encode(tiny, ("cat", "dog"))
    assert len(calls) == 1 and b.seg is a.seg
    for v in (["sky"], ["car"], ["tree"], ["road"]):
        s.encode(tiny, v)
    assert len(calls) == 5
    torch.testing.assert_close(s.encode(tiny, ["cat", "dog"]).seg, a.seg)  # dropped, encoded again, equal
    assert len(calls) == 6 and calls[0] == 3 * 2
