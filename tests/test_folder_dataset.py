"""Your own data: classes.txt parsing, the folder dataset (splits, label offsets, strict reading, profile),
the toy-world export, training + resume + evaluation end to end on a generated folder."""
from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fixtures_data import make_folder, write_tiny_clip
from training import evaluate, train_prompts
from training.cli import user_message
from training.datasets import DatasetError, build_dataset, get_profile
from training.datasets.class_file import format_class_lines, parse_class_lines, read_class_file
from training.datasets.folder import in_val, seeded_split
from training.runlog import read_jsonl


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- classes.txt
def test_class_file_marks_prompt_names_and_blank_edges(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("\ufeff\n\nbackground\n  tvmonitor   |  tv   monitor \nsheep\tUNSEEN\n"
                    "pottedplant unseen | potted plant\nunseen\n\n\n", encoding="utf-8")
    split = read_class_file(path)
    assert split.class_names == ("background", "tvmonitor", "sheep", "pottedplant", "unseen")
    assert split.prompt_names == ("background", "tv monitor", "sheep", "potted plant", "unseen")
    assert split.unseen == (2, 3)  # a class literally named "unseen" is a class, not a mark
    assert parse_class_lines(format_class_lines(split)) == split  # what the toy-world export writes reads back


@pytest.mark.parametrize("text, message", [
    ("", "lists no classes"),
    ("\n \n", "lists no classes"),
    ("cat\n\ndog\n", "line 2 is blank"),
    ("cat\ndog\nCat\n", "line 3: class name 'Cat' is already on line 1"),
    ("tvmonitor | tv\ntv monitor | tv\n", "line 2: prompt name 'tv' is already on line 1"),
    ("cat\n | kitty\n", "line 2 has no class name"),
    ("cat |  \n", "line 1 has an empty prompt name"),
    ("cat, dog\n", "line 1: class name 'cat, dog' contains ','"),
    ("cat unseen\ndog unseen\n", "marks every class 'unseen'"),
    ("".join(f"c{i}\n" for i in range(256)), "256 classes; at most 255"),
])
def test_class_file_errors_name_file_and_line(tmp_path, text, message):
    path = tmp_path / "classes.txt"
    path.write_text(text)
    with pytest.raises(DatasetError, match=message) as err:
        read_class_file(path)
    assert str(path) in str(err.value)


def test_missing_class_file_is_named(tmp_path):
    make_folder(tmp_path / "d", n=3)
    (tmp_path / "d" / "classes.txt").unlink()
    with pytest.raises(DatasetError, match=f"class list not found: {tmp_path / 'd' / 'classes.txt'}"):
        build_dataset("folder", tmp_path / "d", "all")


# ---------------------------------------------------------------- the dataset
def test_label_spaces_hide_unseen_pixels(tmp_path):
    ids = make_folder(tmp_path / "d", n=5)  # background, cat, dog (unseen), grass | green grass
    full = build_dataset("folder", tmp_path / "d", "all", label_space="full")
    seen = build_dataset("folder", tmp_path / "d", "all", label_space="seen")
    assert full.unseen_indices == (2,) and seen.unseen_indices == ()
    assert seen.class_names == ("background", "cat", "grass") and seen.prompt_names[-1] == "green grass"
    for i, s in enumerate(full.samples):
        raw = np.asarray(Image.open(s.label))
        _, lf = full[i]
        _, ls = seen[i]
        np.testing.assert_array_equal(lf, raw)  # offset 0: ids are classes.txt's line numbers
        expected = np.select([raw == 0, raw == 1, raw == 3], [0, 1, 2], 255)  # dog → 255, grass 3 → 2
        np.testing.assert_array_equal(ls, expected)
        assert set(np.unique(raw).tolist()) == ids[s.name]


def test_seeded_split_is_disjoint_stable_and_documented(tmp_path):
    make_folder(tmp_path / "d", n=12)
    train = [s.name for s in build_dataset("folder", tmp_path / "d", "train").samples]
    val = [s.name for s in build_dataset("folder", tmp_path / "d", None).samples]  # None: the eval split
    assert val and train and not set(train) & set(val) and len(train) + len(val) == 12
    assert all(in_val(n, 0, 0.2) for n in val) and not any(in_val(n, 0, 0.2) for n in train)
    names = [f"x{i}" for i in range(40)]
    assert set(seeded_split(names, "val")) <= set(seeded_split(names + ["new1", "new2"], "val"))
    assert seeded_split(["a", "b"], "val") and seeded_split(["a", "b"], "train")  # one on each side, always
    with pytest.raises(DatasetError, match="at least 2 images"):
        seeded_split(["a"], "train")


def test_split_files_missing_files_and_skip_missing(tmp_path):
    make_folder(tmp_path / "d", n=4)
    (tmp_path / "d" / "splits").mkdir()
    (tmp_path / "d" / "splits" / "train.txt").write_text("img00\nimg01\nghost\n")
    (tmp_path / "d" / "splits" / "val.txt").write_text("img02\nimg03\n")
    with pytest.raises(DatasetError, match="train.txt names 1 images not under .*ghost"):
        build_dataset("folder", tmp_path / "d", "train")
    ds = build_dataset("folder", tmp_path / "d", "train", on_missing="skip")
    assert [s.name for s in ds.samples] == ["img00", "img01"] and ds.skipped == 1
    (tmp_path / "d" / "masks" / "img03.png").unlink()
    with pytest.raises(DatasetError, match="img03.png"):
        build_dataset("folder", tmp_path / "d", "val")
    assert build_dataset("folder", tmp_path / "d", "val", on_missing="skip").skipped == 1
    with pytest.raises(DatasetError, match="split list not found: .*test.txt"):
        build_dataset("folder", tmp_path / "d", "test")


def test_bad_masks_are_refused_naming_the_file(tmp_path):
    make_folder(tmp_path / "d", n=3)
    ds = build_dataset("folder", tmp_path / "d", "all")
    bad = ds.samples[1].label
    lab = np.asarray(Image.open(bad)).copy()
    lab[0, 0] = 7  # classes.txt has ids 0..3
    Image.fromarray(lab, mode="L").save(bad)
    with pytest.raises(DatasetError, match=rf"mask {bad} contains ids \[7\] outside classes.txt \(4 classes: ids 0..3"):
        ds[1]
    Image.fromarray(np.zeros((*lab.shape, 3), np.uint8)).save(bad)  # a colour mask would give wrong ids
    with pytest.raises(DatasetError, match=f"label {bad} has mode 'RGB'"):
        ds[1]
    Image.fromarray(np.zeros((5, 5), np.uint8), mode="L").save(bad)
    with pytest.raises(DatasetError, match=f"label {bad} is 5x5 but image"):
        ds[1]
    ds.samples[2].image.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=f"cannot decode image {ds.samples[2].image}"):
        ds[2]


