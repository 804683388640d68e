import time

import pytest
import torch
from safetensors.torch import save_file

from mvpseg import ClipSpec, ClipWeightsUnavailable, load_clip
from mvpseg.clip_backbone import NORMALIZATIONS
from mvpseg.testing import tiny_config_file


def test_offline_tag_fails_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ClipWeightsUnavailable) as e:
        load_clip(ClipSpec("RN50", "openai", cache_dir=str(tmp_path)))
    msg = str(e.value)
    assert time.perf_counter() - t0 < 10  # no minute of retries
    assert "RN50 (openai)" in msg and "--pretrained /path/to" in msg and "--cache-dir" in msg and "toyclip" in msg


def test_unknown_tag_lists_known_tags(tmp_path):
    with pytest.raises(ClipWeightsUnavailable, match="openai"):
        load_clip(ClipSpec("RN50", "no-such-tag", cache_dir=str(tmp_path)))


def test_missing_local_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_clip(ClipSpec("RN50", str(tmp_path / "nope.safetensors")))


def test_unknown_model_name():
    with pytest.raises(ValueError, match="Unknown CLIP model"):
        load_clip(ClipSpec("NotAModel-7", None))


def test_towers_frozen_and_stay_in_eval(tiny):
    assert all(not p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert not tiny.model.training and not tiny.model.visual.training
    assert (tiny.embed_dim, tiny.text_width, tiny.context_length) == (64, 64, 48)


def test_local_safetensors_checkpoint_loads_same_weights(tiny, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(path))
    cfg = tiny_config_file(tmp_path, name="mvpseg-tiny-copy")
    other = load_clip(ClipSpec("mvpseg-tiny-copy", str(path), model_config=str(cfg)))
    assert other.fingerprint == tiny.fingerprint
    x = tiny.normalize(torch.rand(1, 3, 64, 96))
    torch.testing.assert_close(other.dense_features(x), tiny.dense_features(x))


def test_normalization_parameter(tmp_path):
    cfg = tiny_config_file(tmp_path, name="mvpseg-tiny-norm")
    c = load_clip(ClipSpec("mvpseg-tiny-norm", None, model_config=str(cfg), normalization="clip"))
    mean, std = NORMALIZATIONS["clip"]
    x = torch.full((1, 3, 2, 2), 0.5)
    torch.testing.assert_close(c.normalize(x)[0, :, 0, 0], (0.5 - torch.tensor(mean)) / torch.tensor(std))
    with pytest.raises(ValueError, match="normalization"):
        load_clip(ClipSpec("mvpseg-tiny-norm", None, model_config=str(cfg), normalization="weird"))


def test_offline_hf_hub_fails_fast(tmp_path):
    with pytest.raises(ClipWeightsUnavailable, match="Hugging Face Hub is unreachable"):
        load_clip(ClipSpec("hf-hub:someone/some-clip", None, cache_dir=str(tmp_path)))


def test_normalisation_comes_from_the_spec_the_config_or_the_weights_header_else_a_warning(tiny, tmp_path, caplog):
    """A custom CLIP whose config and weights do not say which input statistics it was pretrained with runs
    under ImageNet's with a warning naming the fix (the wrong statistics cost most of the accuracy silently)."""
    import json
    import logging

    state = {k: v.contiguous() for k, v in tiny.model.state_dict().items()}
    plain, labelled = tmp_path / "plain.safetensors", tmp_path / "labelled.safetensors"
    save_file(state, str(plain))
    save_file(state, str(labelled), metadata={"normalization": "clip"})
    cfg = tiny_config_file(tmp_path, name="mvpseg-tiny-nrm")
    meta_cfg = tmp_path / "with-meta.json"
    meta_cfg.write_text(json.dumps({"model_cfg": json.loads(cfg.read_text()), "mvpseg": {"normalization": "clip"}}))
    cases = [  # (weights, config, spec normalization) → (normalization, warned)
        ((plain, cfg, None), ("imagenet", True)),
        ((labelled, cfg, None), ("clip", False)),
        ((plain, meta_cfg, None), ("clip", False)),
        ((plain, cfg, "imagenet"), ("imagenet", False)),
        ((labelled, cfg, "imagenet"), ("imagenet", False)),  # an explicit choice wins over the header
        ((None, cfg, None), ("imagenet", False)),  # random weights: nothing to be wrong about
    ]
    for (weights, config, norm), (expected, warned) in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mvpseg.clip_backbone"):
            clip = load_clip(ClipSpec("mvpseg-tiny-nrm", None if weights is None else str(weights),
                                      model_config=str(config), normalization=norm))
        assert clip.normalization == expected, (weights, config, norm)
        said = [r.getMessage() for r in caplog.records if "input normalisation" in r.getMessage()]
        assert bool(said) == warned, (weights, config, norm, said)
        if warned:
            assert "--normalization clip" in said[0] and "mvpseg-tiny-nrm.json" in said[0]


# ----------------------------------------------------------------------------- dense settings (issue #15)
def test_dense_flags_reach_the_clip_and_its_features():
    import argparse

    from mvpseg.clip_backbone import add_clip_args
    from mvpseg.dense import SlidingWindow, dense_features, sliding_dense_features
    from mvpseg.testing import tiny_vit_clip

    p = argparse.ArgumentParser()
    add_clip_args(p)
    args = p.parse_args(["--clip", "x", "--dense", "clearclip", "--sliding", "32/16"])
    spec = ClipSpec.from_args(args)
    assert spec.dense_mode == "clearclip" and spec.sliding == (32, 16)
    assert ClipSpec.from_args(p.parse_args([])).dense_mode is None and ClipSpec.from_args(p.parse_args([])).sliding is None
    for bad in (["--sliding", "224"], ["--sliding", "112/224"], ["--dense", "dino"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
    clip = tiny_vit_clip(dense_mode="clearclip", sliding=(32, 16))
    assert clip.dense_mode == "clearclip" and clip.sliding == SlidingWindow(32, 16)
    x = torch.randn(1, 3, 64, 96)
    torch.testing.assert_close(clip.dense_features(x), sliding_dense_features(clip.model.visual, x, "clearclip", 32, 16),
                               rtol=0, atol=0)
    whole = clip.dense_settings("naclip", None)
    torch.testing.assert_close(clip.dense_features(x, whole), dense_features(clip.model.visual, x, "naclip"),
                               rtol=0, atol=0)
    assert tiny_vit_clip().dense_mode == "maskclip-vit"  # the tower's default


def test_resnet_default_is_unchanged_and_bad_settings_fail_at_load(tiny, tmp_path):
    from mvpseg.dense import dense_features

    assert tiny.dense_mode == "maskclip" and tiny.sliding is None
    x = torch.randn(2, 3, 64, 96)
    assert torch.equal(tiny.dense_features(x), dense_features(tiny.model.visual, x))
    cfg = str(tiny_config_file(tmp_path))
    with pytest.raises(ValueError, match="dense mode 'sclip' is not available for a ModifiedResNet"):
        load_clip(ClipSpec("mvpseg-tiny", None, model_config=cfg, dense_mode="sclip"))
    with pytest.raises(ValueError, match=r"sliding window 100/50 must be multiples of the ModifiedResNet's stride 32"):
        load_clip(ClipSpec("mvpseg-tiny", None, model_config=cfg, sliding=(100, 50)))


def test_tiny_clips_and_config_copies_leave_nothing_in_the_temp_folder(tmp_path):
    import os
    import subprocess
    import sys
    import tempfile

    import mvpseg.clip_backbone as cb
    from mvpseg.testing import tiny_clip, tiny_vit_clip

    before = set(os.listdir(tempfile.gettempdir()))
    a, b = tiny_clip(seed=3), tiny_vit_clip(seed=3)
    # nothing new in the temp folder but the process's one folder of config copies (removed at exit, below) ...
    assert set(os.listdir(tempfile.gettempdir())) - before <= {cb._CONFIG_DIR.name}
    assert a.fingerprint == tiny_clip(seed=3).fingerprint and b.embed_dim == 64  # ... and the models are whole
    # open_clip's copies of custom configs live in one folder per process, removed when the process exits
    code = ("import mvpseg.clip_backbone as cb; cb.register_model_config('mvpseg-x', {'embed_dim': 1}); "
            "print(cb._CONFIG_DIR)")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    folder = out.stdout.strip().splitlines()[-1]
    assert folder.startswith(str(tmp_path)) and not os.path.exists(folder) and not list(tmp_path.iterdir())
