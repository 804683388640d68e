"""Per-class text cache: exact reuse, only new names encoded, invalidation, the disk cache across restarts."""
import logging
import os

import numpy as np
import pytest
import torch

from mvpseg import LearnedPrompts, Predictor, baseline_prompt_sets
from mvpseg.testing import tiny_clip
from mvpseg.text_cache import ClassText, ClassTextCache, LRUCache, TextKey

VOCAB = ("cat", "dog", "sky")


def _learned(tiny, seed=0):
    torch.manual_seed(seed)
    return LearnedPrompts(tiny.text_width, n_seg=3, n_ctx=8)


def _predictor(clip, learned, **kwargs):
    sets = {"learned": learned, **baseline_prompt_sets()}
    p = Predictor(clip, sets, short_side=64, max_long_side=256, **kwargs)
    p.set_image(np.zeros((64, 64, 3), np.uint8))
    return p


def _count_encodes(pred, name):
    """Wraps the prompt set's encoder and returns the list of the name tuples it was asked to encode."""
    ps, calls = pred.prompt_set(name), []
    inner = ps.encode
    ps.encode = lambda clip, names: calls.append(tuple(names)) or inner(clip, names)
    return calls


def _uncached(pred, name, vocab):
    ps = pred.prompt_set(name)
    with torch.no_grad():
        return type(ps).encode(ps, pred.clip, vocab)  # the class's own encoder, never the counting wrapper


def _assert_views_close(a, b):
    torch.testing.assert_close(a.seg, b.seg, rtol=1e-5, atol=1e-6)
    assert (a.glob is None) == (b.glob is None)
    if a.glob is not None:
        torch.testing.assert_close(a.glob, b.glob, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["learned", "maskclip-85", "parts"])
def test_only_new_names_are_encoded_and_results_equal_uncached(tiny, name):
    pred = _predictor(tiny, _learned(tiny))
    calls = _count_encodes(pred, name)
    first = pred.text_features(VOCAB, name)
    assert calls == [VOCAB]
    edited = ("sky", "tree", "cat", "dog")  # reordered, one class added
    views = pred.text_features(edited, name)
    assert calls == [VOCAB, ("tree",)]
    assert pred.text_features(("dog", "sky"), name) is not None and len(calls) == 2  # a subset: nothing new
    assert pred.stats["text_classes_encoded"] == 4
    _assert_views_close(views, _uncached(pred, name, edited))
    assert views.class_names == edited and views.view_names == pred.prompt_set(name).view_names
    # cached classes are returned bit for bit as first encoded
    assert torch.equal(views.seg[:, [2, 3, 0]], first.seg)
    if first.glob is not None:
        assert torch.equal(views.glob[[2, 3, 0]], first.glob)
    r = pred.predict(", ".join(edited), prompts=name)  # the public API goes through the same cache
    assert len(calls) == 2 and r.classes == edited


def test_changed_prompts_or_clip_invalidate(tiny, tmp_path):
    learned = _learned(tiny)
    pred = _predictor(tiny, learned)
    calls = _count_encodes(pred, "learned")
    pred.text_features(VOCAB, "learned")
    # the temperatures do not change text embeddings: still cached
    tensors = learned.checkpoint_tensors()
    learned.load_checkpoint_tensors({**tensors, "tau1": tensors["tau1"] * 2})
    pred.text_features(VOCAB, "learned")
    assert len(calls) == 1
    # a new checkpoint loaded into the same prompt set (in place): re-encoded, and equal to an uncached encode
    learned.load_checkpoint_tensors({**tensors, "ctx": tensors["ctx"] + 0.1})
    views = pred.text_features(VOCAB, "learned")
    assert calls == [VOCAB, VOCAB]
    _assert_views_close(views, _uncached(pred, "learned", VOCAB))
    # another prompt set registered under the same name
    pred.add_prompt_set("learned", _learned(tiny, seed=1))
    calls2 = _count_encodes(pred, "learned")
    pred.text_features(VOCAB, "learned")
    assert calls2 == [VOCAB]
    # other CLIP weights: other fingerprint, even with one weight changed by a little
    other = tiny_clip(seed=0)
    assert other.text_fingerprint == tiny.text_fingerprint  # same weights, same key (what the disk cache needs)
    with torch.no_grad():
        other.model.transformer.resblocks[-1].mlp.c_proj.weight[0, 0] += 1e-3
    del other.__dict__["text_fingerprint"]  # computed once at first use; recompute after the edit
    assert other.text_fingerprint != tiny.text_fingerprint


