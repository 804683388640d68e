"""mIoU / hIoU against a confusion matrix computed by hand."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from training.metrics import (ConfusionMatrix, cross_table, harmonic_iou, iou_per_class,
                              per_class_table, summarize, summary_table)

# 5 classes, unseen = {2, 3}; class 4 never occurs and is never predicted.
GT = [0, 0, 0, 1, 1, 2, 2, 3, 255, 255]
PRED = [0, 0, 1, 1, 1, 2, 0, 1, 3, 0]
# rows = ground truth, columns = prediction (ignored pixels dropped):
HAND = np.array([
    [2, 1, 0, 0, 0],   # gt 0: two right, one as 1
    [0, 2, 0, 0, 0],   # gt 1: both right
    [1, 0, 1, 0, 0],   # gt 2: one right, one as 0
    [0, 1, 0, 0, 0],   # gt 3: predicted as 1
    [0, 0, 0, 0, 0],
])
# IoU: c0 = 2/(3+3-2) = .5, c1 = 2/(2+4-2) = .5, c2 = 1/(2+1-1) = .5, c3 = 0/(1+0-0) = 0, c4 = NaN
NAMES = ("a", "b", "c", "d", "e")


def test_confusion_matrix_by_hand():
    cm = ConfusionMatrix(5)
    cm.update(torch.tensor(PRED[:5]), torch.tensor(GT[:5]))  # accumulates over updates
    cm.update(np.array(PRED[5:]), np.array(GT[5:]))
    assert np.array_equal(cm.mat.numpy(), HAND)
    iou = iou_per_class(cm.mat)
    assert np.allclose(iou[:4], [0.5, 0.5, 0.5, 0.0]) and math.isnan(iou[4])


def test_scores_seen_unseen_hiou():
    s = summarize(HAND, NAMES, unseen=(3, 2))
    assert s.unseen == (2, 3)
    assert s.miou_seen == pytest.approx(50.0)  # (50 + 50) / 2, class 4 (NaN) left out
    assert s.miou_unseen == pytest.approx(25.0)  # (50 + 0) / 2
    assert s.miou == pytest.approx(37.5)
    assert s.hiou == pytest.approx(2 * 50 * 25 / 75)
    assert s.pixel_acc == pytest.approx(100 * 5 / 8)
    assert harmonic_iou(0.0, 0.0) == 0.0 and math.isnan(harmonic_iou(10.0, float("nan")))
    no_split = summarize(HAND, NAMES)
    assert math.isnan(no_split.miou_unseen) and no_split.miou_seen == pytest.approx(37.5)


def test_tables_and_json():
    s = summarize(HAND, NAMES, unseen=(2, 3))
    md = summary_table([("mine", s)])
    assert "| mine | 25.0 | 50.0 | 37.5 | 33.3 |" in md
    pc = per_class_table([("x", s), ("y", s)])
    assert "| c * | 50.0 | 50.0 |" in pc and "| e | – | – |" in pc
    d = s.as_dict()
    text = json.dumps(d, allow_nan=False)  # NaN became null
    assert d["per_class"][4]["iou"] is None and d["per_class"][2]["unseen"] is True
    assert json.loads(text)["hiou"] == pytest.approx(33.3333, abs=1e-3)
    ct = cross_table({"voc": {"voc": 45.9, "context": 29.8}, "coco": {"voc": 50.0}})
    assert "| voc | 45.9 | 29.8 |" in ct and "| coco | 50.0 | – |" in ct


def test_bad_inputs():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="pixels"):
        cm.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="does not match"):
        summarize(np.zeros((2, 2)), NAMES)
