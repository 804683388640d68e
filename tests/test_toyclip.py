"""The bundled toy CLIP: open_clip round trip, the mvpseg loading path, zero-shot sanity, the pretraining script."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from PIL import Image
from safetensors.torch import load_file

from training import toyworld as tw

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets" / "toyclip"
WEIGHTS, CONFIG = ASSETS / "toyclip.safetensors", ASSETS / "toyclip.json"


def test_assets_are_small_fp16_and_the_config_is_plain_open_clip():
    assert WEIGHTS.stat().st_size <= 15 * 1024 * 1024
    cfg = json.loads(CONFIG.read_text())
    assert set(cfg) == {"embed_dim", "vision_cfg", "text_cfg"}
    assert isinstance(cfg["vision_cfg"]["layers"], list)  # ModifiedResNet tower
    assert cfg["text_cfg"]["context_length"] >= 48
    sd = load_file(str(WEIGHTS))
    assert {v.dtype for v in sd.values() if v.is_floating_point()} == {torch.float16}
    with safe_open(str(WEIGHTS), "pt") as f:
        meta = f.metadata()
    assert meta["normalization"] == "imagenet" and json.loads(meta["config"]) == cfg


def test_open_clip_round_trip():
    import open_clip

    open_clip.add_model_config(CONFIG)
    model = open_clip.create_model("toyclip", pretrained=str(WEIGHTS))  # strict load
    assert type(model.visual).__name__ == "ModifiedResNet"
    sd = load_file(str(WEIGHTS))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, sd[k].to(v.dtype), rtol=0, atol=0)
    tok = open_clip.get_tokenizer("toyclip")  # the real BPE tokenizer, context from the config
    ids = tok(["a photo of a yellow owl."])
    assert ids.shape == (1, 48)
    longest = max(len(tok.encode(n)) for n in tw.CLASS_NAMES)
    assert 1 + 32 + longest + 2 <= 48  # SOT + 32 context tokens + name + '.' + EOT


def test_loads_through_mvpseg_like_rn50():
    from mvpseg.clip_backbone import ClipSpec, load_clip

    clip = load_clip(ClipSpec("toyclip", pretrained=str(WEIGHTS), model_config=str(CONFIG)))
    image, _ = tw.ToyWorld("val", 1, seed=0)[0]
    x = clip.normalize(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)
    f = clip.dense_features(x)
    assert f.shape == (1, 128, 8, 8)
    torch.testing.assert_close(f.norm(dim=1), torch.ones(1, 8, 8))


@torch.no_grad()
def test_zero_shot_classification_is_far_above_chance():
    """Held-out single-object crops, 16 object classes, prompt "a photo of a {}.": chance is 6.25 %.

    The shipped model measured 79.9 % on 512 crops (assets/toyclip/training_record.json); on 128 crops
    the binomial standard error is ~3.5 points, so ≥ 50 % (8× chance, ~8 standard errors below the
    measurement) fails only if the weights, the tokenizer or the loading path are broken.
    """
    import open_clip

    from training.toyworld.pretrain import zero_shot_accuracy

    open_clip.add_model_config(CONFIG)
    model = open_clip.create_model("toyclip", pretrained=str(WEIGHTS))
    acc = zero_shot_accuracy(model, open_clip.get_tokenizer("toyclip"), "cpu", n=128)
    assert acc["n"] == 128 and acc["all"] >= 0.5


def test_pretraining_script_is_seeded_and_writes_loadable_files(tmp_path):
    """Two 2-step runs with the same seed give identical weights; the outputs load through open_clip."""
    import open_clip

    from training.toyworld.pretrain import main

    common = ["--steps", "2", "--batch-size", "8", "--workers", "0", "--threads", "1",
              "--zero-shot-images", "8", "--warmup", "1"]
    rec_a = main(common + ["--out", str(tmp_path / "a")])
    main(common + ["--out", str(tmp_path / "b")])
    sd_a, sd_b = load_file(str(tmp_path / "a" / "toyclip.safetensors")), load_file(str(tmp_path / "b" / "toyclip.safetensors"))
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    assert np.isfinite(rec_a["final_loss"]) and rec_a["args"]["steps"] == 2
    record = json.loads((tmp_path / "a" / "training_record.json").read_text())
    assert record["unseen"] == tw.UNSEEN
    open_clip.add_model_config(tmp_path / "a" / "toyclip.json")
    open_clip.create_model("toyclip", pretrained=str(tmp_path / "a" / "toyclip.safetensors"))
    # --image-size sizes the crops with the model (its attention pool has a fixed positional embedding)
    rec_c = main(common + ["--out", str(tmp_path / "c"), "--image-size", "96"])
    assert json.loads((tmp_path / "c" / "toyclip.json").read_text())["vision_cfg"]["image_size"] == 96
    assert np.isfinite(rec_c["final_loss"]) and rec_c["zero_shot_accuracy"]["n"] == 8
    # --zoom magnifies the crops; the model's input grows with them
    rec_z = main(common + ["--out", str(tmp_path / "z"), "--zoom", "2"])
    assert json.loads((tmp_path / "z" / "toyclip.json").read_text())["vision_cfg"]["image_size"] == 128
    assert np.isfinite(rec_z["final_loss"]) and rec_z["zero_shot_accuracy"]["n"] == 8
    with pytest.raises(SystemExit):
        main(common + ["--out", str(tmp_path / "bad"), "--image-size", "48"])
    # re-register the shipped config so later tests in this session see the shipped architecture
    open_clip.add_model_config(CONFIG)


@pytest.mark.parametrize("name", ["toy_1.png", "toy_2.png", "toy_3.png"])
def test_demo_examples_exist(name):
    from PIL import Image

    with Image.open(ROOT / "assets" / "examples" / name) as im:
        assert im.mode == "RGB" and im.size == (256, 256)


def test_ci_sized_default_recipe_beats_the_best_handcrafted_set(tmp_path):
    """A seeded CI-sized run of the default recipe (``train_prompts`` + ``evaluate``, toy world ``sparse``,
    100 iterations × 4 fresh scenes, seed 0): residual prompts on the 85 templates (issue #27), warm start,
    anchor, calibration, selection on held-out seen classes.

    Measured with this exact set-up (48 evaluation images of seed 1; training seeds 0 / 1 / 2, 2026-12-06, after
    the views were made to start alike with and without a global prompt, commit faf28e6): Δ against the best
    handcrafted set +0.37 / +1.19 / +1.20 mIoU(U) and +0.68 / +1.32 / +1.45 hIoU (before that commit: +0.15 /
    +1.24 / +1.15 and +0.16 / +1.33 / +1.32; the plain form, the default before residual prompts: +0.35 / +1.54 /
    +1.23 and +0.34 / +1.55 / +1.44). The sparse world labels its background, so the default keeps Eq. 7 here.
    The full default (≤ 500 iterations, 150 evaluation images) across four toy CLIPs × four layouts × three
    seeds: docs/recipe.md. Asserted on seed 0: default ≥ best handcrafted on mIoU(U) and hIoU (measured +0.37 and
    +0.68), the checkpoint records its prior, and no unseen name reached the training vocabulary.
    """
    from training.evaluate import main as eval_main
    from training.train_prompts import main as train_main

    clip = ["--clip", "toyclip", "--model-config", str(CONFIG), "--pretrained", str(WEIGHTS), "--device", "cpu",
            "--num-workers", "0", "--cpu-threads", "2", "--no-progress"]
    path = train_main(["--dataset", "toyworld", "--data-root", "seed=0", "--out", str(tmp_path / "default"),
                       "--max-iters", "100", "--seed", "0", "--ckpt-every", "1000", *clip])
    assert json.loads(path.with_suffix(".json").read_text())["residual_prior"] == "maskclip-85"
    report = eval_main(["--data", "toyworld=length=48,seed=1", "--baselines", "maskclip-85", "a-photo-of", "parts",
                        "--prompts", f"default={path}", *clip])
    res = report["results"]["toyworld"]
    print({k: (round(v["miou_unseen"], 2), round(v["hiou"], 2)) for k, v in res.items()})  # shown by -s / failure
    assert report["datasets"]["toyworld"]["unseen_in_training_vocabulary"]["default"] == []
    best = {k: max(res[b][k] for b in ("maskclip-85", "a-photo-of", "parts")) for k in ("miou_unseen", "hiou")}
    assert res["default"]["miou_unseen"] >= best["miou_unseen"]
    assert res["default"]["hiou"] >= best["hiou"]
    assert 30.0 <= res["maskclip-85"]["miou_unseen"] <= 42.0  # measured 35.7 (48 images of seed 1)


def test_shipped_learned_prompts_fit_the_toy_clip_and_never_saw_unseen_classes():
    """The demo's learned prompt set (assets/prompts) loads strictly for the toy CLIP, has the paper's shape
    (3 views + global, 32 context tokens) and was learned on seen classes only."""
    import mvpseg
    from mvpseg.clip_backbone import ClipSpec, load_clip

    clip = load_clip(ClipSpec("toyclip", pretrained=str(WEIGHTS), model_config=str(CONFIG)))
    path = ROOT / "assets" / "prompts" / "toyworld-mvpseg.safetensors"
    prompts = mvpseg.load_prompts(path, clip)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert (meta["n_seg"], meta["n_ctx"], meta["use_global"]) == (3, 32, True)
    assert tuple(prompts.ctx.shape) == (4, 32, clip.text_width)
    unseen = {tw.CLASS_NAMES[i] for i in tw.UNSEEN}
    held_out = set(meta["extra"]["selection"]["held_out_classes"])  # seen classes kept for model selection
    assert not set(meta["training_classes"]) & (unseen | held_out)
    assert set(meta["training_classes"]) | held_out == set(tw.CLASS_NAMES) - unseen


def test_shipped_prompts_separate_present_from_absent_classes():
    """Issue #28: the demo's prompts (default recipe + calibrated GPR, ``--cls-loss bce --gpr-bias on``; the sparse
    world, seed 0) rank and separate present from absent classes per image, so the page's GPR chart shows GPR at
    work. Measured on three disjoint 48-image validation sets (seeds 1 / 2 / 3): separation (mean g present − mean
    g absent) 0.51 / 0.50 / 0.49 seen, 0.42 / 0.34 / 0.40 unseen; ROC-AUC 0.92 / 0.91 / 0.89 seen, 0.89 / 0.84 /
    0.88 unseen (the default recipe's prompts: separation 0.000). Asserted on seed 1 with margins of about the
    spread: separation ≥ 0.40 seen, ≥ 0.30 unseen; AUC ≥ 0.85 both; unseen mIoU ≥ the 85 templates' (measured
    +0.4 / +0.3 / +1.6). And on each toy example of the page, whose vocabulary ends with a stuff class that is
    not in the scene: that class's bar is below 0.25 and it gets no pixels."""
    import mvpseg
    from mvpseg.clip_backbone import ClipSpec
    from training.evaluate import main as eval_main

    path = ROOT / "assets" / "prompts" / "toyworld-mvpseg.safetensors"
    clip = ["--clip", "toyclip", "--model-config", str(CONFIG), "--pretrained", str(WEIGHTS), "--device", "cpu",
            "--num-workers", "0", "--cpu-threads", "2", "--no-progress"]
    report = eval_main(["--data", "toyworld=length=48,seed=1", "--baselines", "maskclip-85",
                        "--prompts", f"shipped={path}", *clip])
    res = report["results"]["toyworld"]
    gpr = res["shipped"]["gpr"]
    print(gpr)
    assert gpr["seen"]["separation"] >= 0.40 and gpr["unseen"]["separation"] >= 0.30
    assert gpr["seen"]["auc"] >= 0.85 and gpr["unseen"]["auc"] >= 0.85
    assert res["shipped"]["miou_unseen"] >= res["maskclip-85"]["miou_unseen"]

    spec = ClipSpec("toyclip", pretrained=str(WEIGHTS), model_config=str(CONFIG))
    predictor = mvpseg.build_predictor(spec, {"learned": str(path)}, baselines=False)
    examples = [e for e in json.loads((ROOT / "assets" / "examples" / "examples.json").read_text())
                if e["model"] == "toy"]
    assert len(examples) == 3
    for e in examples:
        with Image.open(ROOT / "assets" / "examples" / e["file"]) as im:
            predictor.set_image(np.asarray(im.convert("RGB")))
        vocab = [v.strip() for v in e["vocabulary"].split(",")]
        r = predictor.predict(vocab, "learned")
        absent = len(vocab) - 1
        assert r.gpr_scores[absent] < 0.25 and not (r.label_map == absent).any(), (e["file"], r.gpr_scores)


