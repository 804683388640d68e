"""``python -m mvpseg segment`` over folders and globs: per-image outputs, one text encoding, skipped bad files,
the summary; the same with the MVP-SEG+ student."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mvpseg import LearnedPrompts, StudentConfig, StudentNet, save_prompts, save_student
from mvpseg.__main__ import main
from mvpseg.batch import collect_inputs
from mvpseg.testing import tiny_config_file


@pytest.fixture()
def clip_args(tiny, tmp_path):
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(weights))
    cfg = tiny_config_file(tmp_path, name="mvpseg-tiny")
    return ["--clip", "mvpseg-tiny", "--model-config", str(cfg), "--pretrained", str(weights)]


@pytest.fixture()
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (40, 60), "b.jpg": (50, 50), "c.png": (30, 70)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # a truncated download
    (folder / "notes.txt").write_text("not an image: a folder only contributes image files")
    return folder


def test_folder_with_a_corrupt_file(tiny, tmp_path, photos, clip_args, capsys):
    prompts = save_prompts(tmp_path / "p.safetensors", LearnedPrompts(tiny.text_width, n_seg=3, n_ctx=8), tiny)
    out = tmp_path / "out"
    rc = main(["segment", str(photos), "--classes", "cat, dog, sky", "--prompts", str(prompts), "--out", str(out),
               "--short-side", "32", "--summary", "--no-progress", *clip_args])
    err = capsys.readouterr().err
    assert rc == 1  # finished, but an image was skipped
    assert f"skipped {photos / 'broken.png'}: " in err and "not a readable image" in err
    for stem, size in (("a", (40, 60)), ("b", (50, 50)), ("c", (30, 70))):
        assert Image.open(out / f"{stem}_overlay.png").size == size[::-1]
        labels = np.asarray(Image.open(out / f"{stem}_labels.png"))
        legend = json.loads((out / f"{stem}.json").read_text())
        assert labels.shape == size and legend["classes"] == ["cat", "dog", "sky"]
        assert legend["label_map"] == f"{stem}_labels.png" and set(legend["gpr_scores"]) == {"cat", "dog", "sky"}
    assert not (out / "broken.json").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 3 and [f["path"] for f in summary["failed"]] == [str(photos / "broken.png")]
    assert summary["text_encodes"] == 1  # the vocabulary's text features were computed once for 3 images
    counts = sum(np.bincount(np.asarray(Image.open(out / f"{s}_labels.png")).ravel(), minlength=3) for s in "abc")
    assert [summary["classes"][c]["pixels"] for c in ("cat", "dog", "sky")] == counts.tolist()
    assert summary["total_pixels"] == 40 * 60 + 50 * 50 + 30 * 70
    assert abs(sum(v["pixel_share"] for v in summary["classes"].values()) - 1) < 1e-5


def test_globs_repeated_stems_and_nothing_to_do(tmp_path, photos, clip_args, capsys):
    other = tmp_path / "more"
    other.mkdir()
    Image.fromarray(np.zeros((36, 36, 3), np.uint8)).save(other / "a.png")  # same stem as photos/a.png
    paths, problems = collect_inputs([str(tmp_path / "**" / "a.png"), str(photos / "a.png"), str(tmp_path / "*.gif")])
    assert paths == [photos / "a.png", other / "a.png"] or paths == [other / "a.png", photos / "a.png"]
    assert problems == [f"{tmp_path / '*.gif'}: the pattern matches no file"]
    out = tmp_path / "out"
    rc = main(["segment", str(tmp_path / "**" / "a.png"), "--classes", "cat, sky", "--baseline", "a-photo-of",
               "--out", str(out), "--short-side", "32", "--no-progress", *clip_args])
    assert rc == 0 and {p.name for p in out.glob("*.json")} == {"a.json", "a-2.json"}
    rc = main(["segment", str(tmp_path / "nothing"), str(tmp_path / "*.gif"), "--classes", "cat", "--out",
               str(out), *clip_args])
    err = capsys.readouterr().err
    assert rc == 2 and "no such file or folder" in err and "matches no file" in err
    rc = main(["segment", str(photos), "--classes", "cat", "--out", str(tmp_path / "x.png"), *clip_args])
    assert rc == 2 and "must be a folder" in capsys.readouterr().err


def test_student_over_a_folder(tiny, tmp_path, photos, clip_args, capsys):
    torch.manual_seed(0)
    net = StudentNet(StudentConfig("resnet-tiny", "deeplabv2", embed_dim=64)).eval()
    student = save_student(tmp_path / "student", net, LearnedPrompts(tiny.text_width, n_seg=3, n_ctx=8), tiny)
    out = tmp_path / "student_out"
    rc = main(["segment", str(photos / "*.png"), "--classes", "cat, dog", "--student", str(student), "--out",
               str(out), "--short-side", "32", "--summary", str(tmp_path / "s.json"), "--no-progress", *clip_args])
    assert rc == 1 and "broken.png" in capsys.readouterr().err
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["images"] == 2 and summary["prompt_set"] == "mvp-seg+" and summary["text_encodes"] == 1
    legend = json.loads((out / "c.json").read_text())
    assert legend["prompt_set"] == "mvp-seg+" and legend["gpr_scores"] is None
    assert np.asarray(Image.open(out / "c_labels.png")).shape == (30, 70)


def test_student_seen_penalty_from_the_checkpoint_and_the_command_line(tiny, tmp_path, photos, clip_args):
    """A student whose seen class "dog" carries a huge calibrated penalty labels every pixel with the unseen
    "cat"; ``--seen-penalty 0`` switches the stored penalty off, and the option is refused for prompt sets."""
    torch.manual_seed(0)
    net = StudentNet(StudentConfig("resnet-tiny", "deeplabv2", embed_dim=64)).eval()
    torch.manual_seed(1)
    student = save_student(tmp_path / "student", net, LearnedPrompts(tiny.text_width, n_seg=3, n_ctx=8), tiny,
                           class_names=("cat", "dog"), unseen=(0,), seen_penalty=1e4)
    common = [str(photos / "c.png"), "--classes", "cat, dog", "--student", str(student), "--short-side", "32",
              "--no-progress", *clip_args]
    assert main(["segment", *common, "--out", str(tmp_path / "on.png")]) == 0
    assert set(np.unique(np.asarray(Image.open(tmp_path / "on_labels.png")))) == {0}
    assert main(["segment", *common, "--out", str(tmp_path / "off.png"), "--seen-penalty", "0"]) == 0
    torch.manual_seed(1)
    plain = save_student(tmp_path / "plain", net, LearnedPrompts(tiny.text_width, n_seg=3, n_ctx=8), tiny,
                         class_names=("cat", "dog"), unseen=(0,))  # the same weights, no penalty stored
    assert main(["segment", *[str(plain) if a == str(student) else a for a in common],
                 "--out", str(tmp_path / "plain.png")]) == 0
    off = np.asarray(Image.open(tmp_path / "off_labels.png"))
    assert 1 in off  # without the penalty the student does label pixels "dog"
    np.testing.assert_array_equal(off, np.asarray(Image.open(tmp_path / "plain_labels.png")))
    with pytest.raises(SystemExit, match="--student only"):
        main(["segment", str(photos / "c.png"), "--classes", "cat", "--seen-penalty", "1", *clip_args])
