"""Calibrated stacking of the student's seen classes: the counts and the rule against direct formulas, the
penalty in checkpoints, the predictor and evaluation applying it, and the calibration on training images."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mvpseg import CheckpointError, LearnedPrompts, StudentConfig, StudentNet, StudentPredictor, save_student
from mvpseg.student import (PENALTY_GRID, calibration_counts, choose_seen_penalty, empty_counts, load_student,
                            read_student_meta, seen_mask, set_seen_penalty, stack_seen)
from training.calibrate_student import calibrate_student, main as calibrate_main, parse_penalty
from training.distributed import DistContext
from training.pseudo_labels import IGNORE_INDEX, UNLABELED

C, UNSEEN = 6, (2, 4)


def direct_rule(logits: np.ndarray, full_labels: np.ndarray, penalties, num_classes: int = C,
                unseen: tuple = UNSEEN) -> list[tuple[float, float, float]]:
    """S, U, H per penalty by loops over classes, from labels in the *full* space (unseen ids visible here)."""
    seen = [c for c in range(num_classes) if c not in unseen]
    rows = []
    for p in penalties:
        z = logits.copy()
        z[:, seen] -= p
        pred = z.argmax(1)
        recalls = [float((pred[full_labels == c] == c).mean()) for c in seen if (full_labels == c).any()]
        s = float(np.mean(recalls))
        u = float(np.isin(pred[np.isin(full_labels, unseen)], unseen).mean())
        rows.append((s, u, 2 * s * u / (s + u) if s + u else 0.0))
    return rows


def biased_batch(seed: int = 0, bias: float = 1.0):
    """Logits that favour the true class but carry a seen-class bias ``bias``; labels with ignore pixels."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randint(0, C, (2, 12, 10), generator=g)
    logits = torch.randn(2, C, 12, 10, generator=g)
    logits += 1.5 * torch.nn.functional.one_hot(full, C).permute(0, 3, 1, 2).float()
    logits += bias * seen_mask(C, UNSEEN).float().view(1, C, 1, 1)
    full[:, 0, :3] = IGNORE_INDEX
    marked = full.clone()
    marked[torch.isin(full, torch.tensor(UNSEEN))] = UNLABELED
    return logits, full, marked


def test_stack_seen_lowers_exactly_the_seen_channels():
    logits = torch.randn(2, C, 3, 4)
    seen = seen_mask(C, UNSEEN)
    out = stack_seen(logits, seen, 0.75)
    for c in range(C):
        torch.testing.assert_close(out[:, c], logits[:, c] - (0.75 if c not in UNSEEN else 0.0))
    assert stack_seen(logits, seen, 0.0) is logits
    assert seen.tolist() == [True, True, False, True, False, True]


def test_counts_and_rule_match_direct_formulas():
    logits, full, marked = biased_batch()
    counts = calibration_counts(logits[:1], marked[:1], seen_mask(C, UNSEEN), UNLABELED) + \
        calibration_counts(logits[1:], marked[1:], seen_mask(C, UNSEEN), UNLABELED)  # summing over batches
    choice = choose_seen_penalty(counts)
    z = logits.permute(0, 2, 3, 1).reshape(-1, C).numpy()
    lab = full.reshape(-1).numpy()
    keep = lab != IGNORE_INDEX
    expected = direct_rule(z[keep], lab[keep], PENALTY_GRID)
    for (p, s, u, h), (es, eu, eh), q in zip(choice.table, expected, PENALTY_GRID):
        assert p == q
        assert s == pytest.approx(es) and u == pytest.approx(eu) and h == pytest.approx(eh)
    best = max(range(len(expected)), key=lambda i: (round(expected[i][2], 9), -i))
    assert choice.penalty == PENALTY_GRID[best]
    assert 0 < choice.penalty < PENALTY_GRID[-1]  # the bias of 1 is corrected, not ignored or overdone
    # the counts never saw the unseen class ids: the marked labels give the same rule as any relabelling
    rec = choice.as_record()
    assert rec["penalty"] == choice.penalty and len(rec["table"]) == len(PENALTY_GRID)


def test_rule_follows_the_bias_and_ties_go_to_the_smaller_penalty():
    seen = seen_mask(C, UNSEEN)
    chosen = []
    for bias in (0.0, 1.0, 2.0):
        logits, _, marked = biased_batch(seed=3, bias=bias)
        chosen.append(choose_seen_penalty(calibration_counts(logits, marked, seen, UNLABELED)).penalty)
    assert chosen[0] < chosen[1] < chosen[2]
    # perfectly separated logits: every small penalty is optimal, the smallest wins
    _, full, marked = biased_batch(seed=1)
    perfect = 10 * torch.nn.functional.one_hot(full.clamp(max=C - 1), C).permute(0, 3, 1, 2).float()
    assert choose_seen_penalty(calibration_counts(perfect, marked, seen, UNLABELED)).penalty == 0.0


