"""MVP-SEG+ student: dilated backbones, DeepLab heads, text classifier (Eq. 4 fusion), checkpoints, predictor."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file

from mvpseg import (CheckpointError, LearnedPrompts, StudentConfig, StudentNet, StudentPredictor, TemplatePrompts,
                    fuse_views, load_student, save_student)
from mvpseg.heads import segment
from mvpseg.student.heads import (BackboneWeightsUnavailable, ResNetBackbone, load_backbone_weights,
                                  make_resnet)
from mvpseg.testing import tiny_clip


@pytest.fixture()
def prompts(tiny):
    torch.manual_seed(0)
    return LearnedPrompts(tiny.text_width, n_seg=3, n_ctx=8)


def tiny_student(head: str = "deeplabv2", background: bool = False, seed: int = 0) -> StudentNet:
    torch.manual_seed(seed)
    return StudentNet(StudentConfig("resnet-tiny", head, embed_dim=64, background=background)).eval()


@pytest.mark.parametrize("backbone", ["resnet-tiny", "resnet18"])
@pytest.mark.parametrize("head,stride", [("deeplabv2", 8), ("deeplabv3plus", 4)])
def test_feature_shapes_and_output_stride(backbone, head, stride):
    net = StudentNet(StudentConfig(backbone, head, embed_dim=32)).eval()
    with torch.no_grad():
        f = net.features(torch.randn(2, 3, 64, 96))
        logits = net(torch.randn(1, 3, 64, 96), torch.randn(5, 32))
    assert f.shape == (2, 32, 64 // stride, 96 // stride)
    assert logits.shape == (1, 5, 64 // stride, 96 // stride)
    assert net.backbone.output_stride == 8
    assert not any(name.startswith("fc") for name, _ in net.backbone.named_parameters())


def test_dilation_matches_torchvision_replace_stride_with_dilation():
    """Our stage patcher gives exactly torchvision's own dilated ResNet-50 (same weights, same output)."""
    torch.manual_seed(0)
    ref = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True]).eval()
    plain = make_resnet("resnet50")
    plain.load_state_dict(ref.state_dict())
    ours = ResNetBackbone(plain, output_stride=8).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = ref.layer4(ref.layer3(ref.layer2(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))))))
        _, got = ours(x)
    assert got.shape == (1, 2048, 8, 8)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_classifier_is_eq4_fusion(tiny, prompts):
    """τ1·K·(f̂ · mean_i t^i) equals MVP-SEG's fused logits τ1 Σ_i f̂·t^i (Eq. 4) for unit features."""
    net = tiny_student()
    text = prompts.encode(tiny, ["cat", "dog", "sky", "grass"]).detach()
    feats = torch.nn.functional.normalize(torch.randn(2, 64, 5, 7), dim=1)
    ours = net.classify(feats, fuse_views(text)) * prompts.tau1().detach() * text.seg.shape[0]
    ref = segment(feats, text, prompts.tau1().detach(), None).fused_logits
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_background_embedding():
    net = tiny_student(background=True)
    text = torch.nn.functional.normalize(torch.randn(3, 64), dim=-1)
    w = net.classifier(text, background_index=1)
    torch.testing.assert_close(w[1], torch.nn.functional.normalize(net.bg_embedding[0], dim=-1))
    torch.testing.assert_close(w[[0, 2]], text[[0, 2]])
    net.train()
    net(torch.randn(2, 3, 32, 32), text, 1).sum().backward()
    assert net.bg_embedding.grad is not None and net.bg_embedding.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no background embedding"):
        tiny_student(background=False).classifier(text, background_index=0)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_save_load_roundtrip_learned(tmp_path, tiny, prompts):
    net = tiny_student("deeplabv3plus", background=True)
    net.train()(torch.randn(2, 3, 32, 32), torch.randn(4, 64), 0)  # move BN running stats off their init
    net.eval()
    path = save_student(tmp_path / "s", net, prompts, tiny, class_names=["background", "a", "b", "c"],
                        background_index=0, unseen=[2], extra={"iterations": 3})
    assert path.suffix == ".safetensors" and (tmp_path / "s.json").is_file()
    meta = json.loads((tmp_path / "s.json").read_text())
    assert meta["format"] == "mvpseg-student" and meta["config"]["head"] == "deeplabv3plus"
    assert meta["prompts"]["kind"] == "learned" and meta["unseen"] == [2] and meta["background_index"] == 0
    loaded = load_student(path, tiny)
    _same_state(net, loaded.net)
    assert not loaded.net.training
    _same_state(prompts, loaded.prompts)
    x = torch.randn(1, 3, 48, 48)
    emb = torch.randn(4, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.net(x, emb, 0), net(x, emb, 0), rtol=0, atol=0)


def test_save_load_handcrafted_prompts(tmp_path, tiny):
    net = tiny_student()
    path = save_student(tmp_path / "s.safetensors", net, TemplatePrompts.single(), tiny)
    loaded = load_student(path, tiny)
    assert loaded.prompts.name == "a-photo-of" and set(load_file(str(path))) == {
        f"student.{k}" for k in net.state_dict()}


