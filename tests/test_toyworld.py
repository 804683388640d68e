"""Toy world generator: determinism, labels that match what was drawn, the zero-shot split, captions."""
from __future__ import annotations

from dataclasses import replace
from itertools import combinations

import numpy as np
import pytest

from training import toyworld as tw


def test_same_seed_same_arrays_from_two_instances():
    a, b = tw.ToyWorld("val", 4, seed=7), tw.ToyWorld("val", 4, seed=7)
    for i in range(4):
        (ia, la), (ib, lb) = a[i], b[i]
        assert ia.dtype == np.uint8 and ia.shape == (256, 256, 3)
        assert la.dtype == np.int64 and la.shape == (256, 256)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(la, lb)
    # Access order does not matter (each sample has its own generator).
    np.testing.assert_array_equal(tw.ToyWorld("val", 4, seed=7)[3][0], a[3][0])


def test_seeds_splits_and_indices_give_different_scenes():
    base = tw.ToyWorld("val", 2, seed=0)[0][0]
    assert not np.array_equal(base, tw.ToyWorld("val", 2, seed=1)[0][0])
    assert not np.array_equal(base, tw.ToyWorld("test", 2, seed=0)[0][0])
    assert not np.array_equal(base, tw.ToyWorld("val", 2, seed=0)[1][0])


def test_labels_match_painted_layers():
    """Every pixel shows the colour of the layer painted last there and carries that layer's label."""
    cfg = replace(tw.WorldConfig(), noise=0.0)
    ds = tw.ToyWorld("val", 3, seed=3, config=cfg)
    for i in range(3):
        scene = ds.scene(i)
        image, label = ds[i]
        top = np.zeros(label.shape, np.int64)
        for k, layer in enumerate(scene.layers):
            top[layer.mask] = k
        for k, layer in enumerate(scene.layers):
            vis = top == k
            assert (label[vis] == layer.label).all()
            expect = np.clip(np.round(layer.pixels[vis]), 0, 255).astype(np.uint8)
            np.testing.assert_array_equal(image[vis], expect)


def test_object_label_is_exactly_the_drawn_pixels():
    """One creature on a background: the pixels the drawing changed are exactly the labelled ones."""
    cfg = replace(tw.WorldConfig(), objects=(1, 1), stuff=(0, 0), clutter=(0, 0), noise=0.0)
    ds = tw.ToyWorld("val", 6, seed=11, config=cfg)
    for i in range(6):
        scene = ds.scene(i)
        full = tw.render(scene)
        bg_only = tw.render(replace(scene, layers=scene.layers[:1]))
        changed = (full.image != bg_only.image).any(-1)
        labelled = full.label != 0
        assert labelled.sum() > 0 or not changed.any()  # object may lie outside the frame
        assert not (changed & ~labelled).any()  # nothing drawn outside the label
        # inside the label nearly every pixel differs from the background (equal colours are rare)
        assert (labelled & ~changed).sum() <= max(2, 0.01 * labelled.sum())
        objects = [layer.label for layer in scene.layers if layer.kind == "object"]
        assert set(np.unique(full.label)) <= {0, *objects}


def test_scenes_contain_stuff_objects_and_clutter():
    ds = tw.ToyWorld("val", 20, seed=0)
    kinds = [layer.kind for i in range(20) for layer in ds.scene(i).layers]
    for k in ("background", "stuff", "object", "clutter"):
        assert k in kinds
    labels = np.concatenate([ds[i][1].ravel() for i in range(20)])
    assert set(np.unique(labels)) <= set(range(len(tw.CLASS_NAMES)))
    assert len(np.unique(labels)) >= 15  # most classes occur in a small sample


def test_train_split_hides_unseen_classes():
    full = tw.ToyWorld("train", 8, seed=5, hide_unseen=False)
    hidden = tw.ToyWorld("train", 8, seed=5)
    assert hidden.hide_unseen and not tw.ToyWorld("val", 1).hide_unseen
    found = False
    for i in range(8):
        img_f, lab_f = full[i]
        img_h, lab_h = hidden[i]
        np.testing.assert_array_equal(img_f, img_h)
        is_unseen = np.isin(lab_f, tw.UNSEEN)
        found |= bool(is_unseen.any())
        assert (lab_h[is_unseen] == 255).all()
        np.testing.assert_array_equal(lab_h[~is_unseen], lab_f[~is_unseen])
        assert not np.isin(lab_h, tw.UNSEEN).any()
    assert found


def test_class_vocabulary_and_zero_shot_split():
    names = tw.ToyWorld.class_names
    assert names[0] == "background" and len(names) == 21 and len(set(names)) == 21
    assert tw.ToyWorld.ignore_index == 255
    assert sorted(tw.SEEN + tw.UNSEEN) == list(range(21))
    assert [names[i] for i in tw.UNSEEN] == list(tw.UNSEEN_NAMES)
    seen_words = {w for i in tw.SEEN for w in names[i].split()}
    unseen_objects = [names[i] for i in tw.UNSEEN if names[i] in tw.OBJECT_NAMES]
    assert len(unseen_objects) == 4
    for name in unseen_objects:  # compositional: every word of an unseen name is seen elsewhere
        assert set(name.split()) <= seen_words
    # unseen objects form a Latin square: each colour and each creature once
    assert {n.split()[0] for n in unseen_objects} == set(tw.COLOURS)
    assert {n.split()[1] for n in unseen_objects} == set(tw.CREATURES)