def test_label_offset_like_mmseg_reduce_zero_label(tmp_path):
    make_folder(tmp_path / "d", n=4, offset=1)  # ADE20K-style: 0 = unlabelled, classes from 1
    plain = build_dataset("folder", tmp_path / "d", "all")  # read without the offset, id 4 is no class
    refused = []
    for i in range(len(plain)):
        with pytest.raises(DatasetError) if 4 in np.asarray(Image.open(plain.samples[i].label)) else nullcontext():
            refused.append(plain[i] is None)
    assert len(refused) < len(plain)  # some mask holds id 4, and was refused
    for spec in (f"{tmp_path / 'd'}::reduce_zero_label", f"{tmp_path / 'd'}::label_offset=1"):
        ds = build_dataset("folder", spec, "all")
        for i, s in enumerate(ds.samples):
            raw = np.asarray(Image.open(s.label))
            np.testing.assert_array_equal(ds[i][1], np.where((raw == 0) | (raw == 255), 255, raw - 1))
    (tmp_path / "d" / "profile.json").write_text('{"label_offset": 1}')
    assert build_dataset("folder", tmp_path / "d", "all").label_offset == 1
    with pytest.raises(DatasetError, match="bad folder data-root option"):
        build_dataset("folder", f"{tmp_path / 'd'}::offset=2", "all")
    with pytest.raises(ValueError, match="folder only"):
        build_dataset("voc", f"{tmp_path}::label_offset=1", "val")