def test_load_is_strict(tmp_path, tiny, prompts):
    net = tiny_student()
    path = save_student(tmp_path / "s", net, prompts, tiny)
    tensors = load_file(str(path))
    good_json = (tmp_path / "s.json").read_text()

    def broken(name: str, mutate) -> None:
        t = dict(tensors)
        mutate(t)
        save_file(t, str(tmp_path / f"{name}.safetensors"))
        (tmp_path / f"{name}.json").write_text(good_json)

    key = next(k for k in tensors if k.endswith("branches.0.0.weight"))
    cases = {  # name: (mutation, expected error)
        "extra": (lambda t: t.update({"student.fc.weight": torch.zeros(2)}), "unexpected"),
        "missing": (lambda t: t.pop("prompts.ctx"), "missing"),
        "shape": (lambda t: t.update({key: torch.zeros(3)}), "shape"),
        "nan": (lambda t: t.update({key: torch.full_like(tensors[key], float("nan"))}), "NaN"),
        # the prompt tensors get the same checks as a prompt checkpoint (LearnedPrompts.load_checkpoint_tensors)
        "tau_shape": (lambda t: t.update({"prompts.tau1": torch.ones(2)}), "prompts: tensor 'tau1' has shape"),
        "tau_negative": (lambda t: t.update({"prompts.tau2": torch.tensor(-1.0)}),
                         "prompts: temperature tau2 must be a positive"),
        "ctx_nan": (lambda t: t.update({"prompts.ctx": torch.full_like(tensors["prompts.ctx"], float("nan"))}),
                    "prompts: tensor 'ctx' contains NaN"),
    }
    for name, (mutate, error) in cases.items():
        broken(name, mutate)
        with pytest.raises(CheckpointError, match=error):
            load_student(tmp_path / name, tiny)
    with pytest.raises(CheckpointError, match="another CLIP"):
        load_student(path, tiny_clip(seed=1))
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a pickle is not read
    (tmp_path / "pickle.json").write_text(good_json)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_student(tmp_path / "pickle", tiny)
    (tmp_path / "other.json").write_text(json.dumps({"format": "mvpseg-prompts"}))
    with pytest.raises(CheckpointError, match="not an mvpseg student"):
        load_student(tmp_path / "other", tiny)
    with pytest.raises(CheckpointError, match="metadata not found"):
        load_student(tmp_path / "absent", tiny)


def test_checkpoints_record_the_input_normalisation_and_run_under_it(tmp_path, tiny, prompts):
    """The student's input statistics are part of its config (it is rebuilt under them), the teacher CLIP's are
    recorded too; an unknown one is a CheckpointError, and checkpoints without it mean ImageNet's."""
    from mvpseg.clip_backbone import NORMALIZATIONS

    torch.manual_seed(0)
    net = StudentNet(StudentConfig("resnet-tiny", embed_dim=64, normalization="clip")).eval()
    path = save_student(tmp_path / "s", net, prompts, tiny)
    meta = json.loads((tmp_path / "s.json").read_text())
    assert meta["config"]["normalization"] == "clip" and meta["clip_normalization"] == tiny.normalization
    assert meta["prompts"]["meta"]["normalization"] == tiny.normalization
    loaded = load_student(path, tiny).net
    x = torch.rand(1, 3, 16, 16)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATIONS["clip"])
    torch.testing.assert_close(loaded.normalize(x), (x - mean) / std)
    with torch.no_grad():
        torch.testing.assert_close(loaded.features(loaded.normalize(x)), net.features(net.normalize(x)))
    for value, error in (("weird", "bad student config.*unknown student input normalization 'weird'"), (None, None)):
        broken = dict(meta, config={k: v for k, v in meta["config"].items() if k != "normalization"})
        if value is not None:
            broken["config"]["normalization"] = value
        (tmp_path / "b.json").write_text(json.dumps(broken))
        (tmp_path / "b.safetensors").write_bytes(path.read_bytes())
        if error:
            with pytest.raises(CheckpointError, match=error):
                load_student(tmp_path / "b", tiny)
        else:  # written before the field existed: ImageNet statistics, as every student then used
            assert load_student(tmp_path / "b", tiny).net.config.normalization == "imagenet"
    with pytest.raises(ValueError, match="unknown student input normalization"):
        StudentConfig(normalization="sRGB")


