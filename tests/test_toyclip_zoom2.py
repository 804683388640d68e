"""The second bundled toy CLIP, pretrained on the toy world magnified 2× (``zoom=2``), and the MVP-SEG
prompts learned with it: the setting of docs/history/toyworld-attempts.md (attempt 5) in which learned prompts beat the
handcrafted templates on unseen classes."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from training import toyworld as tw

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets" / "toyclip-zoom2"
WEIGHTS, CONFIG = ASSETS / "toyclip-zoom2.safetensors", ASSETS / "toyclip-zoom2.json"
PROMPTS = ROOT / "assets" / "prompts" / "toyworld-zoom2-mvpseg.safetensors"
NAME = "toyclip-zoom2"  # its own registry name, so it never shadows the default "toyclip" config


def _clip():
    from mvpseg.clip_backbone import ClipSpec, load_clip

    return load_clip(ClipSpec(NAME, pretrained=str(WEIGHTS), model_config=str(CONFIG)))


def test_assets_are_small_fp16_and_record_the_zoom():
    assert WEIGHTS.stat().st_size <= 15 * 1024 * 1024
    cfg = json.loads(CONFIG.read_text())
    assert cfg["vision_cfg"]["image_size"] == 128 and cfg["text_cfg"]["context_length"] >= 48
    assert {v.dtype for v in load_file(str(WEIGHTS)).values() if v.is_floating_point()} == {torch.float16}
    with safe_open(str(WEIGHTS), "pt") as f:
        meta = f.metadata()
    assert meta["zoom"] == "2" and meta["normalization"] == "imagenet" and json.loads(meta["config"]) == cfg
    record = json.loads((ASSETS / "training_record.json").read_text())
    assert record["args"]["zoom"] == 2 and record["unseen"] == tw.UNSEEN


def test_dense_features_of_a_magnified_scene():
    clip = _clip()
    image, _ = tw.ToyWorld("val", 1, seed=0, zoom=2)[0]
    f = clip.dense_features(clip.normalize(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255))
    assert f.shape == (1, 128, 16, 16)  # 512 px at stride 32
    torch.testing.assert_close(f.norm(dim=1), torch.ones(1, 16, 16))


@torch.no_grad()
def test_zero_shot_classification_of_magnified_crops():
    """Measured 96.5 % on 512 held-out crops (training_record.json); ≥ 80 % on 128 crops is ~5 binomial
    standard errors below, 13× chance: it fails only if the weights or the zoomed crops are broken."""
    import open_clip

    from training.toyworld.pretrain import zero_shot_accuracy

    open_clip.add_model_config(CONFIG)
    model = open_clip.create_model(NAME, pretrained=str(WEIGHTS))
    acc = zero_shot_accuracy(model, open_clip.get_tokenizer(NAME), "cpu", n=128, zoom=2)
    assert acc["n"] == 128 and acc["all"] >= 0.8


def test_shipped_prompts_were_learned_on_seen_classes_only():
    import mvpseg

    prompts = mvpseg.load_prompts(PROMPTS, _clip())
    meta = json.loads(PROMPTS.with_suffix(".json").read_text())
    assert (meta["n_seg"], meta["n_ctx"], meta["use_global"]) == (3, 32, True)
    assert tuple(prompts.ctx.shape) == (4, 32, 64)
    unseen = {tw.CLASS_NAMES[i] for i in tw.UNSEEN}
    assert set(meta["training_classes"]) == set(tw.CLASS_NAMES) - unseen
    assert "zoom=2" in json.dumps(meta)


def test_shipped_learned_prompts_beat_the_templates_on_held_out_unseen_classes():
    """The shipped MVP-SEG prompts (3 views + GPR, 1000 iterations on 400 *train* scenes, seen classes
    only; docs/history/toyworld-attempts.md, attempt 5) against MaskCLIP's 85 templates on 48 *test*-split scenes at zoom 2,
    which no step of training or model selection ever used.

    Measured on four disjoint 48-scene test sets (spec seeds 0–3), unseen mIoU learned − templates:
    +2.7, +1.9, +2.1, +1.6 (mean 2.1, sd 0.5); seen: +1.4, +3.0, +1.9, +2.9. On the 200 validation scenes
    the same prompts gave +2.5 unseen, and the same recipe with training seeds 1 and 2 gave +2.4 and +0.3,
    so the test asserts ≥ +1.0 on the seed-0 set (measured +2.7; 2 sd below the mean over sets) and a seen
    margin > 0. It fails if the prompts, the zoomed world, the views/GPR fusion or the template baseline
    regress. (The prompts were learned offline — 11 min on 2 CPU threads —, not in this test; the
    CI-sized *learning* run is in test_toyclip.py.)
    """
    unseen, seen = _margins_on_test_scenes(PROMPTS)
    assert unseen >= 1.0 and seen > 0


def _margins_on_test_scenes(prompts: Path, device: str = "cpu") -> tuple[float, float]:
    """(unseen, seen) mIoU of ``prompts`` minus the 85 templates' on the 48 test-split scenes of seed 0."""
    from training.evaluate import main as eval_main

    clip = ["--clip", NAME, "--model-config", str(CONFIG), "--pretrained", str(WEIGHTS), "--device", device,
            "--num-workers", "0", "--cpu-threads", "2", "--no-progress"]
    report = eval_main(["--data", "toyworld=length=48,seed=0,zoom=2", "--split", "test", "--baselines",
                        "maskclip-85", "--prompts", f"learned={prompts}", *clip])
    res = report["results"]["toyworld"]
    assert report["datasets"]["toyworld"]["unseen_in_training_vocabulary"]["learned"] == []
    learned, templates = res["learned"], res["maskclip-85"]
    return (learned["miou_unseen"] - templates["miou_unseen"], learned["miou_seen"] - templates["miou_seen"])


