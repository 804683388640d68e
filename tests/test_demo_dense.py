"""The demo's dense-feature selector and sliding-window switch (issue #15): service, page and /segment API."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np
import pytest
import torch

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

from demo import build_demo  # noqa: E402
from demo.messages import timings as _timings  # noqa: E402
from demo.service import SegmentService  # noqa: E402
from demo.sources import DemoInputError  # noqa: E402
from demo.testing import serve, small_models  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "assets" / "examples" / "toy_test_294.png"


@pytest.fixture(scope="module")
def vit_models(tmp_path_factory):
    return small_models(tmp_path_factory.mktemp("vit_demo"), vit=True, short_side=64)


def test_service_keys_image_features_on_the_dense_settings_not_the_text(vit_models):
    service = SegmentService(vit_models)
    pred = service.predictor
    assert vit_models.dense_choices == ("maskclip-vit", "sclip", "clearclip", "naclip")
    assert vit_models.window == (64, 32)  # the tiny ViT's own resolution, stride half of it
    image = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    a = service.segment(image, "cat, dog", ["maskclip-85"])
    assert not a.image_cached and a.dense == "maskclip-vit" and pred.stats["image_encodes"] == 1
    b = service.segment(image, "cat, dog", ["maskclip-85"])
    assert b.image_cached and b.image_seconds == 0.0 and pred.stats["image_encodes"] == 1
    text_encodes = pred.stats["text_encodes"]
    c = service.segment(image, "cat, dog", ["maskclip-85"], dense_mode="clearclip", sliding=True)
    assert not c.image_cached and c.dense == "clearclip, sliding 64/32" and pred.stats["image_encodes"] == 2
    assert pred.stats["text_encodes"] == text_encodes and c.results[0].text_cached  # text cache untouched
    expected = pred.clip.dense_features(pred._input, pred.clip.dense_settings("clearclip", (64, 32)))
    torch.testing.assert_close(pred.image_features, expected, rtol=0, atol=0)
    assert service.segment(image, "cat, dog", ["maskclip-85"], dense_mode="clearclip", sliding=True).image_cached
    # the timings table names the settings the image features were computed with
    rows = _timings(c, {}, 1.0)
    note = rows[rows.stage == "image features (CLIP image tower)"].note.item()
    assert note.endswith("clearclip, sliding 64/32")
    # a learned set from another mode is skipped with a note; alone it is an error
    d = service.segment(image, "cat", ["learned", "parts"], dense_mode="sclip")
    assert [r.name for r in d.results] == ["parts"] and "learned with dense mode 'maskclip-vit'" in d.notes[-1]
    with pytest.raises(DemoInputError, match="learned with dense mode 'maskclip-vit'"):
        service.segment(image, "cat", ["learned"], dense_mode="sclip")
    with pytest.raises(DemoInputError, match="dense mode 'maskclip' is not available for a VisionTransformer"):
        service.segment(image, "cat", ["parts"], dense_mode="maskclip")
    assert service.segment(image, "cat", ["learned"]).results[0].name == "learned"  # back to the default


def test_segment_api_takes_the_new_inputs_at_the_end(vit_models):
    demo = build_demo(vit_models, examples=[])
    with serve(demo) as url:
        client = Client(url, verbose=False)
        img = handle_file(str(EXAMPLE))
        # an existing call (five inputs) still works and uses the defaults
        old = client.predict(img, "cat, sky", ["parts"], [], "", api_name="/segment")
        assert "dense features: maskclip-vit" in old[1]
        new = client.predict(img, "cat, sky", ["parts"], [], "", "naclip", True, api_name="/segment")
        assert "dense features: naclip, sliding 64/32" in new[1]
        info = client.predict(api_name="/info")
        assert info["dense"]["modes"] == ["maskclip-vit", "sclip", "clearclip", "naclip"]
        assert info["dense"]["default"] == "maskclip-vit" and info["dense"]["sliding_window"] == [64, 32]


def test_resnet_pages_offer_only_maskclip(tmp_path):
    models = small_models(tmp_path)
    assert models.dense_choices == ("maskclip",) and models.window == (64, 32)
    demo = build_demo(models, examples=[])
    dropdown = next(c for c in demo.blocks.values() if getattr(c, "elem_id", None) == "dense-mode")
    assert dropdown.visible is False and dropdown.value == "maskclip"


def test_app_flags_set_the_defaults(tmp_path):
    import app
    from demo import DemoConfig, load_models
    from mvpseg.clip_backbone import ClipSpec
    from mvpseg.testing import write_tiny_vit_clip

    clip_args = write_tiny_vit_clip(tmp_path)
    args = app.parse_args([*clip_args, "--dense", "sclip", "--sliding", "32/16"])
    spec = ClipSpec.from_args(args)
    models = load_models(DemoConfig(clip=spec.model_name, pretrained=spec.pretrained, model_config=spec.model_config,
                                    device="cpu", discover=False, short_side=64, text_cache_dir=None,
                                    dense_mode=spec.dense_mode, sliding=spec.sliding))
    assert models.predictor.dense.describe() == "sclip, sliding 32/16"
    assert models.sliding_default and models.window == (32, 16)
    service = SegmentService(models)
    run = service.segment(np.zeros((64, 64, 3), np.uint8), "cat", ["parts"])
    assert run.dense == "sclip, sliding 32/16"
    assert service.segment(np.zeros((64, 64, 3), np.uint8), "cat", ["parts"], sliding=False).dense == "sclip"




def test_learned_sets_of_another_mode_are_offered_and_run_under_that_mode(tmp_path):
    # an upload and a startup checkpoint learned with sclip, on a page that started with maskclip-vit: both are
    # loaded (the page's selector picks the mode per request), skipped with a page hint under another mode
    from demo import DemoConfig, load_models
    from demo.sources import prompts_from_upload
    from demo.testing import save_random_prompts
    from mvpseg.testing import tiny_vit_clip, write_tiny_vit_clip

    sclip_path = save_random_prompts(tmp_path / "s.safetensors", tiny_vit_clip(dense_mode="sclip"), seed=1)
    service = SegmentService(small_models(tmp_path / "page", vit=True, short_side=64))  # starts with maskclip-vit
    upload = prompts_from_upload([str(sclip_path), str(sclip_path.with_suffix(".json"))], service.predictor.clip)
    assert upload.prompts.meta.dense_mode == "sclip" and upload.description.endswith("dense mode sclip")
    image = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    run = service.segment(image, "cat, dog", ["uploaded", "parts"], uploaded=upload)
    assert [r.name for r in run.results] == ["parts"]
    assert run.notes[-1].startswith("Learned · your uploaded checkpoint skipped: ")
    assert "learned with dense mode 'sclip', not 'maskclip-vit'" in run.notes[-1]
    assert run.notes[-1].endswith("choose sclip under 'Dense features'.")
    run = service.segment(image, "cat, dog", ["uploaded", "learned", "parts"], uploaded=upload, dense_mode="sclip")
    assert [r.name for r in run.results] == ["uploaded", "parts"] and run.dense == "sclip"
    direct = service.predictor.predict(("cat", "dog"), prompts="uploaded")  # the set itself under sclip features
    torch.testing.assert_close(run.results[0].prediction.fused, direct.fused, rtol=0, atol=0)

    clip_args = write_tiny_vit_clip(tmp_path / "clip")
    spec = dict(zip(clip_args[::2], clip_args[1::2]))
    models = load_models(DemoConfig(clip=spec["--clip"], pretrained=spec["--pretrained"],
                                    model_config=spec["--model-config"], device="cpu", discover=False,
                                    short_side=64, text_cache_dir=None, checkpoints=(("mine", str(sclip_path)),)))
    assert models.learned_sets["mine"].endswith("dense mode sclip") and not models.notices
    started = SegmentService(models)
    assert "mine" in started.learned_names and "mine" not in started.default_selection()  # default: maskclip-vit
    assert [r.name for r in started.segment(image, "cat", ["mine"], dense_mode="sclip").results] == ["mine"]