def test_disk_cache_survives_a_restart_and_rejects_tampered_files(tiny, tmp_path, caplog):
    folder = tmp_path / "text-cache"
    first = _predictor(tiny, _learned(tiny), text_cache_dir=folder)
    ref = {n: first.text_features(VOCAB, n) for n in ("learned", "maskclip-85")}
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == 2 and not list(folder.glob(".tmp-*"))
    umask = os.umask(0o022)
    os.umask(umask)
    assert all(f.stat().st_mode & 0o777 == 0o666 & ~umask for f in files)  # not mkstemp's 0600
    # a restart: new predictor, new (but identical) prompt objects, same folder → nothing encoded, same bits
    again = _predictor(tiny, _learned(tiny), text_cache_dir=folder)
    for n in ref:
        views = again.text_features(VOCAB, n)
        assert torch.equal(views.seg, ref[n].seg)
        assert (views.glob is None and ref[n].glob is None) or torch.equal(views.glob, ref[n].glob)
    assert again.stats["text_encodes"] == 0 and again.text_cache.stats["disk_hits"] == 6
    # a new class is added to the file
    again.text_features(VOCAB + ("tree",), "learned")
    assert again.stats["text_classes_encoded"] == 1
    # tampered: one float changed in the tensor data; foreign: garbage, a pickle, another key's file
    learned_file = folder / again.text_key("learned").filename
    templates_file = folder / again.text_key("maskclip-85").filename
    data = bytearray(learned_file.read_bytes())
    data[-3] ^= 0x40
    learned_file.write_bytes(bytes(data))
    templates_file.write_bytes(learned_file.read_bytes())  # a learned-prompt file under the templates' name
    caplog.set_level(logging.WARNING, logger="mvpseg.text_cache")
    third = _predictor(tiny, _learned(tiny), text_cache_dir=folder)
    views = third.text_features(VOCAB, "learned")
    _assert_views_close(views, ref["learned"])
    third.text_features(VOCAB, "maskclip-85")
    assert third.stats["text_classes_encoded"] == 6 and third.text_cache.stats["disk_hits"] == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("ignoring text cache file" in m and "SHA-256" in m for m in messages), messages
    assert any("ignoring text cache file" in m and "another prompts" in m for m in messages), messages
    # the ignored files were replaced by valid ones
    fourth = _predictor(tiny, _learned(tiny), text_cache_dir=folder)
    fourth.text_features(VOCAB, "learned")
    assert fourth.stats["text_encodes"] == 0
    for junk in (b"not a safetensors file", b"\x80\x04\x95" + b"\x00" * 64):  # random bytes, a pickle header
        learned_file.write_bytes(junk)
        caplog.clear()
        fifth = _predictor(tiny, _learned(tiny), text_cache_dir=folder)
        _assert_views_close(fifth.text_features(VOCAB, "learned"), ref["learned"])
        assert fifth.stats["text_classes_encoded"] == 3
        assert any("ignoring text cache file" in r.getMessage() for r in caplog.records)


def test_unusable_cache_folder_falls_back_to_memory(tiny, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    caplog.set_level(logging.WARNING, logger="mvpseg.predictor")
    pred = _predictor(tiny, _learned(tiny), text_cache_dir=blocker / "sub")
    assert pred.text_cache.disk is None and "not usable" in caplog.text
    pred.text_features(VOCAB, "parts")


def test_memory_is_bounded_in_bytes():
    cache = LRUCache(max_bytes=100, sizeof=len)
    for key in "abcd":
        cache.put(key, "x" * 40)
    assert list(cache._items) == ["c", "d"] and cache.nbytes == 80
    cache.peek("c")
    cache.put("e", "x" * 40)
    assert list(cache._items) == ["c", "e"]
    cache.put("big", "x" * 500)  # the newest entry is always kept
    assert list(cache._items) == ["big"] and cache.nbytes == 500
    item = ClassText(torch.zeros(4, 64), torch.zeros(64))
    texts = ClassTextCache(max_bytes=3 * item.nbytes)
    key = TextKey("clip", "cpu-float32", "prompts")
    for i in range(5):
        texts.memory.put((key, f"c{i}"), item)
    assert len(texts.memory) == 3 and texts.memory.nbytes == 3 * 5 * 64 * 4


def test_inference_path_matches_the_generic_encoder(tiny):
    """Length-sorted chunks with a small token budget, flat blocks, EOT-only last block: same features."""
    names = [f"class {i}" for i in range(5)] + ["dining table", "a"]
    sentences = [t.format(n) for t in baseline_prompt_sets()["maskclip-85"].views[0][:12] for n in names]
    tokens = tiny.tokenize(sentences)
    emb, eot = tiny.token_embeddings(tokens).detach(), tokens.argmax(-1)
    from mvpseg.text_encoder import encode_token_embeddings

    ref = encode_token_embeddings(tiny.model, emb, eot, truncate=False)  # grad mode: open_clip's own blocks
    with torch.no_grad():
        for budget in (16, 100, None):  # one prompt per chunk, several, one chunk
            fast = encode_token_embeddings(tiny.model, emb, eot, token_budget=budget)
            assert not fast.is_inference()
            torch.testing.assert_close(fast, ref.detach(), rtol=1e-5, atol=1e-5)


def test_demo_enables_the_disk_cache(tmp_path, monkeypatch):
    from demo.models import DemoConfig, load_models, text_cache_dir_from
    from mvpseg.testing import tiny_config_file

    monkeypatch.setenv("MVPSEG_TEXT_CACHE_DIR", str(tmp_path / "env"))
    assert text_cache_dir_from(None) == str(tmp_path / "env")
    assert text_cache_dir_from("none") is None and text_cache_dir_from("/x/y") == "/x/y"
    monkeypatch.delenv("MVPSEG_TEXT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    spaces_storage = os.path.isdir("/data") and os.access("/data", os.W_OK)
    assert text_cache_dir_from(None) == ("/data/mvpseg-text-cache" if spaces_storage
                                         else str(tmp_path / "xdg" / "mvpseg" / "text-embeddings"))
    config = DemoConfig(clip="mvpseg-tiny", pretrained=None, model_config=str(tiny_config_file(tmp_path)),
                        discover=False, short_side=64, text_cache_dir=str(tmp_path / "cache"))
    models = load_models(config)
    models.predictor.set_image(np.zeros((64, 64, 3), np.uint8))
    models.predictor.predict("cat, dog", prompts="parts")
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
