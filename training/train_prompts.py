"""MVP-SEG prompt learning (paper Sec. 3.2 / 4.3) on seen classes only.

Single process (CPU or one GPU)::

    python -m training.train_prompts --dataset voc --data-root data/VOCdevkit/VOC2012 --out runs/voc

Several GPUs (or CPU processes, gloo) with the same global batch::

    torchrun --nproc_per_node 4 -m training.train_prompts --dataset voc ... --global-batch 8

Per step the frozen image tower runs once under ``no_grad`` for the local batch, the text tower runs
forward/backward once for all (k+1)·C prompts of the seen vocabulary, gradients of the prompt vectors
and temperatures are averaged over processes, and the optimiser steps.  ``--variant`` selects a row of
Table 1; ``--n-seg`` sweeps the prompt count of Fig. 3.  ``--recipe`` picks the defaults of the learning
recipe: ``default`` (AdamW, constant lr, λ_OC = 1 on the mean-reduced OCLoss, fresh samples where the
dataset is procedural, model selection on held-out seen classes with early stopping; docs/recipe.md says
why, with the measurements) or ``paper`` (sec. 4.3: SGD 2e-4, 1k warm-up, poly, 8k iterations, λ3 = 100
on Eq. 5's sum, the final iterate); any option given explicitly overrides its recipe.  Training state is checkpointed atomically every
``--ckpt-every`` iterations; ``--resume`` continues from the latest one and reproduces the
uninterrupted run exactly (data order and augmentation are functions of (seed, position), see
``training/data.py``).  The final prompts are written as ``<out>/prompts.safetensors`` + ``.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mvpseg.checkpoint import save_prompts
from mvpseg.clip_backbone import load_clip
from mvpseg.losses import LossWeights
from mvpseg.model import MVPSeg
from mvpseg.prompts import LearnedPrompts

from .checkpointing import CheckpointManager, restore_state
from .cli import add_clip_args, add_data_args, add_runtime_args, amp_dtype, apply_runtime, clip_spec
from .data import TrainStream, train_loader
from .datasets import build_dataset, get_profile
from .distributed import (DistContext, all_reduce_sum, average_gradients, barrier,
                          distributed_session, rng_state, seed_everything)
from .runlog import JsonlLogger, Progress
from .schedule import LRSchedule
from .selection import (SELECT_MODES, BestTracker, IndexView, ValidationSet, choose_holdout,
                        validation_indices)
from .shared_prefix import SharedPrefixEncoder, supports_shared_prefix

log = logging.getLogger("mvpseg.train")

# Table 1 rows: (k segmentation prompts, global prompt / GPR, OCLoss on).  λ_cls only acts with GPR;
# λ_OC's value comes from the recipe.
VARIANTS = {
    "single": dict(n_seg=1, use_global=False, oc=False),
    "multi": dict(n_seg=3, use_global=False, oc=False),
    "multi-oc": dict(n_seg=3, use_global=False, oc=True),
    "mvpseg": dict(n_seg=3, use_global=True, oc=True),
}
# Learning recipes: defaults of the options below (an option given on the command line wins).
# lambda_oc "paper" = λ3 = 100 on Eq. 5's sum, i.e. LossWeights.paper(k).oc on the mean over pairs.
RECIPES = {
    "default": dict(optimizer="adamw", lr=2e-3, lr_policy="constant", warmup_iters=0, max_iters=500,
                    global_batch=4, weight_decay=5e-4, lambda_oc=1.0, select="holdout", fresh="auto",
                    seg_reduction="pixel", init_fit=200, lambda_prior=8.0),
    "paper": dict(optimizer="sgd", lr=2e-4, lr_policy="poly", warmup_iters=1000, max_iters=8000,
                  global_batch=8, weight_decay=5e-4, lambda_oc="paper", select="none", fresh="off",
                  seg_reduction="pixel", init_fit=0, lambda_prior=0.0),
}
OPTIMIZERS = ("sgd", "adamw")  # sgd: the paper's; adamw: an extension (build_optimizer)
# Settings a resumed run must share with its checkpoint.
RESUME_KEYS = ("dataset", "split", "n_seg", "n_ctx", "use_global", "gamma", "lambda_seg", "text_encoder",
               "lambda_cls", "lambda_oc", "cls_mode", "optimizer", "lr", "momentum", "weight_decay",
               "warmup_iters", "warmup_ratio", "lr_policy", "max_iters", "global_batch", "seed",
               "crop_size", "train_scale", "clip", "pretrained", "select", "holdout_frac", "val_images",
               "val_every", "patience", "fresh", "lambda_prior", "tau1_init", "seg_reduction", "init_fit")
# What states written before these settings existed implicitly used.
LEGACY_DEFAULTS = {"optimizer": "sgd", "select": "none", "holdout_frac": 0.25, "val_images": 64,
                   "val_every": 50, "patience": 4, "fresh": "off", "lambda_prior": 0.0, "tau1_init": None,
                   "seg_reduction": "pixel", "init_fit": 0}


@dataclass(frozen=True)
class TrainConfig:
    dataset: str
    data_root: str
    out: str
    split: str | None = None
    variant: str = "mvpseg"
    n_seg: int = 3
    n_ctx: int = 32
    use_global: bool = True
    gamma: float = 10.0
    lambda_seg: float = 1.0
    lambda_cls: float = 3.0
    lambda_oc: float = 1.0
    cls_mode: str = "bce"
    optimizer: str = "adamw"
    lr: float = 2e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_iters: int = 0
    warmup_ratio: float = 1e-3
    lr_policy: str = "constant"
    max_iters: int = 500
    global_batch: int = 4
    seed: int = 0
    recipe: str = "default"
    select: str = "holdout"  # model selection: holdout | seen | none (selection.py)
    holdout_frac: float = 0.25
    val_images: int = 64
    val_every: int = 50
    patience: int = 4
    fresh: str = "auto"  # auto | on | off: fresh samples from a procedural dataset (auto: when it is one)
    lambda_prior: float = 8.0  # pull of the mean view towards the 85-template embeddings (KgCoOp-style)
    tau1_init: float | None = None  # None: 100/k
    seg_reduction: str = "pixel"  # L_seg: mean over pixels (paper) | over classes (mvpseg.losses.seg_loss)
    init_fit: int = 200  # text-only steps fitting every view to the 85-template embeddings before training
    crop_size: int | None = None
    train_scale: tuple[int, int] | None = None
    ckpt_every: int = 500
    keep_ckpts: int = 2
    text_checkpointing: bool = False
    text_encoder: str = "shared-prefix"
    skip_missing: bool = False
    clip: str = "RN50"
    pretrained: str | None = "openai"

    @property
    def loss_weights(self) -> LossWeights:
        return LossWeights(seg=self.lambda_seg, cls=self.lambda_cls if self.use_global else 0.0,
                           oc=self.lambda_oc)

    @property
    def schedule(self) -> LRSchedule:
        return LRSchedule(self.lr, self.max_iters, self.warmup_iters, self.warmup_ratio,
                          self.lr_policy)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p, "run folder (checkpoints, log.jsonl, prompts)")
    p.add_argument("--variant", default="mvpseg", choices=sorted(VARIANTS),
                   help="Table 1 row: single | multi | multi-oc | mvpseg (multi-oc + GPR)")
    p.add_argument("--n-seg", type=int, default=None, help="k segmentation prompts (Fig. 3 sweep)")
    p.add_argument("--no-global", action="store_true", help="drop the global prompt / GPR")
    p.add_argument("--n-ctx", type=int, default=32)
    p.add_argument("--gamma", type=float, default=10.0)
    p.add_argument("--lambda-seg", type=float, default=1.0)
    p.add_argument("--lambda-cls", type=float, default=3.0)
    p.add_argument("--lambda-oc", type=float, default=None,
                   help="weight of the mean-over-pairs OCLoss (default: the recipe's; 0 without OCLoss)")
    p.add_argument("--lambda-prior", type=float, default=None,
                   help="pull of each class's mean view embedding towards its 85-template embedding "
                        "(KgCoOp-style, 0 = off; docs/recipe.md)")
    p.add_argument("--tau1-init", type=float, default=None, help="initial τ1 (default 100/k)")
    p.add_argument("--init-fit", type=int, default=None,
                   help="text-only AdamW steps that first fit every prompt's class embeddings to the 85-template "
                        "ones (a handcrafted starting point for 32 context tokens; 0 = random start)")
    p.add_argument("--seg-reduction", default=None, choices=["pixel", "class"],
                   help="L_seg mean over labelled pixels (paper) or over the classes present (mIoU's weighting)")
    p.add_argument("--cls-loss", dest="cls_mode", default="bce", choices=["bce", "paper"])
    p.add_argument("--recipe", default="default", choices=sorted(RECIPES),
                   help="defaults of the learning recipe: default (docs/recipe.md) | paper (sec. 4.3)")
    p.add_argument("--optimizer", default=None, choices=list(OPTIMIZERS),
                   help="sgd: the paper's (momentum SGD); adamw: per-coordinate steps (the default recipe)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (adamw: unused)")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--warmup-iters", type=int, default=None)
    p.add_argument("--warmup-ratio", type=float, default=1e-3)
    p.add_argument("--lr-policy", default=None, choices=["poly", "constant"])
    p.add_argument("--max-iters", type=int, default=None)
    p.add_argument("--global-batch", type=int, default=None, help="images per step over all processes")
    g = p.add_argument_group("model selection (never on unseen classes; training/selection.py)")
    g.add_argument("--select", default=None, choices=list(SELECT_MODES),
                   help="holdout: hIoU of trained vs held-out *seen* classes on held-out images; seen: mIoU "
                        "over seen classes; none: keep the final iterate")
    g.add_argument("--holdout-frac", type=float, default=0.25,
                   help="share of seen classes held out of training for --select holdout")
    g.add_argument("--val-images", type=int, default=64,
                   help="validation images taken out of the training split (at most a fifth of it)")
    g.add_argument("--val-every", type=int, default=50, help="iterations between validations")
    g.add_argument("--patience", type=int, default=4,
                   help="stop after this many validations without improvement (0: never stop early)")
    g.add_argument("--fresh", default=None, choices=["auto", "on", "off"],
                   help="draw a new sample every time from a procedural dataset (auto: when it is one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crop-size", type=int, default=None, help="default: the dataset profile's "
                   "(512; 480 for Context; 128 × zoom for toyworld)")
    p.add_argument("--train-scale", type=int, nargs=2, default=None, metavar=("LONG", "SHORT"))
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--keep-ckpts", type=int, default=2)
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from the latest checkpoint in --out (or from the given state file)")
    p.add_argument("--text-checkpointing", action="store_true",
                   help="activation checkpointing in the text transformer (large vocabularies)")
    p.add_argument("--text-encoder", default="shared-prefix", choices=["shared-prefix", "plain"],
                   help="shared-prefix: encode the class-independent context once per prompt "
                        "(exact, training/shared_prefix.py); plain: mvpseg's truncated encoder")
    p.add_argument("--skip-missing", action="store_true",
                   help="drop (and count) samples whose files are missing instead of failing")
    p.add_argument("--simulate-kill-at", type=int, default=None, help=argparse.SUPPRESS)
    add_clip_args(p)
    add_runtime_args(p)
    return p


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    v, r = VARIANTS[a.variant], RECIPES[a.recipe]

    def pick(name):  # explicit option, else the recipe's default
        value = getattr(a, name)
        return r[name] if value is None else value

    n_seg = a.n_seg if a.n_seg is not None else v["n_seg"]
    lambda_oc = a.lambda_oc
    if lambda_oc is None:
        lambda_oc = 0.0 if not v["oc"] else (LossWeights.paper(n_seg).oc if r["lambda_oc"] == "paper"
                                             else float(r["lambda_oc"]))
    return TrainConfig(
        dataset=get_profile(a.dataset).name, data_root=str(a.data_root), out=str(a.out),
        split=a.split, variant=a.variant, n_seg=n_seg, n_ctx=a.n_ctx,
        use_global=v["use_global"] and not a.no_global, gamma=a.gamma, lambda_seg=a.lambda_seg,
        lambda_cls=a.lambda_cls, lambda_oc=lambda_oc, cls_mode=a.cls_mode, optimizer=pick("optimizer"),
        lr=pick("lr"), momentum=a.momentum, weight_decay=pick("weight_decay"),
        warmup_iters=pick("warmup_iters"), warmup_ratio=a.warmup_ratio, lr_policy=pick("lr_policy"),
        max_iters=pick("max_iters"), global_batch=pick("global_batch"), seed=a.seed, crop_size=a.crop_size,
        train_scale=tuple(a.train_scale) if a.train_scale else None, ckpt_every=a.ckpt_every,
        keep_ckpts=a.keep_ckpts, text_checkpointing=a.text_checkpointing, text_encoder=a.text_encoder,
        skip_missing=a.skip_missing, clip=a.clip, pretrained=a.pretrained, recipe=a.recipe,
        select=pick("select"), holdout_frac=a.holdout_frac, val_images=a.val_images, val_every=a.val_every,
        patience=a.patience, fresh=pick("fresh"),
        lambda_prior=pick("lambda_prior"), tau1_init=a.tau1_init, seg_reduction=pick("seg_reduction"),
        init_fit=pick("init_fit"),
    )


def _config_record(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d["train_scale"] = list(cfg.train_scale) if cfg.train_scale else None
    return d


def build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """The paper's momentum SGD, or AdamW (decoupled weight decay, default betas; an extension).
    AdamW's steps are ≈ lr per coordinate whatever the gradient's scale, while SGD's first steps follow
    the largest term, λ_OC · L_OC (≈ 50 of a total ≈ 60 at random initialisation in the toy world).
    In the toy world's 150-iteration runs SGD moved τ1 from 33 to ≈ 7, AdamW to 27–31 (docs/toyworld.md,
    attempt 6)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose one of {OPTIMIZERS}")


