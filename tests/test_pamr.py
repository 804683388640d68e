"""PAMR against the official implementation (ported) and on a mask whose edge is noisy."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mvpseg.dense import pamr


# ---- official code, ported: wangf3014/SCLIP pamr.py (= visinf/1-stage-wseg models/mods/pamr.py; NACLIP's copy
# differs only in filling a preallocated tensor instead of torch.cat) ------------------------------------------

class LocalAffinity(nn.Module):

    def __init__(self, dilations=[1]):
        super(LocalAffinity, self).__init__()
        self.dilations = dilations
        weight = self._init_aff()
        self.register_buffer('kernel', weight)

    def _init_aff(self):
        # initialising the shift kernel
        weight = torch.zeros(8, 1, 3, 3)
        for i in range(weight.size(0)):
            weight[i, 0, 1, 1] = 1
        weight[0, 0, 0, 0] = -1
        weight[1, 0, 0, 1] = -1
        weight[2, 0, 0, 2] = -1
        weight[3, 0, 1, 0] = -1
        weight[4, 0, 1, 2] = -1
        weight[5, 0, 2, 0] = -1
        weight[6, 0, 2, 1] = -1
        weight[7, 0, 2, 2] = -1
        return weight

    def forward(self, x):
        B, K, H, W = x.size()
        x = x.view(B * K, 1, H, W)
        x_affs = []
        for d in self.dilations:
            x_pad = F.pad(x, [d] * 4, mode='replicate')
            x_aff = F.conv2d(x_pad, self.kernel, dilation=d)
            x_affs.append(x_aff)
        x_aff = torch.cat(x_affs, 1)
        return x_aff.view(B, K, -1, H, W)


class LocalAffinityCopy(LocalAffinity):

    def _init_aff(self):
        weight = torch.zeros(8, 1, 3, 3)
        weight[0, 0, 0, 0] = 1
        weight[1, 0, 0, 1] = 1
        weight[2, 0, 0, 2] = 1
        weight[3, 0, 1, 0] = 1
        weight[4, 0, 1, 2] = 1
        weight[5, 0, 2, 0] = 1
        weight[6, 0, 2, 1] = 1
        weight[7, 0, 2, 2] = 1
        return weight


class LocalStDev(LocalAffinity):

    def _init_aff(self):
        weight = torch.zeros(9, 1, 3, 3)
        weight.zero_()
        weight[0, 0, 0, 0] = 1
        weight[1, 0, 0, 1] = 1
        weight[2, 0, 0, 2] = 1
        weight[3, 0, 1, 0] = 1
        weight[4, 0, 1, 1] = 1
        weight[5, 0, 1, 2] = 1
        weight[6, 0, 2, 0] = 1
        weight[7, 0, 2, 1] = 1
        weight[8, 0, 2, 2] = 1
        return weight

    def forward(self, x):
        # returns (B,K,P,H,W), where P is the number of locations
        x = super(LocalStDev, self).forward(x)
        return x.std(2, keepdim=True)


class LocalAffinityAbs(LocalAffinity):

    def forward(self, x):
        x = super(LocalAffinityAbs, self).forward(x)
        return torch.abs(x)


class PAMR(nn.Module):

    def __init__(self, num_iter=1, dilations=[1]):
        super(PAMR, self).__init__()
        self.num_iter = num_iter
        self.aff_x = LocalAffinityAbs(dilations)
        self.aff_m = LocalAffinityCopy(dilations)
        self.aff_std = LocalStDev(dilations)

    def forward(self, x, mask):
        mask = F.interpolate(mask, size=x.size()[-2:], mode="bilinear", align_corners=True)
        # x: [BxKxHxW]
        # mask: [BxCxHxW]
        B, K, H, W = x.size()
        _, C, _, _ = mask.size()
        x_std = self.aff_std(x)
        x = -self.aff_x(x) / (1e-8 + 0.1 * x_std)
        x = x.mean(1, keepdim=True)
        x = F.softmax(x, 2)
        for _ in range(self.num_iter):
            m = self.aff_m(mask)  # [BxCxPxHxW]
            mask = (m * x).sum(2)
        # xvals: [BxCxHxW]
        return mask


# ---- tests -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("iterations,dilations,mask_size", [
    (10, (1, 2, 4, 8, 12, 24), (40, 56)),   # defaults (1-stage-wseg), masks at image size
    (10, (8, 16), (10, 14)),                  # SCLIP/NACLIP segmentors' default dilations, low-res masks
    (3, (1,), (40, 56)),
])
def test_matches_official_pamr(iterations, dilations, mask_size):
    torch.manual_seed(0)
    image = torch.rand(2, 3, 40, 56)
    image[:, :, :, 28:] += 1.0  # an edge, so the affinities are not uniform
    masks = torch.randn(2, 5, *mask_size).softmax(1)
    with torch.no_grad():
        ref = PAMR(iterations, list(dilations))(image, masks)
    ours = pamr(image, masks, iterations, dilations)
    assert ours.shape == (2, 5, 40, 56)
    assert (ours - ref).abs().max() <= 1e-5


def test_defaults_are_ten_iterations_and_the_six_dilations():
    torch.manual_seed(1)
    image, masks = torch.rand(1, 3, 30, 30), torch.rand(1, 2, 30, 30)
    with torch.no_grad():
        ref = PAMR(10, [1, 2, 4, 8, 12, 24])(image, masks)
    assert (pamr(image, masks) - ref).abs().max() <= 1e-5


def test_noisy_mask_edge_moves_to_the_image_edge():
    """Left half dark, right half bright; the mask says 'right' on a ragged band around the true edge."""
    torch.manual_seed(0)
    h, w, edge = 48, 64, 32
    image = torch.full((1, 3, h, w), 0.2)
    image[..., edge:] = 0.8
    image += 0.02 * torch.randn_like(image)
    truth = torch.zeros(h, w)
    truth[:, edge:] = 1
    cols = torch.arange(w)[None].expand(h, w)
    ragged = edge + torch.randint(-6, 7, (h, 1))  # each row's mask edge off by up to 6 px
    right = (cols >= ragged).float()
    masks = torch.stack([1 - right, right])[None] * 0.8 + 0.1  # soft, like softmaxed logits
    refined = pamr(image, masks)
    before = ((masks.argmax(1)[0] == truth).float().mean())
    after = ((refined.argmax(1)[0] == truth).float().mean())
    assert before < 0.97
    assert after > 0.995
    torch.testing.assert_close(refined.sum(1), torch.ones(1, h, w))  # a convex combination of the masks


def test_errors():
    with pytest.raises(ValueError, match="image B×3×H×W and masks B×C×h×w"):
        pamr(torch.rand(1, 3, 8, 8), torch.rand(2, 2, 8, 8))
    with pytest.raises(ValueError, match="dilations ≥ 1"):
        pamr(torch.rand(1, 3, 8, 8), torch.rand(1, 2, 8, 8), dilations=())
