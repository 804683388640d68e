"""Pools of training images' frozen dense features for GPR's branch: the one from which the global-only phase of
``--gpr-select views`` draws its minibatches (``--gpr-pool``, H-GPR6: docs/history/gpr-adapter-study.md), and the
one on which ``--gpr-fit`` fits GPR's reading of the features after training (H-GPR7, ``fit_gpr_stage``).

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
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Callable, Iterable

import torch

from mvpseg.gpr_floor import GPRFloor
from mvpseg.gpr_shifts import shifted_features
from mvpseg.learning import GPRFitSettings, calibrate_shifted_gpr, fit_gpr
from mvpseg.losses import presence_targets

from .data import TrainStream, train_loader
from .distributed import average_gradients

if TYPE_CHECKING:
    from .distributed import DistContext
    from .recipe import TrainConfig

log = logging.getLogger("mvpseg.train")

# seed offsets of the pools' streams (training.data.TrainStream), apart from training's and the calibration's
GPR_POOL_SEED_OFFSET = 7919
GPR_FIT_SEED_OFFSET = 7927
GPR_SHIFT_SEED_OFFSET = 7933
# images whose shifted copies recalibrate τ2 and β for --gpr-shifts (two scalars: a few hundred images suffice)
GPR_SHIFT_CALIBRATION_IMAGES = 500


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


def presence_pool(cfg: TrainConfig, data, transform, fresh: bool,
                  features: Callable[[Iterable], Iterable[tuple[torch.Tensor, torch.Tensor]]],
                  ctx: DistContext, num_classes: int, size: int, seed_offset: int, what: str,
                  num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's share of ``size`` training images (their own stream, ``seed_offset``): (whatever
    ``features`` gives per image — dense features n×D×h×w, or n×S×D×h×w for shifted copies — and presence
    n×C of the ``num_classes`` classes the labels index). Only presence is kept of the labels."""
    t = time.perf_counter()
    share = math.ceil(size / ctx.world_size)
    src = TrainStream(data, transform, cfg.global_batch, math.ceil(size / cfg.global_batch),
                      cfg.seed + seed_offset, ctx.rank, ctx.world_size, fresh=fresh)
    feats, present, n = [], [], 0
    for f, y in features(train_loader(src, num_workers=num_workers)):
        feats.append(f.detach())
        present.append(presence_targets(y, num_classes).to(torch.uint8))
        n += f.shape[0]
        if n >= share:
            break
    if not feats:
        raise ValueError(f"the {what} pool received no training images")
    log.info("%s pool: %d training images (%.1f s)", what, min(n, share) * ctx.world_size, time.perf_counter() - t)
    return torch.cat(feats)[:share], torch.cat(present)[:share]


def fit_for_dataset(cfg: TrainConfig, distinct_images: int, fresh: bool) -> TrainConfig:
    """The recipe's GPR fit (and its shifts and floor) only where the training set holds at least ``gpr_fit``
    distinct images (``fresh``: procedural, unbounded): on 6,000 crops of 400 scenes φ learned those scenes'
    presence and lost up to 2.8 mIoU(U) (H-GPR9's addendum). Asked for on the command line, they stay."""
    if not cfg.gpr_fit_auto or fresh or distinct_images >= cfg.gpr_fit:
        return cfg
    shifts = 1 if cfg.gpr_shifts_auto else cfg.gpr_shifts
    # the floor bounds what is refitted: it stays only if asked for and something (the shifts) is still refitted
    floor = cfg.gpr_floor if not cfg.gpr_floor_auto and shifts > 1 else None
    log.info("the recipe's GPR fit needs %d distinct training images and this training set has %d: no fit%s%s "
             "(--gpr-fit N runs one anyway)", cfg.gpr_fit, distinct_images,
             ", no shifts" if cfg.gpr_shifts_auto else "",
             ", no floor" if cfg.gpr_floor is not None and floor is None else "")
    return replace(cfg, gpr_fit=0, gpr_fit_auto=False, gpr_shifts=shifts, gpr_shifts_auto=False, gpr_floor=floor,
                   gpr_floor_auto=False)