def seg_loss_weight(labels: torch.Tensor, ctx: DistContext, ignore_index: int = 255) -> float:
    """Per-process factor that turns the local per-pixel mean into the global-batch mean:
    (local labelled pixels · world) / global labelled pixels, so W processes match one process."""
    if not ctx.distributed:
        return 1.0
    n_local = (labels != ignore_index).sum().double().reshape(1)
    n_global = float(all_reduce_sum(n_local.to(ctx.device if ctx.backend == "nccl" else "cpu"),
                                    ctx).item())
    return float(n_local.item()) * ctx.world_size / n_global if n_global > 0 else 1.0


def _training_data(cfg: TrainConfig, clip):
    """(stream dataset, full seen dataset, validation indices, fresh?) — validation images never trained on."""
    data = build_dataset(cfg.dataset, cfg.data_root, cfg.split, label_space="seen", train=True,
                         on_missing="skip" if cfg.skip_missing else "error")
    procedural = bool(getattr(data, "procedural", False))
    if cfg.fresh == "on" and not procedural:
        raise SystemExit(f"--fresh on: {data} is not procedural (it cannot render new samples)")
    fresh = cfg.fresh == "on" or (cfg.fresh == "auto" and procedural)
    if fresh:
        data = data.unbounded()
    n_val = cfg.val_images if cfg.select != "none" else 0
    val_idx, train_idx = validation_indices(data, n_val, cfg.seed, fresh)
    stream_data = data if train_idx is None else IndexView(data, train_idx)
    return stream_data, data, val_idx, fresh


