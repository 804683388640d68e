import json
import math

import pytest
import torch
from safetensors.torch import save_file

from mvpseg import CheckpointError, LearnedPrompts, load_prompts, save_prompts
from mvpseg.testing import tiny_clip


def _saved(tiny, tmp_path, **kw):
    torch.manual_seed(0)
    p = LearnedPrompts(tiny.text_width, n_seg=2, n_ctx=6, **kw)
    with torch.no_grad():
        p.log_tau1.fill_(math.log(12.5))
        p.log_tau2.fill_(math.log(0.3))
    path = save_prompts(tmp_path / "prompts.safetensors", p, tiny, training_classes=["cat", "dog"])
    return p, path


def test_round_trip(tiny, tmp_path):
    p, path = _saved(tiny, tmp_path)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["n_seg"] == 2 and meta["n_ctx"] == 6 and meta["training_classes"] == ["cat", "dog"]
    assert meta["clip_model"] == "mvpseg-tiny" and meta["text_width"] == 64 and meta["version"] == 1
    q = load_prompts(path, tiny)
    assert torch.equal(q.ctx, p.ctx) and float(q.tau1().detach()) == pytest.approx(12.5) and float(q.tau2().detach()) == pytest.approx(0.3)
    a, b = p.encode(tiny, ["sky", "car"]), q.encode(tiny, ["sky", "car"])
    torch.testing.assert_close(a.seg, b.seg)
    torch.testing.assert_close(a.glob, b.glob)
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave nothing behind


@pytest.mark.parametrize("extra, expected", [({"train_config": {"cls_mode": "paper"}}, "paper"),
                                             ({"train_config": {"cls_mode": "bce"}}, "bce"),
                                             (None, None), ({"train_config": "garbled"}, None)])
def test_the_recorded_cls_loss_is_read_back(tiny, tmp_path, extra, expected):
    # the demo explains a flat GPR chart from it; a sidecar without it (or a garbled one) reads as unknown
    p = LearnedPrompts(tiny.text_width, n_seg=2, n_ctx=6)
    path = save_prompts(tmp_path / "p.safetensors", p, tiny, extra=extra)
    assert load_prompts(path, tiny).meta.cls_loss == expected


def test_refuses_other_weights_and_other_width(tiny, tmp_path):
    _, path = _saved(tiny, tmp_path)
    with pytest.raises(CheckpointError, match="text-tower weights differ"):
        load_prompts(path, tiny_clip(seed=1))
    other = tiny_clip(seed=0, name="mvpseg-tiny-renamed")
    with pytest.raises(CheckpointError, match="model 'mvpseg-tiny' vs 'mvpseg-tiny-renamed'"):
        load_prompts(path, other)
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["text_width"] = 512
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="text width 512 vs 64"):
        load_prompts(path, tiny)


@pytest.mark.parametrize("damage", ["no_json", "bad_json", "not_ours", "garbage_tensors", "wrong_shape",
                                    "extra_tensor", "nan", "negative_temperature", "zero_temperature"])
def test_bad_checkpoints_are_refused_clearly(tiny, tmp_path, damage):
    _, path = _saved(tiny, tmp_path)
    js = path.with_suffix(".json")
    if damage == "no_json":
        js.unlink()
    elif damage == "bad_json":
        js.write_text("{not json")
    elif damage == "not_ours":
        js.write_text(json.dumps({"format": "something-else"}))
    elif damage == "garbage_tensors":
        path.write_bytes(b"\x80\x04pickle? no thanks" * 10)
    else:
        t = {"ctx": torch.zeros(3, 6, 64), "tau1": torch.tensor(1.0), "tau2": torch.tensor(1.0)}
        if damage == "wrong_shape":
            t["ctx"] = torch.zeros(3, 5, 64)
        if damage == "extra_tensor":
            t["evil"] = torch.zeros(1)
        if damage == "nan":
            t["ctx"][0, 0, 0] = float("nan")
        if damage == "negative_temperature":
            t["tau1"] = torch.tensor(-2.0)
        if damage == "zero_temperature":
            t["tau2"] = torch.tensor(0.0)
        save_file(t, str(path))
    match = "positive finite" if damage.endswith("temperature") else None
    with pytest.raises(CheckpointError, match=match):
        load_prompts(path, tiny)


def test_temperatures_are_learned_in_log_space(tiny):
    """tau = exp(log_tau): d loss / d log_tau = tau * d loss / d tau, so SGD moves a temperature by a
    fraction of itself (a raw scalar of ~100 barely moved at prompt-learning rates)."""
    p = LearnedPrompts(tiny.text_width, n_seg=2, n_ctx=4)
    assert float(p.tau1().detach()) == pytest.approx(50.0) and float(p.tau2().detach()) == pytest.approx(0.07)
    (p.tau1() ** 2 + p.tau2() ** 3).backward()
    assert float(p.log_tau1.grad) == pytest.approx(2 * 50.0 * 50.0, rel=1e-5)
    assert float(p.log_tau2.grad) == pytest.approx(3 * 0.07 ** 3, rel=1e-4)
    with pytest.raises(ValueError, match="positive"):
        LearnedPrompts(tiny.text_width, tau1_init=0.0)