STUDENT = ROOT / "assets" / "students" / "toyworld-mvpseg-plus.safetensors"


def test_shipped_student_is_the_demos_default_and_beats_its_teacher():
    """Issue #24: the demo's MVP-SEG+ student (assets/students, distilled from the shipped prompts with the
    default settings on 300 `sparse` scenes) is small, loads by default with the toy CLIP, and on 48 validation
    scenes (seed 1) beats its teacher, the shipped prompts, on unseen classes and on hIoU. Measured (fixed
    weights, so only the platform's float arithmetic can move these): mIoU(U) / mIoU(S) / hIoU 47.9 / 51.7 /
    49.7 against 36.1 / 39.1 / 37.5 (on 150 scenes of the training world's validation split: 42.3 / 50.7 / 46.1
    against 31.0 / 37.5 / 33.9). Its seen-class penalty, chosen by the default rule on its 300 training scenes
    (``training.calibrate_student``), is 0: on this layout the unseen pixels are mostly the easy unseen *sand*.
    Asserted: ≥ 3 points on mIoU(U) and hIoU, scored as shipped (with its penalty)."""
    import mvpseg
    from demo.models import DemoConfig, load_models
    from training.datasets import build_dataset, get_profile
    from training.distributed import distributed_session
    from training.evaluate import main as eval_main
    from training.student_eval import evaluate_student

    assert STUDENT.stat().st_size < 10 * 2**20
    meta = json.loads(STUDENT.with_suffix(".json").read_text())
    assert meta["config"]["backbone"] == "clip" and meta["prompts"]["meta"]["residual_prior"] == "maskclip-85"
    assert meta["extra"]["seen_calibration"]["images"] == 300  # calibrated, as training.distill does by default
    models = load_models(DemoConfig(device="cpu"))  # offline: the toy CLIP, and what ships for it
    assert models.mode == "toy" and models.student.configured, models.student.status
    assert STUDENT.name in models.student.status

    clip = models.predictor.clip
    loaded = mvpseg.load_student(STUDENT, clip)
    ds = build_dataset("toyworld", "length=48,seed=1", label_space="full")
    emb = mvpseg.fuse_views(loaded.prompts.encode(clip, tuple(ds.prompt_names)).detach())
    with distributed_session("cpu") as ctx:
        student = evaluate_student(loaded.net, emb, 0, ds, get_profile("toyworld").eval_transform(), ctx,
                                   progress=False, seen_penalty=loaded.meta.seen_penalty)  # as shipped
    args = ["--clip", "toyclip", "--model-config", str(CONFIG), "--pretrained", str(WEIGHTS), "--device", "cpu",
            "--num-workers", "0", "--cpu-threads", "2", "--no-progress"]
    teacher = eval_main(["--data", "toyworld=length=48,seed=1", "--prompts",
                         f"shipped={ROOT / 'assets' / 'prompts' / 'toyworld-mvpseg.safetensors'}", *args])
    t = teacher["results"]["toyworld"]["shipped"]
    print(student.miou_unseen, student.miou_seen, student.hiou, t["miou_unseen"], t["miou_seen"], t["hiou"])
    assert student.miou_unseen >= t["miou_unseen"] + 3.0 and student.hiou > t["hiou"] + 3.0