def test_profile_from_image_sizes_profile_json_and_no_upscaling(tmp_path):
    make_folder(tmp_path / "small", n=3, h=40, w=56)
    small = build_dataset("folder", tmp_path / "small", "all")
    tf = get_profile("folder").train_transform(small)
    assert (tf.scale, tf.crop_size, tf.photometric) == (None, 40, True)  # native size, crop = short side
    assert get_profile("folder").train_transform(small, crop_size=32).crop_size == 32  # --crop-size wins
    make_folder(tmp_path / "big", n=2, h=600, w=800, ext=".jpg")
    tf = get_profile("folder").train_transform(build_dataset("folder", tmp_path / "big", "all"))
    assert (tf.scale, tf.crop_size) == ((2048, 512), 512)  # MaskCLIP's photo settings
    (tmp_path / "small" / "profile.json").write_text(
        '{"crop_size": 24, "train_scale": [64, 32], "ratio_range": [1, 1], "photometric": false}')
    tf = get_profile("folder").train_transform(build_dataset("folder", tmp_path / "small", "all"))
    assert (tf.scale, tf.crop_size, tf.ratio_range, tf.photometric) == ((64, 32), 24, (1, 1), False)
    (tmp_path / "small" / "profile.json").write_text('{"crop": 24}')
    with pytest.raises(DatasetError, match="profile.json: unknown setting 'crop'"):
        build_dataset("folder", tmp_path / "small", "all")
    ev = get_profile("folder").eval_transform()
    img, lbl = ev(np.zeros((40, 56, 3), np.uint8), np.zeros((40, 56), np.uint8))
    assert img.shape == (3, 40, 56)  # never enlarged
    img, _ = ev(np.zeros((1024, 768, 3), np.uint8), np.zeros((1024, 768), np.uint8))
    assert img.shape == (3, 683, 512)  # photos: short side 512, as for VOC


def test_toyworld_export_reads_back_as_the_toyworld(tmp_path):
    from training.toyworld.export import main as export

    assert export([str(tmp_path / "tw"), "--n", "5", "--world", "crowded"]) == 0
    for split, n in (("train", 4), ("val", 1)):
        folder = build_dataset("folder", tmp_path / "tw", split, label_space="seen")
        toy = build_dataset("toyworld", f"world=crowded,length={n}", split, label_space="seen")
        assert folder.class_names == toy.class_names and len(folder) == n
        for i in range(n):
            for a, b in zip(folder[i], toy[i]):
                np.testing.assert_array_equal(a, b)
    tf = get_profile("folder").train_transform(folder)
    assert (tf.scale, tf.crop_size, tf.ratio_range, tf.photometric) == (None, 128, (1.0, 1.0), False)
    with pytest.raises(SystemExit, match="already holds a dataset"):
        export([str(tmp_path / "tw"), "--n", "5"])


# ---------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder_e2e")
    make_folder(root / "data", n=10, classes="background\ncat\ndog unseen\ngrass | green grass\n")
    clip_args = write_tiny_clip(root / "clip")

    def args(out: str, *extra: str) -> list[str]:
        return ["--dataset", "folder", "--data-root", str(root / "data"), "--out", str(root / out), *clip_args,
                "--recipe", "paper", "--n-ctx", "8", "--global-batch", "2", "--max-iters", "4", "--warmup-iters",
                "1", "--lr", "0.05", "--ckpt-every", "2", "--num-workers", "0", "--cpu-threads", "1",
                "--device", "cpu", "--no-progress", *extra]

    final = train_prompts.main(args("run"))
    return root, clip_args, args, final