def test_normalisation_is_recorded_and_a_mismatch_is_refused_with_the_fix(tiny, tmp_path):
    from mvpseg.clip_backbone import ClipSpec, load_clip
    from mvpseg.testing import tiny_config_file

    p, path = _saved(tiny, tmp_path)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["normalization"] == tiny.normalization == "imagenet"
    with torch.random.fork_rng(devices=[]):  # the same weights as ``tiny``, under CLIP's own statistics
        torch.manual_seed(0)
        cfg = str(tiny_config_file(tmp_path, name="mvpseg-tiny"))
        clip_norm = load_clip(ClipSpec(model_name="mvpseg-tiny", pretrained=None, model_config=cfg,
                                       normalization="clip"))
    assert clip_norm.fingerprint == tiny.fingerprint and clip_norm.normalization == "clip"
    with pytest.raises(CheckpointError, match="learned with 'imagenet' input normalisation.*--normalization imagenet"):
        load_prompts(path, clip_norm)
    del meta["normalization"]  # a checkpoint written before it was recorded: loads as before
    path.with_suffix(".json").write_text(json.dumps(meta))
    assert torch.equal(load_prompts(path, clip_norm).ctx, p.ctx)


# ----------------------------------------------------------------------------- dense mode (issue #15)
@pytest.fixture(scope="module")
def vit_clips():
    from mvpseg.testing import tiny_vit_clip

    return {m: tiny_vit_clip(dense_mode=m) for m in ("maskclip-vit", "clearclip", "sclip")}


def test_prompts_record_the_dense_mode_and_refuse_another(vit_clips, tmp_path):
    clear, default = vit_clips["clearclip"], vit_clips["maskclip-vit"]
    p = LearnedPrompts(clear.text_width, n_seg=2, n_ctx=4)
    path = save_prompts(tmp_path / "p.safetensors", p, clear)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["dense_mode"] == "clearclip" and meta["extra"]["sliding"] is None
    assert torch.equal(load_prompts(path, clear).ctx, p.ctx)
    with pytest.raises(CheckpointError) as e:
        load_prompts(path, default)
    assert "learned with dense mode 'clearclip'" in str(e.value) and "'maskclip-vit'" in str(e.value)
    assert "pass --dense clearclip" in str(e.value)
    # an explicit mode overrides the CLIP's (the predictor's own setting)
    assert torch.equal(load_prompts(path, default, dense_mode="clearclip").ctx, p.ctx)


def test_check_dense_off_accepts_any_mode_the_tower_offers(vit_clips, tiny, tmp_path):
    # a caller that picks the dense mode per request (the demo) loads sets of every mode the tower offers
    clear, default = vit_clips["clearclip"], vit_clips["maskclip-vit"]
    p = LearnedPrompts(clear.text_width, n_seg=2, n_ctx=4)
    path = save_prompts(tmp_path / "p.safetensors", p, clear)
    loaded = load_prompts(path, default, check_dense=False)
    assert torch.equal(loaded.ctx, p.ctx) and loaded.meta.dense_mode == "clearclip"
    js = path.with_suffix(".json")  # a mode this tower does not offer is still refused, naming it
    meta = json.loads(js.read_text())
    js.write_text(json.dumps({**meta, "dense_mode": "maskclip"}))
    with pytest.raises(CheckpointError, match="dense mode 'maskclip', which this CLIP's image tower does not offer"):
        load_prompts(path, default, check_dense=False)
    js.write_text(json.dumps({**meta, "clip_fingerprint": "0" * 16}))  # the rest of the check is unchanged
    with pytest.raises(CheckpointError, match="learned for another CLIP"):
        load_prompts(path, default, check_dense=False)


def test_prompts_without_a_recorded_mode_count_as_the_towers_default(vit_clips, tiny, tmp_path):
    default, sclip = vit_clips["maskclip-vit"], vit_clips["sclip"]
    path = save_prompts(tmp_path / "p.safetensors", LearnedPrompts(default.text_width, n_seg=1, n_ctx=4), default)
    js = path.with_suffix(".json")
    meta = json.loads(js.read_text())
    del meta["dense_mode"]  # as written before the mode was recorded
    js.write_text(json.dumps(meta))
    load_prompts(path, default)
    with pytest.raises(CheckpointError, match="learned with dense mode 'maskclip-vit'.*pass --dense maskclip-vit"):
        load_prompts(path, sclip)
    # ResNet: the only mode, recorded as such
    _, rn = _saved(tiny, tmp_path / "rn")
    assert json.loads(rn.with_suffix(".json").read_text())["dense_mode"] == "maskclip"


def test_sliding_is_recorded_but_not_refused(vit_clips, tmp_path):
    from mvpseg.testing import tiny_vit_clip

    sliding = tiny_vit_clip(dense_mode="clearclip", sliding=(32, 16))
    path = save_prompts(tmp_path / "p.safetensors", LearnedPrompts(sliding.text_width, n_seg=1, n_ctx=4), sliding)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["extra"]["sliding"] == [32, 16] and meta["dense_mode"] == "clearclip"
    load_prompts(path, vit_clips["clearclip"])  # whole-image inference with sliding-trained prompts: allowed