def test_rule_refuses_images_without_unseen_pixels():
    logits, full, _ = biased_batch()
    only_seen = full.clone()
    only_seen[torch.isin(full, torch.tensor(UNSEEN))] = IGNORE_INDEX
    with pytest.raises(ValueError, match="unseen-marked"):
        choose_seen_penalty(calibration_counts(logits, only_seen, seen_mask(C, UNSEEN), UNLABELED))
    with pytest.raises(ValueError, match="different penalty grids"):
        empty_counts(C) + empty_counts(C, (0.0, 1.0))
    with pytest.raises(ValueError, match="do not match"):
        calibration_counts(logits[:, :, :4], full, seen_mask(C, UNSEEN), UNLABELED)


def test_counts_survive_the_all_reduce_round_trip():
    logits, _, marked = biased_batch()
    counts = calibration_counts(logits, marked, seen_mask(C, UNSEEN), UNLABELED)
    back = counts.from_tensor(counts.as_tensor())
    for a, b in zip((counts.seen_correct, counts.seen_total, counts.unseen_hit, counts.unseen_total),
                    (back.seen_correct, back.seen_total, back.unseen_hit, back.unseen_total)):
        assert torch.equal(a, b)


def test_parse_penalty():
    assert parse_penalty("auto") == "auto" and parse_penalty("AUTO") == "auto" and parse_penalty("0.5") == 0.5
    for bad in ("-1", "nan", "inf", "x"):
        with pytest.raises(Exception):
            parse_penalty(bad)


# ------------------------------------------------------------------------------------------------ checkpoints
def tiny_student(seed: int = 0) -> StudentNet:
    torch.manual_seed(seed)
    return StudentNet(StudentConfig("resnet-tiny", "deeplabv2", embed_dim=64, background=True)).eval()


NAMES = ["background", "cat", "dog", "cow", "sky"]


def test_penalty_round_trip_and_legacy_sidecar(tmp_path, tiny):
    torch.manual_seed(0)
    prompts = LearnedPrompts(tiny.text_width, n_seg=2, n_ctx=4)
    path = save_student(tmp_path / "s", tiny_student(), prompts, tiny, class_names=NAMES, background_index=0,
                        unseen=[2], seen_penalty=0.625)
    meta = read_student_meta(path)
    assert meta.seen_penalty == 0.625 and meta.seen_classes == ("background", "cat", "cow", "sky")
    meta = set_seen_penalty(path, 1.25, {"penalty": 1.25, "table": []})
    assert read_student_meta(path).seen_penalty == 1.25
    assert read_student_meta(path).extra["seen_calibration"]["penalty"] == 1.25
    assert load_student(path, tiny).meta.seen_penalty == 1.25
    raw = json.loads((tmp_path / "s.json").read_text())
    del raw["seen_penalty"]  # a student written before calibrated stacking existed
    (tmp_path / "s.json").write_text(json.dumps(raw))
    assert read_student_meta(path).seen_penalty == 0.0
    for bad in (-0.5, float("nan"), "x"):
        raw["seen_penalty"] = bad
        (tmp_path / "s.json").write_text(json.dumps(raw))
        with pytest.raises(CheckpointError, match="seen_penalty"):
            read_student_meta(path)
    with pytest.raises(CheckpointError):
        save_student(tmp_path / "t", tiny_student(), prompts, tiny, seen_penalty=-1)


def test_predictor_lowers_only_the_seen_training_classes(tmp_path, tiny):
    torch.manual_seed(0)
    prompts = LearnedPrompts(tiny.text_width, n_seg=2, n_ctx=4)
    net = tiny_student()
    path = save_student(tmp_path / "s", net, prompts, tiny, class_names=NAMES, background_index=0, unseen=[2],
                        seen_penalty=0.8)
    img = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    plain = StudentPredictor(net, tiny, prompts, short_side=48)
    calibrated = StudentPredictor.from_checkpoint(path, tiny, short_side=48)
    assert calibrated.seen_penalty == 0.8
    for p in (plain, calibrated):
        p.set_image(img)
    vocab = ["Background", "DOG", "cat", "zebra"]  # seen: background, cat; not seen: dog (unseen), zebra (new)
    a = plain.predict(vocab).output.fused_logits
    b = calibrated.predict(vocab).output.fused_logits
    torch.testing.assert_close(a - b, torch.tensor([0.8, 0.0, 0.8, 0.0]).view(1, 4, 1, 1).expand_as(a))
    off = StudentPredictor.from_checkpoint(path, tiny, short_side=48, seen_penalty=0.0)
    off.set_image(img)
    torch.testing.assert_close(off.predict(vocab).output.fused_logits, a)
    with pytest.raises(ValueError):
        StudentPredictor(net, tiny, prompts, seen_penalty=-1.0)


