import json

import numpy as np
from PIL import Image
from safetensors.torch import save_file

from mvpseg import LearnedPrompts, save_prompts
from mvpseg.__main__ import main
from mvpseg.testing import tiny_config_file


def _clip_args(tiny, tmp_path):
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(weights))
    cfg = tiny_config_file(tmp_path, name="mvpseg-tiny")
    return ["--clip", "mvpseg-tiny", "--model-config", str(cfg), "--pretrained", str(weights)]


def test_segment_writes_overlay_labels_and_legend(tiny, tmp_path):
    img = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 110, 3), dtype=np.uint8)).save(img)
    prompts = save_prompts(tmp_path / "p.safetensors", LearnedPrompts(tiny.text_width, n_seg=3, n_ctx=8), tiny)
    out = tmp_path / "out" / "overlay.png"
    rc = main(["segment", str(img), "--classes", "cat, dog, sky", "--prompts", str(prompts), "--out", str(out),
               "--short-side", "64"] + _clip_args(tiny, tmp_path))
    assert rc == 0
    assert Image.open(out).size == (110, 70)
    labels = np.asarray(Image.open(out.with_name("overlay_labels.png")))
    assert labels.shape == (70, 110) and labels.max() <= 2
    legend = json.loads(out.with_suffix(".json").read_text())
    assert legend["classes"] == ["cat", "dog", "sky"] and set(legend["gpr_scores"]) == {"cat", "dog", "sky"}
    assert abs(sum(legend["pixel_share"].values()) - 1) < 1e-3


def test_segment_reports_bad_input(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    rc = main(["segment", str(bad), "--classes", "cat", "--baseline", "parts", "--out", str(tmp_path / "o.png")]
              + _clip_args(tiny, tmp_path))
    assert rc == 2 and "not a readable image" in capsys.readouterr().err
    img = tmp_path / "ok.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(img)
    rc = main(["segment", str(img), "--classes", " , ", "--out", str(tmp_path / "o.png")] + _clip_args(tiny, tmp_path))
    assert rc == 2 and "empty" in capsys.readouterr().err


def test_offline_rn50_is_a_clear_error(tmp_path, capsys):
    img = tmp_path / "ok.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(img)
    rc = main(["segment", str(img), "--classes", "cat", "--cache-dir", str(tmp_path / "cache")])
    assert rc == 2 and "Cannot load CLIP weights RN50 (openai)" in capsys.readouterr().err


def test_segment_pamr_and_dense_flags(tiny, tmp_path, capsys):
    img = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 110, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "o.png"
    rc = main(["segment", str(img), "--classes", "cat, dog", "--baseline", "a-photo-of", "--out", str(out),
               "--short-side", "64", "--pamr", "--sliding", "64/32"] + _clip_args(tiny, tmp_path))
    assert rc == 0
    legend = json.loads(out.with_suffix(".json").read_text())
    assert legend["pamr"] is True and legend["dense"] == "maskclip, sliding 64/32"
    rc = main(["segment", str(img), "--classes", "cat", "--out", str(out), "--dense", "sclip"]
              + _clip_args(tiny, tmp_path))
    assert rc == 2
    assert "error: dense mode 'sclip' is not available for a ModifiedResNet tower" in capsys.readouterr().err