def test_train_resume_evaluate_on_a_folder(trained):
    root, clip_args, args, final = trained
    start = read_jsonl(root / "run" / "log.jsonl")[0]
    assert start["vocabulary"] == ["background", "cat", "green grass"]  # seen prompt names: no "dog"
    assert start["crop_size"] == 40 and start["config"]["dataset"] == "folder"
    assert [r["iter"] for r in read_jsonl(root / "run" / "log.jsonl") if "loss" in r] == [1, 2, 3, 4]

    # Resume: a run restarted from the iteration-2 state ends with exactly the same prompts.
    ck = root / "resumed" / "checkpoints"
    ck.mkdir(parents=True)
    shutil.copy(root / "run" / "checkpoints" / "state_00000002.pt", ck)
    (ck / "latest.json").write_text(json.dumps({"iteration": 2, "path": "state_00000002.pt"}))
    resumed = train_prompts.main(args("resumed", "--resume"))
    a, b = load_file(str(final)), load_file(str(resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(RuntimeError, match="dataset: checkpoint 'folder' vs now 'toyworld'"):
        train_prompts.main(["--dataset", "toyworld", "--data-root", "seed=0", *args("resumed", "--resume")[4:]])

    report = evaluate.main([*clip_args, "--data", f"folder={root / 'data'}", "--prompts", f"mine={final}",
                            "--baselines", "a-photo-of", "--num-workers", "0", "--cpu-threads", "1",
                            "--device", "cpu", "--no-progress", "--out", str(root / "eval")])
    scores = report["results"]["folder"]["mine"]
    assert scores["class_names"] == ["background", "cat", "dog", "grass"] and scores["unseen"] == [2]
    assert {"miou", "miou_seen", "miou_unseen", "hiou"} <= set(scores) and len(scores["per_class"]) == 4
    meta = report["datasets"]["folder"]
    assert meta["unseen"] == ["dog"] and meta["unseen_in_training_vocabulary"] == {"mine": []}
    assert meta["images"] == len(build_dataset("folder", root / "data", "val"))
    md = (root / "eval" / "results.md").read_text()
    assert "## folder" in md and "| dog * |" in md and "hIoU" in md


def test_cli_label_offset_reaches_the_dataset_and_errors_are_one_line(trained, tmp_path, capsys):
    root, clip_args, args, _ = trained
    p = train_prompts.build_parser()
    a = p.parse_args(["--reduce-zero-label", *args("x")])
    assert a.data_root == f"{root / 'data'}::label_offset=1"
    assert p.parse_args([*args("x"), "--label-offset", "2"]).data_root.endswith("::label_offset=2")
    assert p.parse_args(["--dataset", "toyworld", "--data-root", "seed=0", "--out", "o"]).data_root == "seed=0"
    # a mask that does not fit classes.txt stops evaluation with one line naming it
    bad = tmp_path / "data"
    shutil.copytree(root / "data", bad)
    val = build_dataset("folder", bad, "val").samples[0].label
    Image.fromarray(np.full((40, 56), 9, np.uint8), mode="L").save(val)
    with pytest.raises(SystemExit) as err:
        evaluate.main([*clip_args, "--data", f"folder={bad}", "--baselines", "a-photo-of", "--num-workers", "0",
                       "--device", "cpu", "--no-progress"])
    assert str(err.value) == (f"error: mask {val} contains ids [9] outside classes.txt "
                              "(4 classes: ids 0..3, 255 = ignore)")
    wrapped = DatasetError("Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                           "call last):\n  File ...\ntraining.datasets.base.DatasetError: mask m.png contains ids")
    assert user_message(wrapped) == "mask m.png contains ids"


def test_cityscapes_style_names_in_sub_folders(tmp_path):
    root = tmp_path / "cs"
    make_folder(root, n=3)
    for p in sorted((root / "images").iterdir()):  # images/<city>/<name>_leftImg8bit.png + matching masks
        (root / "images" / "aachen").mkdir(exist_ok=True)
        (root / "masks" / "aachen").mkdir(exist_ok=True)
        p.rename(root / "images" / "aachen" / f"{p.stem}_leftImg8bit.png")
        (root / "masks" / f"{p.stem}.png").rename(root / "masks" / "aachen" / f"{p.stem}_gtFine_labelTrainIds.png")
    (root / "profile.json").write_text(json.dumps({"image_suffix": "_leftImg8bit.png",
                                                   "mask_suffix": "_gtFine_labelTrainIds.png"}))
    ds = build_dataset("folder", root, "all")
    assert [s.name for s in ds.samples] == ["aachen/img00", "aachen/img01", "aachen/img02"]
    assert ds[2][0].shape == (40, 56, 3)


def test_train_prompts_command_line_reports_a_bad_folder_in_one_line(trained, tmp_path):
    import os
    import subprocess
    import sys

    _, clip_args, _, _ = trained
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "training.train_prompts", "--dataset", "folder", "--data-root",
                           str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"), *clip_args, "--device", "cpu"],
                          cwd=repo, env={**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"error: dataset folder not found: {tmp_path / 'nowhere'}"
    assert "Traceback" not in proc.stderr


def test_skip_missing_run_records_corrupt_samples_and_the_log_names_them(trained, tmp_path):
    """A mask corrupt on disk (found only when drawn) is skipped, written to <out>/unreadable.txt and named in
    the log's done record; a resumed run starts knowing it."""
    root, clip_args, args, _ = trained
    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    train = build_dataset("folder", data, "train").samples
    train[0].label.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    argv = ["--dataset", "folder", "--data-root", str(data), *args("x")[4:], "--skip-missing"]
    argv[argv.index("--out") + 1] = str(tmp_path / "run")
    train_prompts.main(argv)
    log = read_jsonl(tmp_path / "run" / "log.jsonl")
    record = (tmp_path / "run" / "unreadable.txt").read_text()
    assert record.startswith(f"{train[0].name}\t") and str(train[0].label.name) in record
    assert log[0]["known_unreadable"] == 0 and log[-1]["skipped_unreadable"] == [train[0].name]