def test_backbone_weights_offline_fallback_and_local_files(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MVPSEG_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # an empty cache
    net = make_resnet("resnet18")
    with caplog.at_level(logging.WARNING, logger="mvpseg.student"):
        desc = load_backbone_weights(net, "resnet18", "imagenet")
    assert desc.startswith("random init (ImageNet weights unavailable")
    assert "RANDOMLY initialised" in caplog.text and "--backbone-weights" in caplog.text
    with pytest.raises(BackboneWeightsUnavailable, match="resnet18-f37072fd.pth"):
        load_backbone_weights(net, "resnet18", "imagenet", require=True)
    assert "no ImageNet weights" in load_backbone_weights(make_resnet("resnet-tiny"), "resnet-tiny", "imagenet")

    torch.manual_seed(1)
    src = make_resnet("resnet18")
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    save_file({k: v.contiguous() for k, v in src.state_dict().items() if not k.startswith("fc.")},
              str(tmp_path / "r18.safetensors"))
    for name in ("r18.pth", "r18.safetensors"):
        dst = make_resnet("resnet18")
        assert load_backbone_weights(dst, "resnet18", str(tmp_path / name)).startswith("weights from")
        assert torch.equal(dst.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
    with pytest.raises(BackboneWeightsUnavailable, match="does not fit"):
        load_backbone_weights(make_resnet("resnet34"), "resnet34", str(tmp_path / "r18.pth"))
    with pytest.raises(FileNotFoundError):
        load_backbone_weights(net, "resnet18", str(tmp_path / "nope.pth"))


def test_student_predictor_api(tmp_path, tiny, prompts):
    net = tiny_student(background=True)
    pred = StudentPredictor(net, tiny, prompts, short_side=48, max_long_side=128)
    img = np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)
    pred.set_image(img)
    r = pred.predict("cat, dog, sky")
    assert r.classes == ("cat", "dog", "sky") and r.prompt_set == "mvp-seg+" and r.view_names == ("student",)
    assert r.label_map.shape == (60, 90) and r.label_map.dtype == np.int32 and r.gpr_scores is None
    assert r.fused.shape == (3, 60, 90)
    np.testing.assert_allclose(r.fused.sum(0), 1.0, atol=1e-5)
    np.testing.assert_allclose(r.final, r.fused)
    pred.predict(["cat", "dog", "sky"])
    r2 = pred.predict("Background, cat")  # the learned background embedding, not the word
    assert pred.stats == {"image_encodes": 1, "text_encodes": 2}
    emb = pred.class_embeddings(("Background", "cat"))
    expected = net.classify(pred._features, emb, 0)
    torch.testing.assert_close(r2.output.fused_logits, expected)
    with pytest.raises(KeyError):
        pred.predict("cat", prompts="maskclip-85")

    path = save_student(tmp_path / "student", net, prompts, tiny)
    again = StudentPredictor.from_checkpoint(path, tiny, short_side=48, max_long_side=128)
    again.set_image(img)
    np.testing.assert_array_equal(again.predict("cat, dog, sky").label_map, r.label_map)


def test_label_map_is_argmax_at_original_size(tiny, prompts):
    pred = StudentPredictor(tiny_student(), tiny, prompts, short_side=64, max_long_side=256)
    img = np.random.default_rng(2).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    pred.set_image(img)  # work size == image size: the label map is the exact argmax of the probabilities
    r = pred.predict(["a", "b", "c", "d"])
    assert (r.label_map == r.fused.argmax(0)).mean() > 0.99


def test_students_record_the_teachers_dense_mode_and_refuse_another(tmp_path):
    from mvpseg.testing import tiny_vit_clip

    teacher = tiny_vit_clip(dense_mode="clearclip", sliding=(32, 16))
    torch.manual_seed(0)
    prompts = LearnedPrompts(teacher.text_width, n_seg=2, n_ctx=4)
    net = tiny_student()
    path = save_student(tmp_path / "s", net, prompts, teacher)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["teacher_dense_mode"] == "clearclip" and meta["extra"]["teacher_sliding"] == [32, 16]
    assert meta["prompts"]["meta"]["dense_mode"] == "clearclip"
    load_student(path, tiny_vit_clip(dense_mode="clearclip"))  # the sliding window is not checked
    with pytest.raises(CheckpointError) as e:
        load_student(path, tiny_vit_clip())
    assert str(e.value) == ("this student was distilled from pseudo labels of dense mode 'clearclip', but the CLIP "
                            "is set to 'maskclip-vit': pass --dense clearclip")
    # inference uses only the text tower: the predictor loads it under any dense mode and gives the same maps
    img = np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    maps = []
    for clip in (tiny_vit_clip(), tiny_vit_clip(dense_mode="clearclip")):
        pred = StudentPredictor.from_checkpoint(path, clip, short_side=64)
        pred.set_image(img)
        maps.append(pred.predict("a, b, c").fused)
    torch.testing.assert_close(maps[0], maps[1], rtol=0, atol=0)
    # handcrafted prompts: the same check; an explicit teacher setting wins over the CLIP's
    path2 = save_student(tmp_path / "h", net, TemplatePrompts.single(), teacher, dense=teacher.dense_settings("sclip"))
    with pytest.raises(CheckpointError, match="dense mode 'sclip'.*pass --dense sclip"):
        load_student(path2, teacher)


def test_student_predictor_pamr_refines_the_logits(tiny, prompts):
    from mvpseg.dense import pamr

    img = np.random.default_rng(4).integers(0, 255, (60, 90, 3), dtype=np.uint8)
    plain, refined = (StudentPredictor(tiny_student(), tiny, prompts, short_side=48, pamr=on) for on in (False, True))
    plain.set_image(img)
    refined.set_image(img)
    a, b = plain.predict("cat, dog"), refined.predict("cat, dog")
    torch.testing.assert_close(b.logits, pamr(refined._input, a.output.log_final(a.work_size)), rtol=0, atol=0)
