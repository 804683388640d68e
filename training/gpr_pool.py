"""A fixed pool of training images' frozen dense features, from which the global-only phase of ``--gpr-select views``
draws its minibatches (``--gpr-pool``, H-GPR6: docs/history/gpr-adapter-study.md).

Why a pool: the GPR adapter φ is a small network; fitted offline on one toy CLIP it ranked unseen classes better
with minibatches of tens of images (unseen ROC-AUC 0.886–0.892 with 4 images a step, 0.897–0.905 with 32; scratch,
recorded in that study; within training runs the adapter was not adopted). Fresh minibatches of 32 would cost 8×
the image tower per step; the frozen image tower's features of a pool of images are computed once and each step
reads a minibatch of them, as a linear-probe pass over cached features does. Memory: pool × D × h × w values (RN50 at 512 px:
about 2 MB per image in float16), plus the labels as bytes.

Exact resume: the pool is a function of (dataset, seed) and each step's minibatch of (seed, rank, iteration).
"""
from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Callable, Iterable

import torch

from .data import TrainStream, train_loader

if TYPE_CHECKING:
    from .distributed import DistContext
    from .recipe import TrainConfig

log = logging.getLogger("mvpseg.train")

# seed offset of the pool's stream (training.data.TrainStream), apart from training's and the calibration's
GPR_POOL_SEED_OFFSET = 7919


class FeaturePool:
    """``size`` (dense features B×D×h×w, labels B×H×W) pairs taken in order from ``batches``, kept on their
    device (labels as uint8: they index a vocabulary of < 255 classes, 255 = ignore)."""

    def __init__(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], size: int) -> None:
        if size < 1:
            raise ValueError(f"a feature pool needs size >= 1, got {size}")
        feats, labels, n = [], [], 0
        for f, y in batches:
            if int(y.max()) > 255 or int(y.min()) < 0:
                raise ValueError("pool labels must lie in 0..255")
            feats.append(f.detach())
            labels.append(y.to(torch.uint8))
            n += f.shape[0]
            if n >= size:
                break
        if not feats:
            raise ValueError("the feature pool received no images")
        self.features = torch.cat(feats)[:size]
        self.labels = torch.cat(labels)[:size]

    def __len__(self) -> int:
        return self.features.shape[0]

    def batch(self, n: int, seed: int, rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` images drawn uniformly with replacement, a function of (seed, rank, step) only: (features
        n×D×h×w, labels n×H×W int64)."""
        gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(rank)) * 1_000_033 + int(step))
        idx = torch.randint(0, len(self), (n,), generator=gen).to(self.features.device)
        return self.features[idx], self.labels[idx].long()


def gpr_feature_pool(cfg: TrainConfig, data, transform, fresh: bool,
                     features: Callable[[Iterable], Iterable[tuple[torch.Tensor, torch.Tensor]]],
                     ctx: DistContext, num_workers: int = 0) -> FeaturePool:
    """This process's share of ``cfg.gpr_pool`` training images of ``data`` (their own stream, seed-offset, with
    the training ``transform``), through the frozen image tower once: ``features`` maps a loader of (images,
    labels) to (dense features, training labels), as the training loop's batches are made."""
    t = time.perf_counter()
    src = TrainStream(data, transform, cfg.global_batch, math.ceil(cfg.gpr_pool / cfg.global_batch),
                      cfg.seed + GPR_POOL_SEED_OFFSET, ctx.rank, ctx.world_size, fresh=fresh)
    pool = FeaturePool(features(train_loader(src, num_workers=num_workers)), math.ceil(cfg.gpr_pool / ctx.world_size))
    log.info("GPR feature pool: %d training images' dense features (%.1f s)", len(pool) * ctx.world_size,
             time.perf_counter() - t)
    return pool