def fit_gpr_stage(cfg: TrainConfig, clip, model, prompts, seen_vocab: tuple[str, ...], data, transform,
                  fresh: bool, amp, ctx: DistContext, num_workers: int = 0) -> dict:
    """After training, the learned prompts fixed, on the presence of every seen class (the held-out ones too:
    selection is over): ``--gpr-fit`` fits a new GPR adapter, τ2 and β on ``cfg.gpr_fit`` training images
    (``mvpseg.learning.fit_gpr``, H-GPR7); then ``--gpr-shifts`` K > 1 refits τ2 and β alone on the average over
    K × K shifted copies of ``GPR_SHIFT_CALIBRATION_IMAGES`` images (``calibrate_shifted_gpr``, H-GPR8); then
    ``--gpr-floor`` M keeps the refitted logits at most M below the prompts' own reading before all this
    (``mvpseg.gpr_floor``, H-GPR10).
    Deterministic in (seed, rank): a resumed run refits identically. Returns its record for the checkpoint."""
    t = time.perf_counter()
    reduce = lambda ps: average_gradients(ps, ctx)  # noqa: E731
    with torch.no_grad():
        glob = prompts.encode_global(clip, seen_vocab).float()

    def encoded(encode):
        """(images, labels) batches → (encode(normalised images), labels); the labels index the seen vocabulary,
        held-out classes included."""
        def batches_of(loader):
            for images, labels in loader:
                with amp(), torch.no_grad():
                    feats = encode(clip.normalize(images.to(ctx.device, non_blocking=True)))
                yield feats, labels.to(ctx.device, non_blocking=True)
        return batches_of

    record: dict = {}
    own = float(prompts.tau2()), float(prompts.gpr_bias())  # the prompts' own reading, which the floor keeps
    if cfg.gpr_fit:
        feats, present = presence_pool(cfg, data, transform, fresh, encoded(model.image_features), ctx, len(seen_vocab),
                                       cfg.gpr_fit, GPR_FIT_SEED_OFFSET, "GPR fit", num_workers)
        settings = GPRFitSettings(width=cfg.gpr_fit_width, steps=cfg.gpr_fit_steps, gamma=cfg.gamma, seed=cfg.seed)
        losses = fit_gpr(prompts, glob, feats, present, settings, reduce_grads=reduce, rank=ctx.rank)
        del feats
        log.info("GPR fit: adapter width %d, %d steps on %d images; BCE %.4f → %.4f, τ2 %.4f, β %.2f (%.1f s)",
                 settings.width, settings.steps, cfg.gpr_fit, losses[0], losses[-1], float(prompts.tau2()),
                 float(prompts.gpr_bias()), time.perf_counter() - t)
        record.update({"images": cfg.gpr_fit, **asdict(settings), "loss_first": losses[0], "loss_last": losses[-1]})
    if cfg.gpr_shifts > 1:
        t = time.perf_counter()
        shifted = encoded(lambda x: torch.stack(shifted_features(clip, x, cfg.gpr_shifts), dim=1))  # n×S×D×h×w
        feats, present = presence_pool(cfg, data, transform, fresh, shifted, ctx, len(seen_vocab),
                                       GPR_SHIFT_CALIBRATION_IMAGES, GPR_SHIFT_SEED_OFFSET, "GPR shift calibration",
                                       num_workers)
        losses = calibrate_shifted_gpr(prompts, glob, feats, present, gamma=cfg.gamma, seed=cfg.seed,
                                       reduce_grads=reduce, rank=ctx.rank)
        log.info("GPR over %d × %d shifts: τ2 and β recalibrated on %d images, BCE %.4f → %.4f, τ2 %.4f, β %.2f "
                 "(%.1f s)", cfg.gpr_shifts, cfg.gpr_shifts, GPR_SHIFT_CALIBRATION_IMAGES, losses[0], losses[-1],
                 float(prompts.tau2()), float(prompts.gpr_bias()), time.perf_counter() - t)
        record["shifts"] = {"k": cfg.gpr_shifts, "images": GPR_SHIFT_CALIBRATION_IMAGES, "loss_first": losses[0],
                            "loss_last": losses[-1]}
    if cfg.gpr_floor is not None:
        prompts.set_gpr_floor(GPRFloor(own[0], own[1], cfg.gpr_floor))
        record["floor"] = prompts.gpr_floor().record()
        log.info("GPR floor: the refitted logits stay at most %.2f below the own reading (τ2 %.4f, β %.2f)",
                 cfg.gpr_floor, *own)
    record.update({"tau2": float(prompts.tau2()), "bias": float(prompts.gpr_bias())})
    return record