@pytest.mark.skipif(os.environ.get("MVPSEG_SLOW") != "1", reason=(
    "opt-in, about 12 min on 2 CPU threads: MVPSEG_SLOW=1 bash scripts/test.sh tests/test_toyclip_zoom2.py"))
def test_seeded_1000_iteration_learning_run_beats_the_templates(tmp_path):
    """The learning run behind the shipped prompts, from scratch: MVP-SEG (3 views + OCLoss + GPR) on
    400 train scenes at zoom 2, seed 0, 1000 iterations × batch 8, SGD lr 2e-3 (warmup 100), crop 256 —
    the recipe of docs/history/toyworld-attempts.md, attempt 5 — then the held-out comparison above.

    Opt-in because it is not CI-sized on a CPU (11.7 min on 2 threads, measured; on a GPU, where it runs
    with ``--device auto``, about a minute, extrapolated from the H200's 400-iteration runs). CI-sized
    runs do not beat the templates (150 iterations on 64 scenes:
    SGD −2.9 / −1.5 / −1.1 unseen, AdamW −0.3 / +0.6 / +0.3 over seeds 0–2; docs/history/toyworld-attempts.md, attempts 5
    and 6), which is why this margin test is the full-size run. Measured for this seed: +2.7 unseen,
    +1.4 seen on these test scenes (+2.5 / +2.2 on the validation scenes). The margin depends on the
    seed — training seeds 1 / 2 gave +2.4 / +0.3 on validation — so this pins seed 0's run (the shipped
    result, reproduced), not a claim for every seed; the bound is the shipped prompts' +1.0.
    """
    from training.train_prompts import main as train_main

    spec = "length=400,seed=0,world=sparse,background=class,zoom=2"
    out = train_main(["--dataset", "toyworld", "--data-root", spec, "--out", str(tmp_path / "run"),
                      "--recipe", "paper", "--variant", "mvpseg", "--lr", "2e-3", "--warmup-iters", "100", "--max-iters", "1000",
                      "--crop-size", "256", "--seed", "0", "--ckpt-every", "1000", "--no-progress",
                      "--clip", NAME, "--model-config", str(CONFIG), "--pretrained", str(WEIGHTS)])
    unseen, seen = _margins_on_test_scenes(out, device="auto")
    assert unseen >= 1.0 and seen > 0
