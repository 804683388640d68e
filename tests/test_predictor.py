import numpy as np
import pytest
import torch

from mvpseg import LearnedPrompts, Predictor, VocabularyError, build_predictor, parse_vocabulary
from mvpseg.heads import segment


@pytest.fixture()
def pred(tiny):
    torch.manual_seed(0)
    p = build_predictor(tiny, short_side=64, max_long_side=256)
    p.add_prompt_set("learned", LearnedPrompts(tiny.text_width, n_seg=3, n_ctx=8))
    return p


@pytest.mark.parametrize("shape", [(90, 150, 3), (150, 90), (70, 70, 4)])
def test_any_image_mode_and_aspect(pred, shape):
    img = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    pred.set_image(img)
    r = pred.predict("cat, dog, sky", prompts="learned")
    h, w = shape[:2]
    assert r.label_map.shape == (h, w) and r.label_map.dtype == np.int32
    assert r.view_masks.shape == (3, 3, h, w) and r.fused.shape == (3, h, w) and r.final.shape == (3, h, w)
    assert r.gpr_scores.shape == (3,) and ((r.gpr_scores > 0) & (r.gpr_scores < 1)).all()
    np.testing.assert_allclose(r.fused.sum(0), 1.0, atol=1e-5)
    np.testing.assert_allclose(r.final, r.fused * r.gpr_scores[:, None, None], rtol=1e-5, atol=1e-7)
    assert set(np.unique(r.label_map)) <= {0, 1, 2}
    assert r.classes == ("cat", "dog", "sky") and r.view_names == ("prompt 1", "prompt 2", "prompt 3")


def test_label_map_is_argmax_of_final(pred):
    img = np.random.default_rng(1).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    pred.set_image(img)  # work size == image size here, so the full-size argmax is exact
    r = pred.predict(["a", "b", "c", "d"], prompts="learned")
    agree = (r.label_map == r.final.argmax(0)).mean()
    assert agree > 0.99


def test_features_and_text_are_cached(pred, tiny):
    pred.set_image(np.zeros((64, 64, 3), np.uint8))
    pred.predict("cat, dog", prompts="parts")
    pred.predict("cat, dog", prompts="parts")
    assert pred.stats == {"image_encodes": 1, "text_encodes": 1, "text_classes_encoded": 2}
    pred.predict("cat, dog, sky", prompts="parts")  # only "sky" is new to this prompt set
    pred.predict("cat, dog", prompts="maskclip-85")
    assert pred.stats == {"image_encodes": 1, "text_encodes": 3, "text_classes_encoded": 5}
    pred.set_image(np.ones((64, 64, 3), np.uint8))
    r = pred.predict("cat, dog", prompts="parts")
    assert pred.stats == {"image_encodes": 2, "text_encodes": 3, "text_classes_encoded": 5}
    # the cached result equals a fresh computation
    text = pred.prompt_set("parts").encode(tiny, ("cat", "dog"))
    ref = segment(pred.image_features, text, pred.prompt_set("parts").tau1(), None)
    torch.testing.assert_close(r.output.fused_logits, ref.fused_logits)


def test_predict_requires_image(tiny):
    p = build_predictor(tiny)
    with pytest.raises(RuntimeError, match="set_image"):
        p.predict("cat")
    with pytest.raises(KeyError, match="available"):
        p.set_image(np.zeros((32, 32, 3), np.uint8)) or p.predict("cat", prompts="nope")


def test_vocabulary_validation():
    assert parse_vocabulary(" cat ,  hot   dog\nsky;") == ("cat", "hot dog", "sky")
    for bad, msg in [("", "empty"), (" , ,", "empty"), ("cat, Cat", "twice"), ("x" * 61, "characters"),
                     (", ".join(f"c{i}" for i in range(201)), "too many")]:
        with pytest.raises(VocabularyError, match=msg):
            parse_vocabulary(bad)


def test_constructor_needs_prompt_sets(tiny):
    with pytest.raises(ValueError):
        Predictor(tiny, {})


def test_lru_cache_keeps_the_most_recently_used_and_computes_once():
    from mvpseg.predictor import LRUCache

    calls: list[str] = []
    cache = LRUCache(2)

    def make(key: str):
        return lambda: calls.append(key) or key.upper()

    assert cache.get("a", make("a")) == "A" and cache.get("b", make("b")) == "B"
    assert cache.get("a", make("a")) == "A"  # hit: "a" becomes the most recent
    cache.get("c", make("c"))  # evicts "b", the least recently used
    cache.get("a", make("a"))
    cache.get("b", make("b"))
    assert calls == ["a", "b", "c", "b"]
    cache.drop(keep=lambda key: key != "b")
    cache.get("b", make("b"))
    assert calls[-1] == "b" and len(calls) == 5


def test_invisible_characters_are_dropped_from_names():
    assert parse_vocabulary("c\u200bat, d\x00og, \ufeffsky") == ("cat", "dog", "sky")
    with pytest.raises(VocabularyError, match="twice"):  # "cat" and "ca\u200dt" look the same: one class
        parse_vocabulary("cat, ca\u200dt")
    with pytest.raises(VocabularyError, match="empty"):
        parse_vocabulary("\u200b\u200c, \x00")


