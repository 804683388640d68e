"""Loaders, renamings, zero-shot splits and augmentation on fixture datasets in the real layouts."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures_data import make_cocostuff, make_context, make_voc
from training.data import SamplePlan, TrainStream
from training.datasets import unreadable_names
from training.datasets import (COCOSTUFF171, CONTEXT60, VOC20, DatasetError, build_dataset,
                               get_profile)
from training.datasets.transforms import EvalTransform, TrainTransform, rescale_size


def _norm(name: str) -> str:
    return name.replace(" ", "").replace("-", "").lower()


# ---------------------------------------------------------------- class lists and splits (Sec. 4.1)
def test_unseen_splits_are_the_papers():
    voc = {"pottedplant", "sheep", "sofa", "train", "tvmonitor"}
    ctx = {"cow", "motorbike", "sofa", "cat", "boat", "fence", "bird", "tvmonitor", "keyboard",
           "aeroplane"}
    coco = {"frisbee", "skateboard", "cardboard", "carrot", "scissors", "suitcase", "giraffe", "cow",
            "road", "wallconcrete", "tree", "grass", "river", "clouds", "playingfield"}
    for split, paper, n in ((VOC20, voc, 20), (CONTEXT60, ctx, 60), (COCOSTUFF171, coco, 171)):
        assert split.num_classes == n
        assert {_norm(split.class_names[i]) for i in split.unseen} == paper
        assert len(split.seen) + len(split.unseen) == n
    assert CONTEXT60.class_names[0] == "background" and 0 in CONTEXT60.seen


def test_maskclip_renamings():
    assert VOC20.prompt_names[0] == "airplane" and VOC20.prompt_names[10] == "dining table"
    assert VOC20.prompt_names[15] == "potted plant" and VOC20.prompt_names[19] == "tv monitor"
    assert CONTEXT60.prompt_names[CONTEXT60.class_names.index("tvmonitor")] == "tv monitor"
    pn = dict(zip(COCOSTUFF171.class_names, COCOSTUFF171.prompt_names))
    assert pn["wall-other"] == "wall" and pn["wall-concrete"] == "concrete wall"
    assert pn["floor-wood"] == "wood floor" and pn["window-blind"] == "blind window"
    assert pn["desk-stuff"] == "desk" and pn["sky-other"] == "sky"
    assert sum(a != b for a, b in pn.items()) == 29
    assert len(set(COCOSTUFF171.prompt_names)) == 171  # renaming creates no duplicate


# ---------------------------------------------------------------- VOC
def test_voc_full_and_seen_label_spaces(tmp_path):
    meta = make_voc(tmp_path)
    root = tmp_path / "VOCdevkit"  # the loader also accepts the parent of VOC2012
    full = build_dataset("voc", root, "train")
    assert len(full) == 3 and full.num_classes == 20 and full.unseen_indices == VOC20.unseen
    for (name, raw_ids), i in zip(meta["train"], range(3)):
        image, label = full[i]
        assert image.dtype == np.uint8 and image.shape[2] == 3 and label.shape == image.shape[:2]
        expect = {r - 1 for r in raw_ids if 1 <= r <= 20} | ({255} if raw_ids & {0, 255} else set())
        assert set(np.unique(label).tolist()) == expect, name

    seen = build_dataset("voc", root, "train", label_space="seen")
    assert seen.num_classes == 15 and seen.unseen_indices == ()
    assert not set(seen.prompt_names) & set(VOC20.unseen_prompt_names)
    assert seen.prompt_names[0] == "airplane"
    # image 1 holds sheep (raw 17, unseen) and cat (raw 8): sheep pixels must become ignore.
    _, full_lbl = full[1]
    _, seen_lbl = seen[1]
    sheep = full_lbl == VOC20.class_names.index("sheep")
    assert sheep.any() and (seen_lbl[sheep] == 255).all()
    cat = full_lbl == VOC20.class_names.index("cat")
    assert (seen_lbl[cat] == VOC20.seen.index(VOC20.class_names.index("cat"))).all()


def test_voc_train_aug_and_palette_vs_gray(tmp_path):
    make_voc(tmp_path)
    ds = build_dataset("voc20", tmp_path / "VOCdevkit" / "VOC2012", "train_aug")
    assert len(ds) == 5
    assert Image.open(ds.samples[0].label).mode == "P"
    assert Image.open(ds.samples[-1].label).mode == "L"
    assert ds.samples[-1].label.parent.name == "SegmentationClassAug"
    assert get_profile("voc").train_split == "train_aug"


def test_no_unseen_leak_through_augmented_training_stream(tmp_path):
    make_voc(tmp_path)
    seen = build_dataset("voc", tmp_path / "VOCdevkit", "train_aug", label_space="seen")
    stream = TrainStream(seen, TrainTransform(crop_size=32, scale=(64, 32)), global_batch=2,
                         max_iters=5, seed=0)
    for i in range(len(stream)):
        img, lbl = stream[i]
        vals = set(lbl.unique().tolist())
        assert vals <= set(range(15)) | {255}


# ---------------------------------------------------------------- Context and COCO-Stuff
def test_context_background_kept(tmp_path):
    meta = make_context(tmp_path)
    ds = build_dataset("context", tmp_path / "VOCdevkit", "train")
    assert ds.num_classes == 60 and ds.class_names[0] == "background"
    for (name, raw_ids), i in zip(meta["train"], range(len(ds))):
        assert set(np.unique(ds[i][1]).tolist()) == raw_ids
    seen = build_dataset("context60", tmp_path / "VOCdevkit" / "VOC2010", "train", label_space="seen")
    assert seen.num_classes == 50 and seen.class_names[0] == "background"
    _, lbl = seen[0]  # cow (20, unseen) + person (37)
    assert 255 in lbl and seen.class_names[int(lbl[lbl != 255].max())] == "person"


def test_cocostuff_layout_and_split(tmp_path):
    meta = make_cocostuff(tmp_path)
    ds = build_dataset("cocostuff", tmp_path / "coco_stuff164k", "train")
    assert len(ds) == 3 and ds.num_classes == 171
    assert [s.name for s in ds.samples] == [n for n, _ in meta["train2017"]]
    for (_, raw_ids), i in zip(meta["train2017"], range(3)):
        assert set(np.unique(ds[i][1]).tolist()) == raw_ids
    seen = build_dataset("cocostuff", tmp_path / "coco_stuff164k", "train", label_space="seen")
    assert seen.num_classes == 156 and "concrete wall" not in seen.prompt_names
    _, lbl = seen[2]  # wall-concrete (160, unseen) + floor-tile (105, seen)
    assert set(np.unique(lbl).tolist()) == {255, COCOSTUFF171.seen.index(105)}


# ---------------------------------------------------------------- errors name the path
def test_missing_root_and_lists(tmp_path):
    with pytest.raises(DatasetError, match=str(tmp_path / "nope")):
        build_dataset("voc", tmp_path / "nope", "train")
    make_voc(tmp_path)
    lst = tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"
    lst.unlink()
    with pytest.raises(DatasetError, match="val.txt"):
        build_dataset("voc", tmp_path / "VOCdevkit", "val")
    with pytest.raises(DatasetError, match="unknown VOC split"):
        build_dataset("voc", tmp_path / "VOCdevkit", "test")
    with pytest.raises(DatasetError, match="images folder not found: .*val2017"):
        build_dataset("cocostuff", tmp_path, "val")
    make_cocostuff(tmp_path)
    import shutil
    shutil.rmtree(tmp_path / "coco_stuff164k/annotations/val2017")
    with pytest.raises(DatasetError, match="annotations folder not found"):
        build_dataset("cocostuff", tmp_path / "coco_stuff164k", "val")


def test_missing_files_error_or_counted_skip(tmp_path, caplog):
    meta = make_voc(tmp_path)
    missing = tmp_path / "VOCdevkit/VOC2012/JPEGImages" / f"{meta['train'][1][0]}.jpg"
    missing.unlink()
    with pytest.raises(DatasetError, match=missing.name):
        build_dataset("voc", tmp_path / "VOCdevkit", "train")
    with caplog.at_level(logging.WARNING):
        ds = build_dataset("voc", tmp_path / "VOCdevkit", "train", on_missing="skip")
    assert len(ds) == 2 and ds.skipped == 1
    assert "1 of 3 samples" in caplog.text and missing.name in caplog.text


def test_corrupt_files_raise_with_path(tmp_path):
    meta = make_voc(tmp_path)
    voc = tmp_path / "VOCdevkit/VOC2012"
    ds = build_dataset("voc", voc, "train")
    bad_img = voc / "JPEGImages" / f"{meta['train'][0][0]}.jpg"
    bad_img.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DatasetError, match=bad_img.name):
        ds[0]
    lbl_path = voc / "SegmentationClass" / f"{meta['train'][1][0]}.png"
    Image.open(lbl_path).convert("RGB").save(lbl_path)
    with pytest.raises(DatasetError, match="mode 'RGB'"):
        ds[1]
    lbl_path = voc / "SegmentationClass" / f"{meta['train'][2][0]}.png"
    arr = np.array(Image.open(lbl_path))
    arr[0, 0] = 77
    Image.fromarray(arr, mode="L").save(lbl_path)
    with pytest.raises(DatasetError, match=r"ids \[77\]"):
        ds[2]


def test_size_mismatch(tmp_path):
    meta = make_context(tmp_path)
    base = tmp_path / "VOCdevkit/VOC2010"
    p = base / "SegmentationClassContext" / f"{meta['val'][0][0]}.png"
    Image.fromarray(np.zeros((5, 5), np.uint8), mode="L").save(p)
    with pytest.raises(DatasetError, match="5x5"):
        build_dataset("context", base, "val")[0]


# ---------------------------------------------------------------- transforms and the sample stream
def test_eval_sizes_follow_mmcv_rule():
    assert rescale_size(375, 500, (2048, 512)) == (512, 683)
    assert rescale_size(500, 375, (2048, 512)) == (683, 512)
    assert rescale_size(100, 1000, (2048, 512)) == (205, 2048)  # long side capped
    assert rescale_size(375, 500, (520, 520)) == (390, 520)  # Context: long side 520
    img = np.zeros((30, 40, 3), np.uint8)
    t, lbl = EvalTransform(scale=(2048, 512))(img, np.zeros((30, 40), np.uint8))
    assert t.shape == (3, 512, 683) and lbl.shape == (30, 40) and lbl.dtype == torch.int64
    assert EvalTransform(scale=None)(img, np.zeros((30, 40), np.uint8))[0].shape == (3, 30, 40)


def test_train_transform_deterministic_and_padded():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    lbl = rng.integers(0, 5, (40, 50)).astype(np.uint8)
    tf = TrainTransform(scale=(64, 32), crop_size=48)
    a = tf(img, lbl, np.random.default_rng([3, 7]))
    b = tf(img, lbl, np.random.default_rng([3, 7]))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (3, 48, 48) and a[1].shape == (48, 48)
    assert 0.0 <= float(a[0].min()) and float(a[0].max()) <= 1.0
    assert set(a[1].unique().tolist()) <= set(range(5)) | {255}
    outs = {tuple(tf(img, lbl, np.random.default_rng([3, s]))[0].shape) for s in range(20)}
    assert outs == {(3, 48, 48)}
    # resized short side 16..64 < 48 sometimes: padding uses label 255 and the mean colour
    small = tf(img, lbl, np.random.default_rng([0, 0]))
    if (small[1] == 255).all(dim=0).any():
        col = int((small[1] == 255).all(dim=0).nonzero()[-1])
        assert torch.allclose(small[0][:, 0, col], torch.tensor([0.485, 0.456, 0.406]))


def test_stream_positions_resume_and_ranks(tmp_path):
    make_voc(tmp_path)
    ds = build_dataset("voc", tmp_path / "VOCdevkit", "train_aug", label_space="seen")
    tf = TrainTransform(scale=(64, 32), crop_size=32)
    full = TrainStream(ds, tf, global_batch=4, max_iters=3, seed=5)
    resumed = TrainStream(ds, tf, global_batch=4, max_iters=3, seed=5, start_iter=2)
    r0 = TrainStream(ds, tf, global_batch=4, max_iters=3, seed=5, rank=0, world_size=2)
    r1 = TrainStream(ds, tf, global_batch=4, max_iters=3, seed=5, rank=1, world_size=2)
    assert len(full) == 12 and len(resumed) == 4 and len(r0) == 6
    for j in range(4):
        assert torch.equal(full[8 + j][0], resumed[j][0])
    # iteration 1 of the global stream = rank0 items 2,3 + rank1 items 2,3
    glob = [full[4 + j][1] for j in range(4)]
    split = [r0[2][1], r0[3][1], r1[2][1], r1[3][1]]
    assert all(torch.equal(a, b) for a, b in zip(glob, split))
    plan = SamplePlan(5, seed=1)
    assert sorted(plan.index(p) for p in range(5)) == list(range(5))  # each epoch is a permutation


def test_toyworld_plugs_into_the_same_interface():
    from training import toyworld as tw

    full = build_dataset("toyworld", "length=3,seed=1,image_size=96", "train", label_space="full")
    seen = build_dataset("toyworld", "length=3,seed=1,image_size=96", "train", label_space="seen")
    assert full.num_classes == len(tw.CLASS_NAMES) and full.unseen_indices == tuple(sorted(tw.UNSEEN))
    assert seen.unseen_indices == () and not set(seen.prompt_names) & set(tw.UNSEEN_NAMES)
    hidden = tw.ToyWorld(split="train", length=3, seed=1, image_size=96)  # hides unseen itself
    for i in range(3):
        img, lbl_full = full[i]
        _, lbl_seen = seen[i]
        _, ref = hidden[i]
        assert img.shape == (96, 96, 3) and img.dtype == np.uint8
        # same pixels ignored as the toy world's own hiding, seen ids renumbered into the seen vocabulary
        assert np.array_equal(lbl_seen == 255, ref == 255)
        keep = lbl_seen != 255
        assert [seen.class_names[k] for k in lbl_seen[keep][:50]] == \
               [full.class_names[k] for k in lbl_full[keep][:50]]
    prof = get_profile("toyworld")
    assert prof.photometric is False and prof.ratio_range == (1.0, 1.0)
    # object sizes are in pixels: train and eval transforms keep every world's native size
    img, lbl = full[0]
    x, y = prof.train_transform(crop_size=128)(img, lbl, np.random.default_rng(0))
    assert x.shape == (3, 128, 128) and (y[96:] == 255).all() and (y[:96, :96] != 255).any()
    assert prof.eval_transform()(img, lbl)[0].shape == (3, 96, 96)
    crowded = build_dataset("toyworld", "length=2, seed=1, world=crowded", "val")
    assert crowded[0][0].shape == (128, 128, 3) and crowded.world.config == tw.WORLDS["crowded"]
    for bad in ("size=3", "world=busy", "length=x", "length", "background=drop", "seed=1,seed=2"):
        with pytest.raises(ValueError, match="toyworld spec"):
            build_dataset("toyworld", bad, "train")


def test_toyworld_background_ignore_is_vocs_reduce_zero_label():
    """``background=ignore``: world class 0 -> 255, every other class id shifts down by one, the
    unseen set is the same five names, in both label spaces."""
    from training import toyworld as tw

    raw = tw.ToyWorld(split="val", length=3, seed=2, hide_unseen=False)
    spec = "length=3,seed=2,background=ignore"
    full = build_dataset("toyworld", spec, "val", label_space="full")
    seen = build_dataset("toyworld", spec, "val", label_space="seen")
    assert full.class_names == tuple(tw.CLASS_NAMES[1:]) and "background" not in seen.prompt_names
    assert [full.class_names[u] for u in full.unseen_indices] == sorted(tw.UNSEEN_NAMES, key=tw.CLASS_NAMES.index)
    assert seen.num_classes == len(tw.CLASS_NAMES) - 1 - len(tw.UNSEEN) and seen.unseen_indices == ()
    for i in range(3):
        _, world = raw[i]
        _, f = full[i]
        _, s = seen[i]
        assert (world == 0).any() and np.array_equal(f == 255, world == 0)
        names = np.array(tw.CLASS_NAMES)
        keep = world != 0
        assert (np.array(full.class_names)[f[keep]] == names[world[keep]]).all()
        unseen = np.isin(world, tw.UNSEEN)
        assert np.array_equal(s == 255, (world == 0) | unseen)
        assert (np.array(seen.class_names)[s[s != 255]] == names[world[s != 255]]).all()


def test_toyworld_voc_like_layout_names_and_scores_only_the_creatures():
    """The VOC-like layout (issues #24/#27/#28): ``world=voc,background=ignore,stuff=ignore`` — background and
    the four stuff classes become 255 and leave the vocabulary, the 16 creatures keep their names in world order,
    the unseen creatures of the split stay unseen (a stuff name in the split drops out), and an image holds one
    or two of the 16 classes, so most classes are absent from any one image."""
    from training import toyworld as tw

    spec = "length=40,seed=0,world=voc,background=ignore,stuff=ignore"
    full = build_dataset("toyworld", spec, "val", label_space="full")
    raw = tw.ToyWorld(split="val", length=40, seed=0, config="voc", hide_unseen=False)
    assert full.class_names == tuple(tw.OBJECT_NAMES) and len(full.class_names) == 16
    assert sorted(full.class_names[u] for u in full.unseen_indices) == sorted(n for n in tw.UNSEEN_NAMES
                                                                               if n in tw.OBJECT_NAMES)
    present = []
    for i in range(40):
        img, f = full[i]
        _, world = raw[i]
        assert img.shape == (96, 96, 3)
        dropped = (world == 0) | np.isin(world, [tw.CLASS_NAMES.index(n) for n in tw.STUFF])
        assert np.array_equal(f == 255, dropped)
        names = np.array(tw.CLASS_NAMES)
        assert (np.array(full.class_names)[f[~dropped]] == names[world[~dropped]]).all()
        present.append(len(set(np.unique(f)) - {255}))
    assert max(present) <= 2 and np.mean(present) >= 1.0  # occlusion and the frame may hide a creature
    other = build_dataset("toyworld", "length=2,seed=0,world=voc,stuff=ignore,unseen=b", "val")
    assert "background" in other.class_names and "water" not in other.class_names
    with pytest.raises(ValueError, match="toyworld spec"):
        build_dataset("toyworld", "stuff=drop", "val")


def test_toyworld_zoom_spec_magnifies_images_and_labels():
    plain = build_dataset("toyworld", "length=2,seed=1", "val", label_space="seen")
    zoomed = build_dataset("toyworld", "length=2,seed=1,zoom=2", "val", label_space="seen")
    for i in range(2):
        (x, y), (u, v) = plain[i], zoomed[i]
        assert u.shape == (512, 512, 3) and np.array_equal(u[1::2, ::2], x) and np.array_equal(v[::2, 1::2], y)
    # training crops cover the same scene area at any zoom, unless a crop size is given
    profile = get_profile("toyworld")
    assert profile.train_transform(plain).crop_size == profile.crop_size == 128
    assert profile.train_transform(zoomed).crop_size == 256
    assert profile.train_transform(zoomed, crop_size=96).crop_size == 96
    for bad in ("zoom=0", "zoom=x", "zoom=2,zoom=2", "image_size=100000", "image_size=1024,zoom=4", "zoom=9",
                "image_size=8", "length=0", "length=99999999999"):
        with pytest.raises(ValueError, match="bad toyworld spec"):
            build_dataset("toyworld", bad, "val")
    assert build_dataset("toyworld", "image_size=1024,zoom=2,length=2", "val")[0][0].shape == (2048, 2048, 3)


def test_a_sample_that_is_unreadable_when_drawn_is_replaced_deterministically_with_skip(tmp_path, caplog):
    meta = make_voc(tmp_path)
    voc = tmp_path / "VOCdevkit/VOC2012"
    lbl = voc / "SegmentationClass" / f"{meta['train'][1][0]}.png"
    lbl.write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # found only when decoded, not by the up-front file check
    strict = build_dataset("voc", voc, "train")
    with pytest.raises(DatasetError, match=lbl.name):
        strict[1]
    ds = build_dataset("voc", voc, "train", on_missing="skip")
    with caplog.at_level(logging.WARNING):
        first, again = ds[1], ds[1]
    image, label = first
    np.testing.assert_array_equal(image, strict[2][0])  # the next readable sample stands in
    np.testing.assert_array_equal(label, strict[2][1])
    assert np.array_equal(again[0], image) and ds.unreadable == {1}
    assert caplog.text.count(lbl.name) == 1  # logged once, with the path
    fresh = build_dataset("voc", voc, "train", on_missing="skip")  # a resumed run replays the same stand-in
    np.testing.assert_array_equal(fresh[1][0], image)
    # persisted: the run's record lists it (once, however often it is drawn), and a resumed run that reads the
    # record skips it without reading it again, with the same stand-in
    record = tmp_path / "run" / "unreadable.txt"
    assert fresh.record_unreadable(record) == 0
    fresh.unreadable.clear()
    fresh[1], fresh[1]
    assert unreadable_names(record) == [meta["train"][1][0]] and lbl.name in record.read_text()
    resumed = build_dataset("voc", voc, "train", on_missing="skip")
    assert resumed.record_unreadable(record) == 1 and resumed.unreadable == {1}
    reads = []
    original = resumed._read
    resumed._read = lambda i: reads.append(i) or original(i)
    np.testing.assert_array_equal(resumed[1][0], image)
    assert reads == [2]  # the recorded sample is never decoded again
    for s in ds.samples:  # nothing readable left: a clear error instead of a loop
        s.label.write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="consecutive samples .* unreadable"):
        ds[0]
