"""GPR over sub-cell shifts of the image (mvpseg/gpr_shifts.py, --gpr-shifts, H-GPR8): the offsets and padding
against direct constructions, the averaged logits against Eq. 6 written out per copy, that only g changes, the
recalibration of τ2 and β, the checkpoint round trip and refusals, the predictor's and evaluation's use of it
(shifted features computed once per image), and the training flag."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mvpseg
import mvpseg.gpr_shifts as gs
import mvpseg.predictor as predictor_module
from mvpseg.checkpoint import CheckpointError, load_prompts, save_prompts
from mvpseg.heads import apply_prompts
from mvpseg.learning import calibrate_shifted_gpr


def _prompts(tiny, k: int = 1, adapter: bool = True):
    torch.manual_seed(0)
    ps = mvpseg.LearnedPrompts(tiny.text_width, n_seg=2, n_ctx=4, gpr_bias=True)
    if adapter:
        net = ps.enable_gpr_adapter(tiny.embed_dim, 6, seed=1)
        with torch.no_grad():
            net.w2.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ps.bias.fill_(0.4)
    ps.set_gpr_shifts(k)
    return ps.eval()


def _image(seed: int = 0, size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, size, size, generator=g)


def test_offsets_and_padding_are_the_k_by_k_sub_cell_grid(tiny):
    assert gs.shift_offsets(32, 1) == [(0, 0)]
    assert gs.shift_offsets(32, 2) == [(0, 0), (16, 0), (0, 16), (16, 16)]
    assert gs.shift_offsets(16, 3) == [(dx, dy) for dy in (0, 5, 10) for dx in (0, 5, 10)]
    for bad in ((32, 0), (4, 5), (0, 1)):
        with pytest.raises(ValueError):
            gs.shift_offsets(*bad)
    x = _image()
    copies = gs.shifted_features(tiny, x, 2)
    assert len(copies) == 4 and all(c.shape[-2:] == (3, 3) for c in copies)  # 64 px + one 32-px cell of padding
    # the copy shifted by (16, 0) is the image padded by 16 columns left, 16 right and 32 rows below, encoded
    torch.testing.assert_close(copies[1], tiny.dense_features(F.pad(x, (16, 16, 0, 32))))
    torch.testing.assert_close(gs.shifted_features(tiny, x, 1)[0], tiny.dense_features(x))


def test_shifted_logits_average_eq6_over_the_copies_and_leave_the_views_alone(tiny):
    ps = _prompts(tiny, k=2)
    names = ("cat", "dog", "sky")
    text = ps.encode(tiny, names).detach()
    x = _image(1)
    copies = gs.shifted_features(tiny, x, 2)
    with torch.no_grad():
        got = gs.shifted_gpr_logits(copies, text.glob, ps)
        per_copy = []
        for f in copies:  # Eq. 6 written out on φ(f): softmax(γ m)-weighted mean of m, over τ2, minus β
            m = torch.einsum("bdhw,cd->bchw", ps.gpr_adapter()(f.float()), text.glob).flatten(2)
            per_copy.append((m * (10.0 * m).softmax(-1)).sum(-1) / ps.tau2() - ps.bias)
        torch.testing.assert_close(got, torch.stack(per_copy).mean(0))
        plain = apply_prompts(tiny.dense_features(x).float(), text, ps)
        calls = []
        out = gs.with_shifted_gpr(plain, lambda k: calls.append(k) or copies, text.glob, ps)
    assert calls == [2] and torch.equal(out.fused_logits, plain.fused_logits)
    assert torch.equal(out.view_masks, plain.view_masks) and torch.equal(out.gpr_logits, got)
    ps.set_gpr_shifts(1)
    assert gs.with_shifted_gpr(plain, lambda k: calls.append(k), text.glob, ps) is plain and calls == [2]


def test_recalibration_moves_only_tau2_and_bias_and_lowers_the_loss(tiny):
    ps = _prompts(tiny)
    names = ("cat", "dog", "sky", "tree")
    glob = ps.encode(tiny, names).glob.detach()
    g = torch.Generator().manual_seed(3)
    feats = torch.stack([torch.stack(gs.shifted_features(tiny, _image(i, 32), 2), 1)[0] for i in range(24)])
    present = (torch.rand(24, 4, generator=g) < 0.4).float()
    with torch.no_grad():
        ps.bias.fill_(5.0)  # a calibration far off (every g ≈ 0) that the refit must repair

    def bce() -> float:  # on every image, as the shifted reading scores them
        with torch.no_grad():
            return float(F.binary_cross_entropy_with_logits(
                gs.shifted_gpr_logits(list(feats.unbind(1)), glob, ps), present))

    before, start = {k: v.clone() for k, v in ps.state_dict().items()}, bce()
    losses = calibrate_shifted_gpr(ps, glob, feats.detach(), present, steps=40, batch=8, lr=0.1)
    assert len(losses) == 40 and bce() < 0.5 * start
    after = ps.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"log_tau2", "bias"}
    assert all(p.requires_grad for p in ps.gpr_adapter().parameters())  # frozen only while calibrating
    with pytest.raises(ValueError, match="do not agree"):
        calibrate_shifted_gpr(ps, glob[:2], feats, present)


def test_checkpoint_carries_the_shifts_and_refuses_bad_values(tiny, tmp_path):
    ps = _prompts(tiny, k=2, adapter=False)
    path = save_prompts(tmp_path / "p.safetensors", ps, tiny)
    assert load_prompts(path, tiny).gpr_shifts() == 2
    ps.set_gpr_shifts(1)
    plain = save_prompts(tmp_path / "q.safetensors", ps, tiny)
    assert "gpr_shifts" not in json.loads(plain.with_suffix(".json").read_text())["extra"]
    assert load_prompts(plain, tiny).gpr_shifts() == 1
    side = path.with_suffix(".json")
    for bad in ("2", 0, True):
        meta = json.loads(side.read_text())
        meta["extra"]["gpr_shifts"] = bad
        side.write_text(json.dumps(meta))
        with pytest.raises(CheckpointError, match="gpr_shifts|GPR shifts"):
            load_prompts(path, tiny)
    with pytest.raises(ValueError, match="global prompt"):
        mvpseg.LearnedPrompts(tiny.text_width, n_seg=2, n_ctx=4, use_global=False).set_gpr_shifts(2)


def test_predictor_uses_the_sets_shifts_and_encodes_the_copies_once_per_image(tiny, monkeypatch):
    one, two = _prompts(tiny, k=1), _prompts(tiny, k=2)
    counted = []
    real = gs.shifted_features
    monkeypatch.setattr(predictor_module, "shifted_features",
                        lambda *a, **kw: counted.append(a[2]) or real(*a, **kw))
    p = mvpseg.Predictor(tiny, {"one": one, "two": two})
    p.set_image((np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8))
    a, b = p.predict("cat, dog", "one"), p.predict("cat, dog", "two")
    p.predict("cat, dog, sky", "two")
    assert counted == [2]  # the second request reuses the copies
    assert np.allclose(a.output.view_masks.numpy(), b.output.view_masks.numpy())
    copies = real(tiny, p._input, 2, p.dense)
    expect = gs.shifted_gpr_logits(copies, p.text_features(("cat", "dog"), "two").glob, two)
    torch.testing.assert_close(b.output.gpr_logits, expect)
    assert not torch.allclose(a.output.gpr_logits, b.output.gpr_logits)
    p.set_image((np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8))
    p.predict("cat", "two")
    assert counted == [2, 2]  # a new image: new copies


def test_distillation_teacher_reads_gpr_as_its_checkpoint_says(tiny):
    """MVP-SEG+ pseudo-labels (training.pseudo_labels.teacher_scores) use the teacher's GPR shifts."""
    from mvpseg.model import MVPSeg
    from training.pseudo_labels import teacher_scores

    ps = _prompts(tiny, k=2)
    teacher = MVPSeg(tiny, ps, gamma=10.0)
    x = _image(4)
    text = ps.encode(tiny, ("cat", "dog")).detach()
    with torch.no_grad():
        got = teacher_scores(teacher, x, text)
        fused = apply_prompts(tiny.dense_features(x).float(), text, ps).fused_logits
        g = gs.shifted_gpr_logits(gs.shifted_features(tiny, x, 2), text.glob, ps)
    torch.testing.assert_close(got, fused + F.logsigmoid(g)[:, :, None, None])
