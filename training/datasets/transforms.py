"""MaskCLIP/MMSegmentation-style augmentation and evaluation resizing on numpy arrays.

Train: random resize (``img_scale × U(0.5, 2.0)``, keep ratio) → random crop with
``cat_max_ratio=0.75`` → horizontal flip (p=0.5) → photometric distortion → to [0, 1] → pad to the
crop size (label 255).  Eval: keep-ratio resize to ``img_scale`` → to [0, 1]; the label keeps its
original size (predictions are resized back to it).

Images leave here as float RGB in [0, 1]; mean/std normalisation is the CLIP wrapper's job
(``FrozenCLIP.normalize``, ImageNet statistics by default as in MaskCLIP's configs).  mmseg pads the
*normalised* image with 0, i.e. with the mean colour: ``pad_value`` (default: the ImageNet mean) does
the same before normalisation.

All randomness comes from the ``numpy.random.Generator`` passed in, so an augmented sample is a pure
function of (image, label, generator seed): that is what makes resumed and multi-process runs
reproduce single-process runs (see ``training/data.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)


def rescale_size(h: int, w: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's keep-ratio rule: the long side ≤ max(scale) and the short side ≤ min(scale)."""
    long_max, short_max = max(scale), min(scale)
    f = min(long_max / max(h, w), short_max / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


def resize_pair(image, label, size: tuple[int, int]):
    h, w = size
    image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    if label is not None:
        label = cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST)
    return image, label


def random_resize(image, label, rng: np.random.Generator, scale, ratio_range=(0.5, 2.0)):
    """Keep-ratio resize to ``scale × ratio``; ``scale=None`` keeps the native size × ratio."""
    if scale is None:
        scale = image.shape[:2]
    ratio = rng.random() * (ratio_range[1] - ratio_range[0]) + ratio_range[0]
    target = (int(scale[0] * ratio), int(scale[1] * ratio))
    return resize_pair(image, label, rescale_size(*image.shape[:2], target))


def random_crop(image, label, rng, crop: int, cat_max_ratio=0.75, ignore_index=IGNORE_INDEX):
    """mmseg RandomCrop: up to 10 tries to find a crop where no class covers ≥ cat_max_ratio."""

    def bbox():
        mh, mw = max(image.shape[0] - crop, 0), max(image.shape[1] - crop, 0)
        y, x = int(rng.integers(0, mh + 1)), int(rng.integers(0, mw + 1))
        return y, x

    y, x = bbox()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            patch = label[y : y + crop, x : x + crop]
            ids, cnt = np.unique(patch, return_counts=True)
            cnt = cnt[ids != ignore_index]
            if len(cnt) > 1 and cnt.max() / cnt.sum() < cat_max_ratio:
                break
            y, x = bbox()
    return image[y : y + crop, x : x + crop], label[y : y + crop, x : x + crop]


def random_flip(image, label, rng, prob=0.5):
    if rng.random() < prob:
        return image[:, ::-1], label[:, ::-1]
    return image, label


def _convert(img, alpha=1.0, beta=0.0):
    return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(image, rng, brightness_delta=32, contrast=(0.5, 1.5),
                           saturation=(0.5, 1.5), hue_delta=18):
    """mmseg PhotoMetricDistortion: each step with p=0.5, contrast before or after the HSV steps."""
    img = np.ascontiguousarray(image)
    if rng.integers(2):
        img = _convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    mode = int(rng.integers(2))
    if mode == 1 and rng.integers(2):
        img = _convert(img, alpha=rng.uniform(*contrast))
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation))
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        shift = int(rng.integers(-hue_delta, hue_delta))
        hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + shift) % 180).astype(np.uint8)
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if mode == 0 and rng.integers(2):
        img = _convert(img, alpha=rng.uniform(*contrast))
    return img


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """H×W×3 uint8 RGB → 3×H×W float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)


@dataclass(frozen=True)
class TrainTransform:
    """``scale=None``: no img_scale, the random resize starts from the image's own size (the toy
    world, whose object sizes are in pixels)."""

    scale: tuple[int, int] | None = (2048, 512)
    crop_size: int = 512
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    pad_value: tuple[float, float, float] = IMAGENET_MEAN
    ignore_index: int = IGNORE_INDEX

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        image, label = random_resize(image, label, rng, self.scale, self.ratio_range)
        image, label = random_crop(image, label, rng, self.crop_size, self.cat_max_ratio,
                                   self.ignore_index)
        image, label = random_flip(image, label, rng, self.flip_prob)
        if self.photometric:
            image = photometric_distortion(image, rng)
        img_t = to_tensor(image)
        c = self.crop_size
        out_img = torch.tensor(self.pad_value, dtype=torch.float32).view(3, 1, 1).repeat(1, c, c)
        out_lbl = torch.full((c, c), self.ignore_index, dtype=torch.long)
        h, w = label.shape
        out_img[:, :h, :w] = img_t
        out_lbl[:h, :w] = torch.from_numpy(np.ascontiguousarray(label)).long()
        return out_img, out_lbl


@dataclass(frozen=True)
class EvalTransform:
    """Whole-image, single-scale: keep-ratio resize to ``scale`` (mmcv rule), label untouched;
    ``scale=None`` keeps the native size.  ``upscale=False`` never enlarges an image (folder datasets:
    small images keep the size their training used)."""

    scale: tuple[int, int] | None = (2048, 512)
    upscale: bool = True

    def __call__(self, image: np.ndarray, label: np.ndarray):
        size = image.shape[:2] if self.scale is None else rescale_size(*image.shape[:2], self.scale)
        if not self.upscale and size[0] * size[1] > image.shape[0] * image.shape[1]:
            size = image.shape[:2]
        image, _ = resize_pair(image, None, size)
        return to_tensor(image), torch.from_numpy(label.astype(np.int64))