# ------------------------------------------------------------------------------------------ on training images
class MarkedDataset:
    """Images and full-label-space masks, as a training split (the calibration hides the unseen ids)."""

    class_names = tuple(NAMES)

    def __init__(self, n: int = 3):
        rng = np.random.default_rng(0)
        self.items = [(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8),
                       rng.integers(0, len(NAMES), (32, 40)).astype(np.uint8)) for _ in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def identity_transform(image, label):
    return (torch.from_numpy(image).permute(2, 0, 1).float() / 255.0, torch.from_numpy(label.astype(np.int64)))


def test_calibrate_student_equals_the_direct_rule_on_its_own_logits():
    net = tiny_student()
    emb = torch.nn.functional.normalize(torch.randn(len(NAMES), 64, generator=torch.Generator().manual_seed(1)), dim=-1)
    data = MarkedDataset()
    choice = calibrate_student(net, emb, 0, data, (2, 4), identity_transform, DistContext(), limit=2)
    zs, labs = [], []
    with torch.no_grad():
        for image, label in data.items[:2]:
            x, y = identity_transform(image, label)
            z = net(net.normalize(x[None]), emb, 0)
            z = torch.nn.functional.interpolate(z, size=y.shape, mode="bilinear", align_corners=False)
            zs.append(z[0].permute(1, 2, 0).reshape(-1, len(NAMES)).numpy())
            labs.append(y.reshape(-1).numpy())
    expected = direct_rule(np.concatenate(zs), np.concatenate(labs), PENALTY_GRID, len(NAMES), (2, 4))
    for (_, s, u, h), (es, eu, eh) in zip(choice.table, expected):
        assert (s, u, h) == pytest.approx((es, eu, eh))
    assert not net.training


def test_cli_calibrates_a_finished_student_in_place(tmp_path, tiny, monkeypatch):
    torch.manual_seed(0)
    prompts = LearnedPrompts(tiny.text_width, n_seg=2, n_ctx=4)
    path = save_student(tmp_path / "s", tiny_student(), prompts, tiny, class_names=NAMES, background_index=0,
                        unseen=[2])
    before = (tmp_path / "s.safetensors").read_bytes()
    assert calibrate_main([str(path), "--seen-penalty", "0.375", "--dry-run"]) == 0.375
    assert read_student_meta(path).seen_penalty == 0.0  # a dry run writes nothing
    assert calibrate_main([str(path), "--seen-penalty", "0.375"]) == 0.375
    assert read_student_meta(path).seen_penalty == 0.375
    assert (tmp_path / "s.safetensors").read_bytes() == before  # the weights are untouched
    with pytest.raises(SystemExit, match="does not record its dataset"):
        calibrate_main([str(path)])
    with pytest.raises(SystemExit, match="cannot read student"):
        calibrate_main([str(tmp_path / "missing.safetensors"), "--seen-penalty", "0"])


def test_one_pass_over_several_penalties_equals_separate_evaluations():
    """distill scores the calibrated and the plain student from the same forward passes."""
    from training.student_eval import evaluate_student, evaluate_student_penalties

    class EvalData(MarkedDataset):
        ignore_index = IGNORE_INDEX
        unseen_indices = (2, 4)

    net, data = tiny_student(), EvalData()
    emb = torch.nn.functional.normalize(torch.randn(len(NAMES), 64, generator=torch.Generator().manual_seed(1)), dim=-1)
    per: list[list] = [[], []]
    both = evaluate_student_penalties(net, emb, 0, data, identity_transform, DistContext(), [0.0, 2.0], progress=False,
                                      per_image=per)
    for k, penalty in enumerate((0.0, 2.0)):
        alone: list = []
        one = evaluate_student(net, emb, 0, data, identity_transform, DistContext(), progress=False, per_image=alone,
                               seen_penalty=penalty)
        assert both[k].as_dict() == one.as_dict()
        np.testing.assert_array_equal(np.stack(per[k]), np.stack(alone))
    assert both[0].as_dict() != both[1].as_dict()  # the penalty changed the labels
