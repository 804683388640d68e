"""Sliding-window dense features: the window grid, exact averaging of per-window logits, whole-image equivalence."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import open_clip
from mvpseg.clip_backbone import register_model_config
from mvpseg.dense import SlidingWindow, dense_features, sliding_dense_features, tower_stride
from mvpseg.dense.sliding import window_starts


@pytest.fixture(scope="module")
def vit():
    register_model_config("mvpseg-test-vit-sliding", {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return open_clip.create_model("mvpseg-test-vit-sliding", pretrained=None).eval().visual


def test_window_starts_follow_mmseg_slide_inference():
    assert window_starts(10, 4, 2) == [0, 2, 4, 6]
    assert window_starts(11, 4, 2) == [0, 2, 4, 6, 7]  # last one clamped to the border
    assert window_starts(4, 4, 2) == [0] and window_starts(3, 4, 2) == [0]  # not larger than the window: whole
    for cells, win, stride in [(28, 14, 7), (29, 14, 7), (100, 14, 5), (15, 14, 14)]:
        # mmseg: h_grids = max(h - crop + stride - 1, 0) // stride + 1, y1 = max(min(y1 + crop, h) - crop, 0)
        grids = max(cells - win + stride - 1, 0) // stride + 1
        mm = [max(min(i * stride + win, cells) - win, 0) for i in range(grids)]
        assert window_starts(cells, win, stride) == mm


@pytest.mark.parametrize("mode", ["maskclip-vit", "sclip", "naclip"])
def test_average_is_exactly_the_mean_of_per_window_logits(vit, mode):
    torch.manual_seed(0)
    img = torch.randn(2, 3, 56, 88)  # 7×11 cells of 8 px; window 4 cells, stride 2: origins y {0,2,3}, x {0,2,4,6,7}
    text = F.normalize(torch.randn(5, 32), dim=-1)
    with torch.no_grad():
        feats = sliding_dense_features(vit, img, mode, window=32, stride=16)
        assert feats.shape == (2, 32, 7, 11)
        logits = torch.einsum("bdhw,cd->bchw", feats, text)
        total, count = torch.zeros(2, 5, 7, 11), torch.zeros(7, 11)
        for y in (0, 2, 3):
            for x in (0, 2, 4, 6, 7):
                f = dense_features(vit, img[:, :, 8 * y:8 * y + 32, 8 * x:8 * x + 32], mode)  # one window alone
                total[:, :, y:y + 4, x:x + 4] += torch.einsum("bdhw,cd->bchw", f, text)
                count[y:y + 4, x:x + 4] += 1
    assert count.min() >= 1
    torch.testing.assert_close(logits, total / count, rtol=0, atol=1e-5)
    assert feats.norm(dim=1).max() <= 1 + 1e-5  # averaged, not re-normalised
    assert feats.norm(dim=1).min() < 0.999


def test_one_window_equal_to_the_image_is_the_whole_image(vit, tiny):
    img = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(sliding_dense_features(vit, img, "clearclip", window=48, stride=16),
                           dense_features(vit, img, "clearclip"))
        rn = tiny.model.visual
        x = tiny.normalize(torch.rand(2, 3, 64, 96))
        whole = dense_features(rn, x)
        # an image smaller than the window along an axis is processed whole along it
        assert torch.equal(sliding_dense_features(rn, x, window=224, stride=96), whole)
        # 96 px windows on a 64×96 RN image: one window → the same forward
        assert torch.equal(sliding_dense_features(rn, x, window=96, stride=32), whole)


def test_smaller_than_window_on_one_axis_only(vit):
    img = torch.randn(1, 3, 24, 72)  # 3×9 cells; 4-cell windows → whole height (3 cells), x origins 0, 3, 5
    with torch.no_grad():
        feats = sliding_dense_features(vit, img, "maskclip-vit", window=32, stride=24)
        total, count = torch.zeros(1, 32, 3, 9), torch.zeros(3, 9)
        for x in (0, 3, 5):
            total[..., x:x + 4] += dense_features(vit, img[..., 8 * x:8 * x + 32], "maskclip-vit")
            count[:, x:x + 4] += 1
    torch.testing.assert_close(feats, total / count, rtol=0, atol=1e-6)


def test_remainder_pixels_are_ignored_like_the_patch_embedding(vit):
    img = torch.randn(1, 3, 51, 69)  # 6×8 cells + 3/5 px left over
    with torch.no_grad():
        feats = sliding_dense_features(vit, img, "maskclip-vit", window=32, stride=16)
        cropped = sliding_dense_features(vit, img[:, :, :48, :64], "maskclip-vit", window=32, stride=16)
    assert torch.equal(feats, cropped)


def test_errors(vit, tiny):
    img = torch.randn(1, 3, 64, 64)
    assert tower_stride(vit) == 8 and tower_stride(tiny.model.visual) == 32
    with pytest.raises(ValueError, match=r"multiples of the ModifiedResNet's stride 32 \(e.g. window 224, stride 128\)"):
        sliding_dense_features(tiny.model.visual, tiny.normalize(torch.rand(1, 3, 256, 256)))  # 112 = 3.5 cells
    with pytest.raises(ValueError, match="multiples of the VisionTransformer's stride 8"):
        sliding_dense_features(vit, img, window=36, stride=16)
    with pytest.raises(ValueError, match="1 ≤ stride ≤ window"):
        sliding_dense_features(vit, img, window=32, stride=40)
    with pytest.raises(ValueError, match="1 ≤ stride ≤ window"):
        SlidingWindow(0, 0)
    with pytest.raises(ValueError, match="not available for a VisionTransformer"):
        sliding_dense_features(vit, img, "maskclip", window=32, stride=16)
    with pytest.raises(ValueError, match="smaller than one 8-pixel feature cell"):
        sliding_dense_features(vit, torch.randn(1, 3, 4, 64), window=32, stride=16)
    assert SlidingWindow() == SlidingWindow(224, 112)