def _prior_targets(clip, vocab: tuple[str, ...], device) -> torch.Tensor:
    """C×D unit 85-template embeddings of the training vocabulary (the KgCoOp-style anchor)."""
    from mvpseg.handcrafted import TemplatePrompts

    with torch.no_grad():
        return TemplatePrompts.maskclip85().to(device).encode(clip, vocab).seg[0].float()


def fit_to_templates(prompts: LearnedPrompts, clip, encoder, vocab: tuple[str, ...], targets: torch.Tensor,
                     steps: int, lr: float) -> float:
    """Text-only warm start: AdamW on mean_{views, classes} (1 − cos(e^i_c, t_c)) for every prompt (global one
    included), t = the 85-template embeddings; returns the final mean cosine. Its own optimiser, so the
    training optimiser's state starts clean."""
    opt = torch.optim.AdamW([prompts.ctx], lr=lr, weight_decay=0.0)
    cos = torch.zeros(())
    for _ in range(steps):
        text = encoder.encode(prompts, vocab) if encoder else prompts.encode(clip, vocab)
        views = text.seg if text.glob is None else torch.cat([text.glob[None], text.seg])
        cos = (views.float() * targets[None]).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        (1.0 - cos).backward()
        opt.step()
    return float(cos.detach())


def train(cfg: TrainConfig, args: argparse.Namespace, ctx: DistContext) -> Path:
    out = Path(cfg.out)
    ckpts = CheckpointManager(out / "checkpoints", keep=cfg.keep_ckpts)
    resume_path = ckpts.resolve(args.resume)
    if args.resume is None and ckpts.latest() is not None:
        raise SystemExit(f"{out} already holds training checkpoints: pass --resume to continue "
                         "or choose a new --out")
    seed_everything(cfg.seed)  # identical prompt initialisation on every process
    clip = load_clip(clip_spec(args), ctx.device)
    clip.set_text_checkpointing(cfg.text_checkpointing)
    prompts = LearnedPrompts(clip.text_width, n_seg=cfg.n_seg, n_ctx=cfg.n_ctx, use_global=cfg.use_global,
                             tau1_init=cfg.tau1_init).to(ctx.device)
    model = MVPSeg(clip, prompts, gamma=cfg.gamma)
    encoder = None
    if cfg.text_encoder == "shared-prefix":
        if supports_shared_prefix(clip):
            encoder = SharedPrefixEncoder(clip, activation_checkpointing=cfg.text_checkpointing)
        else:
            log.warning("%s: no shared-prefix encoding for this text tower; using the plain encoder",
                        clip.spec.describe())
    params = model.trainable_parameters()
    opt = build_optimizer(cfg, params)
    dtype = amp_dtype(args.amp, ctx.device.type)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    tracker = BestTracker(patience=cfg.patience)

    start = 0 if resume_path is None else restore_state(
        resume_path, _config_record(cfg), RESUME_KEYS, {"prompts": prompts}, opt, scaler,
        cfg.schedule.state_dict(), defaults=LEGACY_DEFAULTS, optional={"selection": tracker})

    profile = get_profile(cfg.dataset)
    stream_data, data, val_idx, fresh = _training_data(cfg, clip)
    seen_vocab = tuple(data.prompt_names)  # seen classes only: unseen names never reach the text tower
    holdout = choose_holdout(seen_vocab, cfg.holdout_frac if cfg.select == "holdout" else 0.0, cfg.seed)
    vocab = holdout.train_vocabulary  # held-out seen classes are validation-only
    validation = None
    if val_idx:
        validation = ValidationSet.build(clip, data, val_idx, profile.eval_transform(), ctx.device)
    targets = _prior_targets(clip, vocab, ctx.device) if cfg.lambda_prior > 0 or cfg.init_fit > 0 else None
    prior = targets if cfg.lambda_prior > 0 else None
    if cfg.init_fit > 0 and resume_path is None:  # every process does the same deterministic steps
        t = time.perf_counter()
        fit_cos = fit_to_templates(prompts, clip, encoder, vocab, targets, cfg.init_fit, cfg.lr)
        log.info("warm start: %d text-only steps, mean cosine to the 85-template embeddings %.3f (%.1f s)",
                 cfg.init_fit, fit_cos, time.perf_counter() - t)
    overrides = {"pad_value": tuple(clip.pixel_mean.flatten().tolist())}
    if cfg.crop_size:
        overrides["crop_size"] = cfg.crop_size
    if cfg.train_scale:
        overrides["scale"] = cfg.train_scale
    transform = profile.train_transform(data, **overrides)
    stream = TrainStream(stream_data, transform, cfg.global_batch,
                         cfg.max_iters, cfg.seed, ctx.rank, ctx.world_size, start_iter=start, fresh=fresh)
    loader = train_loader(stream, num_workers=args.num_workers)

    logger = JsonlLogger(out / "log.jsonl", enabled=ctx.is_main,
                         resume_iter=start if resume_path is not None else None)
    logger.log({"event": "resume" if resume_path else "start", "from_iter": start,
                "checkpoint": str(resume_path) if resume_path else None,
                "world_size": ctx.world_size, "device": str(ctx.device),
                "dataset_size": None if fresh else len(stream_data), "fresh_samples": fresh,
                "skipped_missing": getattr(data, "skipped", 0), "crop_size": transform.crop_size,
                "vocabulary": list(vocab), "held_out_classes": [seen_vocab[i] for i in holdout.held_out],
                "validation_images": len(val_idx), "config": _config_record(cfg)})
    if ctx.is_main:
        log.info("%s | %d training classes (%d seen held out for selection) | %d prompts per step | "
                 "%s samples | %d validation images | world %d", data, len(vocab), len(holdout.held_out),
                 len(vocab) * (cfg.n_seg + int(cfg.use_global)), "fresh" if fresh else "fixed-pool",
                 len(val_idx), ctx.world_size)
    if validation is not None and ctx.is_main and resume_path is None:
        # what the learned prompts have to beat, on the same images and classes (logged, never selected on)
        from mvpseg.handcrafted import TemplatePrompts

        ref = validation.score(model, seen_vocab, holdout, cfg.select, TemplatePrompts.maskclip85().to(ctx.device))
        logger.log({"event": "validation_reference", "prompts": "maskclip-85", **ref})
        log.info("validation reference (85 templates): trained classes %.1f, held-out %.1f, score %.2f",
                 ref["miou_trained"], ref["miou_held_out"], ref["score"])
    bar = Progress(cfg.max_iters, start, enabled=ctx.is_main and not args.no_progress)
    weights, sched = cfg.loss_weights, cfg.schedule

    def save_state(iteration: int) -> None:
        if ctx.is_main:
            ckpts.save(iteration, {
                "prompts": {k: v.detach().cpu() for k, v in prompts.state_dict().items()},
                "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                "scheduler": sched.state_dict(), "rng": rng_state(),
                "config": _config_record(cfg), "selection": tracker.state_dict(),
            })
        barrier(ctx)

    def validate(iteration: int) -> bool:
        result = validation.score(model, seen_vocab, holdout, cfg.select)
        stop = tracker.update(iteration, result, prompts)
        logger.log({"event": "validation", "iter": iteration, **result, "best_iter": tracker.best_iter})
        return stop

    it = start
    if validation is not None and start == 0 and cfg.init_fit > 0:
        validate(0)  # the warm start itself is a candidate: learning must beat it on held-out classes
    stopped = tracker.should_stop
    for images, labels in ([] if stopped else loader):
        t0 = time.perf_counter()
        lr = sched.apply(opt, it)
        images = clip.normalize(images.to(ctx.device, non_blocking=True))
        labels = holdout.to_training_labels(labels.to(ctx.device, non_blocking=True))
        amp = (torch.autocast(ctx.device.type, dtype=dtype) if dtype is not None
               else contextlib.nullcontext())
        with amp:
            with torch.no_grad():
                feats = model.image_features(images)  # frozen image tower, once per batch
            # one text-tower pass for all (k+1)·C prompts (gradients flow into the prompt vectors)
            text = encoder.encode(prompts, vocab) if encoder else model.text_features(vocab)
            outputs = model.head(feats, text)
        losses = model.losses(outputs, labels, weights, cfg.cls_mode, seg_reduction=cfg.seg_reduction)
        # pixel mean: rescaled to the global batch's; class mean: each process's, averaged over processes
        w_seg = seg_loss_weight(labels, ctx) if cfg.seg_reduction == "pixel" else 1.0
        total = losses["total"] + (w_seg - 1.0) * weights.seg * losses["seg"]
        if prior is not None:
            # mean view embedding of each class vs its 85-template embedding: 1 − cos, averaged over classes
            mean_view = torch.nn.functional.normalize(text.seg.float().mean(0), dim=-1)
            l_prior = (1.0 - (mean_view * prior).sum(-1)).mean()
            total = total + cfg.lambda_prior * l_prior
        opt.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        average_gradients(params, ctx)
        scaler.step(opt)
        scaler.update()
        it += 1

        terms = torch.stack([losses[k].detach().float() for k in ("total", "seg", "cls", "oc")])
        terms = all_reduce_sum(terms, ctx) / ctx.world_size
        ips = bar.update(images.shape[0] * ctx.world_size,
                         **dict(zip(("loss", "seg", "cls", "oc"), terms.tolist())), lr=lr)
        tau2 = prompts.tau2()
        logger.log({"iter": it, "lr": lr, **dict(zip(("loss", "seg", "cls", "oc"), terms.tolist())),
                    "tau1": float(prompts.tau1().detach()),
                    "tau2": None if tau2 is None else float(tau2.detach()),
                    "img_per_s": ips, "step_s": time.perf_counter() - t0})
        if validation is not None and (it % cfg.val_every == 0 or it == cfg.max_iters):
            stopped = validate(it)
        if it % cfg.ckpt_every == 0 or it == cfg.max_iters or stopped:
            save_state(it)
        if args.simulate_kill_at is not None and it == args.simulate_kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection for the resume test
        if stopped:
            log.info("early stop at iteration %d: no better validation for %d checks (best: iteration %d, "
                     "score %.2f)", it, cfg.patience, tracker.best_iter, tracker.best_score)
            break
    bar.close()

    if tracker.best_state is not None:  # the validated best, not the last iterate
        prompts.load_state_dict(tracker.best_state)
    final = out / "prompts.safetensors"
    if ctx.is_main:
        selection = None if validation is None else {
            "mode": cfg.select, "held_out_classes": [seen_vocab[i] for i in holdout.held_out],
            "validation_images": len(val_idx), "best_iter": tracker.best_iter, "best_score": tracker.best_score,
            "stopped_early_at": it if tracker.should_stop else None, "history": tracker.history}
        save_prompts(final, prompts, clip, gamma=cfg.gamma, training_classes=vocab,
                     extra={"train_config": _config_record(cfg), "iterations": it,
                            "world_size": ctx.world_size, "selection": selection})
        logger.log({"event": "done", "iter": it, "prompts": str(final),
                    "best_iter": tracker.best_iter if validation is not None else None})
        log.info("wrote %s%s", final, "" if validation is None else
                 f" (prompts of iteration {tracker.best_iter}, validation score {tracker.best_score:.2f})")
    barrier(ctx)
    return final


def main(argv=None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    if cfg.n_seg < 1:
        raise SystemExit("--n-seg must be >= 1")
    apply_runtime(args)
    with distributed_session(args.device) as ctx:
        return train(cfg, args, ctx)


if __name__ == "__main__":
    main()