def test_no_single_part_identifies_a_creature():
    parts = list(tw.CREATURES.values())
    for slot in range(3):
        values = [p[slot] for p in parts]
        assert all(values.count(v) >= 2 for v in values)
    for a, b in combinations(range(3), 2):  # but any two parts do
        pairs = [(p[a], p[b]) for p in parts]
        assert len(set(pairs)) == len(pairs)


def test_captions_name_visible_classes_only_and_are_deterministic():
    ds = tw.CaptionedToyWorld(40, seed=2)
    n_named = 0
    for i in range(40):
        image, text, classes = ds.item(i)
        assert image.shape == (64, 64, 3)
        assert text == ds.item(i)[1]
        rendered_labels = set(np.unique(tw.render(tw.sample_scene(tw.sample_rng(2, "pretrain", i),
                                                                  tw.PRETRAIN_CONFIG)).label))
        assert set(classes) <= rendered_labels
        for c in classes:
            assert tw.CLASS_NAMES[c] in text
        for c in set(range(1, len(tw.CLASS_NAMES))) - set(classes):
            assert f" {tw.CLASS_NAMES[c]}" not in f" {text}"
        n_named += len(classes)
    assert n_named >= 40  # most captions name something
    # unseen classes do occur in pretraining captions (like web captions)
    assert any(set(ds.item(i)[2]) & set(tw.UNSEEN) for i in range(40))


def test_index_out_of_range_and_bad_split():
    with pytest.raises(IndexError):
        tw.ToyWorld("val", 2)[2]
    with pytest.raises(ValueError):
        tw.ToyWorld("nope", 2)


def test_zoom_magnifies_the_same_scenes_pixel_for_pixel():
    """zoom=z replicates every pixel z×z: same scenes, same labels, images z× larger; captions unchanged."""
    plain, zoomed = tw.ToyWorld("train", 2, seed=3), tw.ToyWorld("train", 2, seed=3, zoom=3)
    for i in range(2):
        (x, y), (u, v) = plain[i], zoomed[i]
        assert u.shape == (3 * x.shape[0], 3 * x.shape[1], 3) and v.shape == (3 * y.shape[0], 3 * y.shape[1])
        for dy in range(3):
            for dx in range(3):
                assert np.array_equal(u[dy::3, dx::3], x) and np.array_equal(v[dy::3, dx::3], y)
        assert (v == tw.IGNORE_INDEX).any() == (y == tw.IGNORE_INDEX).any()
    crops = tw.CaptionedToyWorld(3, config=replace(tw.PRETRAIN_CONFIG, zoom=2))
    for i in range(3):
        (img, text, classes), (img1, text1, classes1) = crops.item(i), tw.CaptionedToyWorld(3).item(i)
        assert img.shape == (128, 128, 3) and np.array_equal(img[::2, ::2], img1)
        assert (text, classes) == (text1, classes1)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="zoom"):
            tw.WorldConfig(zoom=bad)


def test_world_presets_set_the_pixel_shares_they_were_chosen_for():
    """"crowded" was picked for its label statistics (objects ≈ 30 % of pixels against ≈ 4 % in
    "sparse", docs/toyworld.md); 40 val images reproduce the 100-image shares within a few points."""

    def shares(world: str) -> np.ndarray:
        ds = tw.ToyWorld("val", 40, seed=0, config=world)
        counts = sum(np.bincount(ds[i][1].ravel(), minlength=len(tw.CLASS_NAMES)) for i in range(40))
        n_obj = len(tw.OBJECT_NAMES)
        return np.array([counts[0], counts[1:1 + n_obj].sum(), counts[1 + n_obj:].sum()]) / counts.sum()

    bg, obj, stuff = shares("crowded")
    assert tw.ToyWorld("val", 1, config="crowded")[0][0].shape == (128, 128, 3)
    assert 0.24 <= obj <= 0.36 and 0.3 <= bg <= 0.46 and 0.24 <= stuff <= 0.4
    assert shares("sparse")[1] < 0.08
    assert tw.WORLDS["sparse"] == tw.WorldConfig()  # the default world is the sparse one
    # same parts, pixel scale and clutter as the pretraining crops: only the layout differs
    crowded = tw.WORLDS["crowded"]
    assert crowded.object_size == tw.PRETRAIN_CONFIG.object_size and crowded.noise == tw.PRETRAIN_CONFIG.noise
    with pytest.raises(ValueError, match="unknown toy world"):
        tw.ToyWorld("val", 1, config="busy")