def test_a_name_over_the_prompt_sets_token_budget_is_a_vocabulary_error_that_says_what_is_left(pred, tiny):
    pred.set_image(np.zeros((40, 40, 3), np.uint8))
    pred.add_prompt_set("learned32", LearnedPrompts(tiny.text_width, n_seg=3, n_ctx=32))  # the paper's 32 tokens
    budget = pred.prompt_set("learned32").name_token_budget(tiny)
    assert budget == tiny.context_length - 32 - 3
    long_name = "большая собака на траве"  # short in characters, many byte-pair tokens
    used = len(tiny.tokenizer.encode(long_name))
    assert used > budget and len(long_name) < 60
    with pytest.raises(VocabularyError, match=rf"is {used} tokens, but prompt set 'learned32' leaves room for {budget}"):
        pred.predict(f"cat, {long_name}", prompts="learned32")
    fitting = " ".join(["dog"] * budget)  # exactly the budget: accepted
    assert len(tiny.tokenizer.encode(fitting)) == budget
    assert pred.predict(f"cat, {fitting}", prompts="learned32").label_map.shape == (40, 40)
    # handcrafted sets have their own budget: the context minus their longest template
    from mvpseg import TemplatePrompts

    single = TemplatePrompts.single()
    assert single.name_token_budget(tiny) == tiny.context_length - 2 - len(tiny.tokenizer.encode("a photo of a ."))


# ----------------------------------------------------------------------------- dense settings, PAMR (issue #15)
def test_pamr_refines_the_label_maps_logits_exactly_as_calling_pamr(tiny):
    from mvpseg.dense import pamr

    img = np.random.default_rng(2).integers(0, 255, (70, 100, 3), dtype=np.uint8)
    plain, refined = (build_predictor(tiny, short_side=64, max_long_side=256, pamr=on) for on in (False, True))
    plain.set_image(img)
    refined.set_image(img)
    a, b = plain.predict("cat, dog, sky"), refined.predict("cat, dog, sky")
    work = a.work_size
    # off: today's output (bilinear log m_c at the work size, then the argmax)
    assert a.pamr_image is None and torch.equal(a.logits, a.output.log_final(work))
    # on: pamr on the same logits with the normalised work-size image, nothing else changed
    torch.testing.assert_close(b.output.fused_logits, a.output.fused_logits, rtol=0, atol=0)
    assert b.pamr_image.shape == (1, 3, *work)
    expected = pamr(b.pamr_image, a.output.log_final(work))
    torch.testing.assert_close(b.logits, expected, rtol=0, atol=0)
    labels = torch.nn.functional.interpolate(expected.max(1, keepdim=True).indices.float(), size=(70, 100),
                                             mode="nearest")[0, 0].int().numpy()
    np.testing.assert_array_equal(b.label_map, labels)
    assert not torch.allclose(a.logits, b.logits, atol=1e-3)  # it does refine


@pytest.fixture(scope="module")
def vit():
    from mvpseg.testing import tiny_vit_clip

    return tiny_vit_clip()


def test_dense_settings_key_the_image_features_but_not_the_text(vit):
    p = build_predictor(vit, short_side=64, max_long_side=256)
    assert p.dense == vit.dense and p.dense.mode == "maskclip-vit"
    img = np.random.default_rng(3).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    p.set_image(img)
    p.predict("cat, dog", prompts="a-photo-of")
    assert p.stats["image_encodes"] == 1 and p.stats["text_encodes"] == 1
    settings = p.set_dense("sclip", "32/16")
    assert settings.describe() == "sclip, sliding 32/16" and not p.features_current
    r = p.predict("cat, dog", prompts="a-photo-of")
    assert p.stats["image_encodes"] == 2 and p.stats["text_encodes"] == 1  # image re-encoded, text reused
    assert r.dense == settings
    torch.testing.assert_close(p.image_features, vit.dense_features(p._input, settings), rtol=0, atol=0)
    p.predict("cat, dog", prompts="a-photo-of")
    p.set_dense("sclip", (32, 16))  # the same settings again: the features stay cached
    p.predict("cat", prompts="a-photo-of")
    assert p.stats["image_encodes"] == 2
    with pytest.raises(ValueError, match="dense mode 'maskclip' is not available for a VisionTransformer"):
        p.set_dense("maskclip")
    with pytest.raises(ValueError, match="multiples of the VisionTransformer's stride 8"):
        p.set_dense("sclip", (36, 12))
    assert p.dense == settings  # a refused change leaves the settings as they were


def test_learned_prompts_refuse_a_dense_mode_changed_after_loading(vit, tmp_path):
    from mvpseg import CheckpointError, save_prompts

    path = save_prompts(tmp_path / "p.safetensors", LearnedPrompts(vit.text_width, n_seg=2, n_ctx=4), vit)
    p = build_predictor(vit, checkpoints={"learned": str(path)}, short_side=64)
    p.set_image(np.zeros((64, 64, 3), np.uint8))
    p.predict("cat, dog")
    p.set_dense("naclip")
    with pytest.raises(CheckpointError, match="prompt set 'learned' were learned with dense mode 'maskclip-vit'"):
        p.predict("cat, dog")
    p.predict("cat, dog", prompts="parts")  # handcrafted sets work with any mode
    with pytest.raises(CheckpointError, match="pass --dense maskclip-vit"):
        build_predictor(vit, checkpoints={"learned": str(path)}, dense=vit.dense_settings("clearclip"))