def test_label_only_oracle_of_the_probes_matches_its_definition():
    """benchmarks/toyworld_probes.py (a): argmax of bilinearly upsampled per-cell class shares."""
    import torch

    from benchmarks.toyworld_probes import oracle

    labels = torch.from_numpy(np.stack([tw.ToyWorld("val", 2, seed=3, image_size=64)[i][1] for i in range(2)]))
    assert oracle(labels, 1)["mIoU"] == pytest.approx(100.0)  # 1 px cells: the labels themselves
    # one cell per image: every pixel gets the image's majority class, by hand
    cells = oracle(labels, 64)
    tp = np.zeros(len(tw.CLASS_NAMES))
    fp, fn = tp.copy(), tp.copy()
    for lb in labels.numpy():
        major = np.bincount(lb.ravel()).argmax()
        counts = np.bincount(lb.ravel(), minlength=len(tw.CLASS_NAMES))
        tp[major] += counts[major]
        fp[major] += lb.size - counts[major]
        fn += counts
        fn[major] -= counts[major]
    present = (tp + fn) > 0
    iou = 100 * tp[present] / (tp + fp + fn)[present]
    assert cells["mIoU"] == pytest.approx(iou.mean(), abs=1e-4)


def test_class_agnostic_probe_starts_from_the_templates_and_learns_on_seen_classes_only():
    """benchmarks/toyworld_probes.py (c): with lr 0 the shared correction is the identity (the templates'
    scores, to the digit); with learning, gradients reach it from seen-class pixels alone."""
    import argparse

    import torch
    import torch.nn.functional as F

    from benchmarks.toyworld_probes import agnostic, evaluate

    torch.manual_seed(0)
    c, d = len(tw.CLASS_NAMES), 16
    e0 = F.normalize(torch.randn(c, d), dim=-1)
    feats = F.normalize(torch.randn(6, d, 2, 2), dim=1)
    labels = torch.randint(0, c, (6, 64, 64))
    seen_labels = torch.full((256,), 255, dtype=torch.long)
    seen_labels[torch.tensor(tw.SEEN)] = torch.arange(len(tw.SEEN))
    a = argparse.Namespace(iters=3, batch=2, seed=0)
    for kind in ("shared bias", "shared linear map + bias"):
        assert agnostic(kind, 0.0, e0, feats, seen_labels[labels], feats, labels, a) == evaluate(feats, labels, e0, 100.0)
        moved = agnostic(kind, 0.5, e0, feats, seen_labels[labels], feats, labels, a)
        assert moved != evaluate(feats, labels, e0, 100.0)
    # no labelled seen pixel: nothing to learn from, the correction stays the identity
    none = torch.full_like(labels, 255)
    assert agnostic("shared bias", 0.5, e0, feats, none, feats, labels, a) == evaluate(feats, labels, e0, 100.0)


def test_medium_world_and_second_unseen_split_through_the_dataset_adapter():
    from training.datasets import build_dataset

    full = build_dataset("toyworld", "length=3,world=medium,unseen=b", "val", label_space="full")
    assert [full.class_names[i] for i in full.unseen_indices] == list(tw.UNSEEN_SPLITS["b"])
    image, label = full[0]
    assert image.shape == (192, 192, 3)
    seen = build_dataset("toyworld", "length=3,world=medium,unseen=b", "train", label_space="seen", train=True)
    assert not set(seen.prompt_names) & set(tw.UNSEEN_SPLITS["b"]) and "sand" in seen.prompt_names
    water = tw.CLASS_NAMES.index("water")
    _, raw = tw.ToyWorld("train", length=3, config="medium", hide_unseen=False)[0]
    _, lab = seen[0]
    assert np.all(lab[raw == water] == 255)  # split b's stuff class is hidden while learning
    # procedural: any index renders (fresh samples), the same scene as a bounded dataset's
    big = seen.unbounded()
    assert len(big) > 10**12 and np.array_equal(big[2][1], seen[2][1])
    big[10**12]  # far beyond the spec's length
    with pytest.raises(ValueError, match="unseen"):
        build_dataset("toyworld", "unseen=z", "val")


def test_every_unseen_split_is_a_latin_square_plus_one_stuff_class_and_the_splits_are_disjoint():
    objects = []
    for key, names in tw.UNSEEN_SPLITS.items():
        objs = [n for n in names if n in tw.OBJECT_NAMES]
        stuff = [n for n in names if n in tw.STUFF]
        assert len(objs) == 4 and len(stuff) == 1 and len(names) == 5, key
        colours, creatures = zip(*(n.split() for n in objs))
        assert sorted(colours) == sorted(tw.COLOURS) and sorted(creatures) == sorted(tw.CREATURES), key
        objects.append(set(objs))
    for i, a in enumerate(objects):  # each split tests transfer to object classes no other split holds out
        for b in objects[i + 1:]:
            assert not a & b
    seen = tw.SEEN  # the default split is "a"
    assert [tw.CLASS_NAMES[i] for i in range(len(tw.CLASS_NAMES)) if i not in seen] == sorted(
        tw.UNSEEN_SPLITS["a"], key=tw.CLASS_NAMES.index)
