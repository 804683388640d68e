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

if not __package__:  # run by path (python training/train_prompts.py): import as the package would
    import _as_script; __package__ = _as_script.PACKAGE  # noqa: E702

import argparse
import contextlib
import logging
import math
import os
import signal
import time
from pathlib import Path

from dataclasses import replace

import torch

from mvpseg.checkpoint import save_prompts
from mvpseg.clip_backbone import load_clip
from mvpseg.dense import default_dense_mode
from mvpseg.handcrafted import handcrafted_set
from mvpseg.learning import PromptLearner
from mvpseg.model import MVPSeg
from mvpseg.prompts import LearnedPrompts, prior_embedding

from .checkpointing import CheckpointManager, restore_state
from .cli import amp_dtype, apply_runtime, clip_spec, command_line
from .data import TrainStream, train_loader
from .datasets import UNREADABLE_RECORD, build_dataset, get_profile, unreadable_names
from .gpr_pool import fit_for_dataset, fit_gpr_stage, gpr_feature_pool
from .distributed import (DistContext, all_reduce_sum, average_gradients, barrier,
                          distributed_session, rng_state, seed_everything)
from .recipe import (HANDCRAFTED, LEGACY_DEFAULTS, OPTIMIZERS, RECIPES, RESUME_KEYS,  # noqa: F401 (re-exported)
                     VARIANTS, TrainConfig, _config_record, config_from_args, resume_keys)
from .recipe import build_parser as _build_parser
from .runlog import JsonlLogger, Progress
from .selection import (BestTracker, IndexView, ValidationSet, choose_holdout, prob_better, splice_global,
                        summarise, validation_indices)
from .shared_prefix import SharedPrefixEncoder, supports_shared_prefix
from .tensorboard_log import MaskSnapshot, open_tensorboard, prompt_view_rows
from .warm_start import CALIBRATION_SEED_OFFSET

log = logging.getLogger("mvpseg.train")


def build_parser() -> argparse.ArgumentParser:
    return _build_parser(__doc__)


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


def handcrafted_confusions(validation, model, seen_vocab) -> dict[str, "np.ndarray"]:
    """Per-image confusions N×C×C of every handcrafted set on the validation images (seen vocabulary), computed
    once: ``choose_prior`` picks from them and the run logs the 85 templates' score as its reference."""
    from mvpseg import baseline_prompt_sets

    sets = baseline_prompt_sets()
    return {name: validation.confusions(model, seen_vocab, sets[name].to(model.clip.device)) for name in HANDCRAFTED}


def choose_prior(cfg: TrainConfig, handcrafted: dict, holdout) -> tuple[str, dict]:
    """The handcrafted set behind the warm start and the anchor. ``--prior-prompts auto`` compares the sets'
    validation confusions (``handcrafted_confusions``; mIoU over every seen class: choosing among fixed prompts
    learns nothing from those classes) and leaves the 85 templates only for a set that beats them in ≥ the
    selection confidence of paired bootstrap resamples — which template suits a CLIP depends on its captions,
    and a world's own noise must not decide it. Without validation: the 85 templates. Returns
    (name, {set: mIoU})."""
    if cfg.prior_prompts != "auto":
        return cfg.prior_prompts, {}
    if not handcrafted:
        return HANDCRAFTED[0], {}
    scores = {name: summarise(m.sum(0), holdout, "seen")["score"] for name, m in handcrafted.items()}
    best, confidence = HANDCRAFTED[0], max(cfg.select_confidence, 0.5)
    for name in HANDCRAFTED[1:]:
        if scores[name] > scores[best] and prob_better(handcrafted[name], handcrafted[best], holdout,
                                                       "seen") >= confidence:
            best = name
    return best, scores


def train(cfg: TrainConfig, args: argparse.Namespace, ctx: DistContext) -> Path:
    out = Path(cfg.out)
    ckpts = CheckpointManager(out / "checkpoints", keep=cfg.keep_ckpts)
    resume_path = ckpts.resolve(args.resume)
    if args.resume is None and ckpts.latest() is not None:
        raise SystemExit(f"{out} already holds training checkpoints: pass --resume to continue "
                         "or choose a new --out")
    seed_everything(cfg.seed)  # identical prompt initialisation on every process
    clip = load_clip(clip_spec(args), ctx.device)
    # the resolved dense mode (None → the tower's default) enters the run config: --resume compares modes
    cfg = replace(cfg, dense=clip.dense_mode)
    legacy = {**LEGACY_DEFAULTS, "dense": default_dense_mode(clip.model.visual)}
    clip.set_text_checkpointing(cfg.text_checkpointing)
    prompts = LearnedPrompts(clip.text_width, n_seg=cfg.n_seg, n_ctx=cfg.n_ctx, use_global=cfg.use_global,
                             tau1_init=cfg.tau1_init, gpr_bias=cfg.gpr_bias, residual=cfg.residual).to(ctx.device)
    if cfg.gpr_adapter:  # its own generator: the views start and train exactly as without it
        prompts.enable_gpr_adapter(clip.embed_dim, cfg.gpr_adapter, seed=cfg.seed)
    model = MVPSeg(clip, prompts, gamma=cfg.gamma)
    encoder = None
    if cfg.text_encoder == "shared-prefix":
        if supports_shared_prefix(clip):
            encoder = SharedPrefixEncoder(clip, activation_checkpointing=cfg.text_checkpointing)
        else:
            log.warning("%s: no shared-prefix encoding for this text tower; using the plain encoder",
                        clip.spec.describe())
    dtype = amp_dtype(args.amp, ctx.device.type)

    def amp():
        return torch.autocast(ctx.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    # one learning step, the warm start and the calibration: mvpseg.learning (the demo's Learn tab runs it too);
    # DDP enters as the gradient average and L_seg's share of the global batch
    learner = PromptLearner(model, cfg.learn_recipe, encoder=encoder, scaler=scaler, amp=amp,
                            reduce_grads=lambda ps: average_gradients(ps, ctx),
                            seg_weight=lambda y: seg_loss_weight(y, ctx))
    opt = learner.opt
    # joint: one selected iterate ships. last / views: the selected views ship with the last iterate's global
    # prompt; last never stops early, views scores the views without GPR and, when their selection stops, trains
    # the global branch (global prompt, τ2, β, GPR adapter) alone to --gpr-iters without validating (its gradients
    # do not depend on the views: PromptLearner.step_global), from --max-iters on with minibatches of the
    # --gpr-pool (H-GPR6)
    global_last = cfg.use_global and cfg.gpr_select != "joint"
    views_only = cfg.use_global and cfg.gpr_select == "views"
    tracker = BestTracker(patience=0 if cfg.use_global and cfg.gpr_select == "last" else cfg.patience,
                          confidence=cfg.select_confidence)

    stream_data, data, val_idx, fresh = _training_data(cfg, clip)
    cfg = fit_for_dataset(cfg, len(stream_data), fresh)  # before resuming: checkpoints hold the effective one
    start = 0 if resume_path is None else restore_state(
        resume_path, _config_record(cfg), resume_keys(cfg), {"prompts": prompts}, opt, scaler,
        cfg.schedule.state_dict(), defaults=legacy, optional={"selection": tracker})

    profile = get_profile(cfg.dataset)
    unreadable = out / UNREADABLE_RECORD  # samples found corrupt when drawn: a resumed run skips them unread
    known_unreadable = (data.record_unreadable(unreadable)
                        if cfg.skip_missing and hasattr(data, "record_unreadable") else 0)
    seen_vocab = tuple(data.prompt_names)  # seen classes only: unseen names never reach the text tower
    holdout = choose_holdout(seen_vocab, cfg.holdout_frac if cfg.select == "holdout" else 0.0, cfg.seed)
    vocab = holdout.train_vocabulary  # held-out seen classes are validation-only
    validation = None
    if val_idx:
        validation = ValidationSet.build(clip, data, val_idx, profile.eval_transform(), ctx.device)
    uses_prior = cfg.learn_recipe.uses_prior
    handcrafted = {}
    if validation is not None and (ctx.is_main or (uses_prior and cfg.prior_prompts == "auto")):
        handcrafted = handcrafted_confusions(validation, model, seen_vocab)
    targets, prior_name, prior_set = None, None, None
    if uses_prior:
        prior_name, prior_scores = choose_prior(cfg, handcrafted, holdout)
        # one instance: it keeps its embeddings of the vocabulary for the residual form's base
        prior_set = handcrafted_set(prior_name).to(ctx.device)
        targets = prior_embedding(prior_set.encode(clip, vocab))  # C×D: the warm start's and the anchor's
        log.info("handcrafted prior: %s (validation mIoU over seen classes: %s)", prior_name,
                 ", ".join(f"{k} {v:.1f}" for k, v in prior_scores.items()) or "not compared")
    prior = targets if cfg.lambda_prior > 0 else None
    if cfg.init_fit > 0 and resume_path is None:  # every process does the same deterministic steps
        t = time.perf_counter()
        fit_cos, fit_oc = learner.warm_start(vocab, targets)
        log.info("warm start: %d text-only steps, mean cosine to the %s embeddings %.3f, OCLoss %.3f (%.1f s)",
                 cfg.init_fit, prior_name, fit_cos, fit_oc, time.perf_counter() - t)
    if cfg.residual:  # from here the classifier is the prior's exactly, plus what learning changes (resumed: ctx0 kept)
        prompts.set_prior(prior_set, rebase=resume_path is None)
    overrides = {"pad_value": tuple(clip.pixel_mean.flatten().tolist())}
    if cfg.crop_size:
        overrides["crop_size"] = cfg.crop_size
    if cfg.train_scale:
        overrides["scale"] = cfg.train_scale
    transform = profile.train_transform(data, **overrides)
    total = cfg.total_iters
    stream = TrainStream(stream_data, transform, cfg.global_batch,
                         total, cfg.seed, ctx.rank, ctx.world_size, start_iter=start, fresh=fresh)
    loader = train_loader(stream, num_workers=args.num_workers)
    sched = cfg.schedule

    def features(batches):
        """(dense features, training labels) per batch: the frozen image tower, once per batch."""
        for images, labels in batches:
            images = clip.normalize(images.to(ctx.device, non_blocking=True))
            with amp(), torch.no_grad():
                feats = model.image_features(images)
            yield feats, holdout.to_training_labels(labels.to(ctx.device, non_blocking=True))

    taus = None
    if cfg.calib_steps > 0 and resume_path is None:
        calib = TrainStream(stream_data, transform, cfg.global_batch, cfg.calib_steps,
                            cfg.seed + CALIBRATION_SEED_OFFSET, ctx.rank, ctx.world_size, fresh=fresh)
        t = time.perf_counter()
        taus = learner.calibrate(vocab, features(train_loader(calib, num_workers=args.num_workers)))
        log.info("calibrated temperatures: τ1 %.2f, τ2 %s (%d steps, %.1f s)", taus[0],
                 "-" if taus[1] is None else f"{taus[1]:.4f}", cfg.calib_steps, time.perf_counter() - t)

    tb = open_tensorboard(args, out, ctx.is_main, start, total)  # None without --tensorboard
    if tb:  # one fixed image's per-view masks (a validation image when there are some)
        tb.watch(MaskSnapshot(data, val_idx[0] if val_idx else 0, profile.eval_transform(), seen_vocab, ctx.device,
                              prompt_view_rows(model, seen_vocab)), "segmentation views, global view, final masks",
                 start)
    logger = JsonlLogger(out / "log.jsonl", enabled=ctx.is_main,
                         resume_iter=start if resume_path is not None else None, sinks=[tb] if tb else ())
    logger.log({"event": "resume" if resume_path else "start", "from_iter": start,
                "command": getattr(args, "command", None),
                "checkpoint": str(resume_path) if resume_path else None,
                "world_size": ctx.world_size, "device": str(ctx.device),
                "dataset_size": None if fresh else len(stream_data), "fresh_samples": fresh,
                "skipped_missing": getattr(data, "skipped", 0), "known_unreadable": known_unreadable,
                "crop_size": transform.crop_size,
                "vocabulary": list(vocab), "prior_prompts": prior_name, "calibrated_tau": taus,
                "held_out_classes": [seen_vocab[i] for i in holdout.held_out],
                "validation_images": len(val_idx), "config": _config_record(cfg)})
    if ctx.is_main:
        log.info("%s | %d training classes (%d seen held out for selection) | %d prompts per step | "
                 "%s samples | %d validation images | world %d", data, len(vocab), len(holdout.held_out),
                 len(vocab) * (cfg.n_seg + int(cfg.use_global)), "fresh" if fresh else "fixed-pool",
                 len(val_idx), ctx.world_size)
    if handcrafted and ctx.is_main and resume_path is None:
        # what the learned prompts have to beat, on the same images and classes (logged, never selected on)
        ref = summarise(handcrafted["maskclip-85"].sum(0), holdout, cfg.select)
        logger.log({"event": "validation_reference", "prompts": "maskclip-85", **ref})
        log.info("validation reference (85 templates): trained classes %.1f, held-out %.1f, score %.2f",
                 ref["miou_trained"], ref["miou_held_out"], ref["score"])
    bar = Progress(total, start, enabled=ctx.is_main and not args.no_progress)

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
        """Scores the prompts on the validation images (the views alone with ``views_only``); True when the
        selection's patience is spent."""
        result = validation.score(model, seen_vocab, holdout, cfg.select, gpr=not views_only)
        stop = tracker.update(iteration, result, prompts, holdout, cfg.select)
        logger.log({"event": "validation", **tracker.history[-1], "best_iter": tracker.best_iter})
        if views_only and (stop or iteration >= cfg.max_iters) and iteration < total:
            pooled = cfg.gpr_pool and total > cfg.max_iters
            note = f" (from iteration {cfg.max_iters} on the --gpr-pool)" if pooled else ""
            log.info("iteration %d: the views are done (selection stopped or --max-iters; best: iteration %d); the "
                     "global branch trains on "
                     "alone to iteration %d%s", iteration, tracker.best_iter, total, note)
        return stop

    def views_done(iteration: int) -> bool:
        """--gpr-select views: whether the views' training is over (their selection stopped or --max-iters)."""
        return views_only and (tracker.should_stop or iteration >= cfg.max_iters)

    it = start
    if validation is not None and start == 0 and cfg.init_fit > 0:
        validate(0)  # the warm start itself is a candidate: learning must beat it on held-out classes
    selecting = not tracker.should_stop  # a resumed run may come back after its selection stopped
    stopped = not selecting and not views_only
    fixed_views, pool = None, None  # the views' K×C×D embeddings and the --gpr-pool, once only GPR trains
    batches = features(loader)
    t0 = time.perf_counter()
    while not stopped and it < total:
        if views_only and it >= cfg.max_iters and cfg.gpr_pool:  # a minibatch of the pool's frozen features
            if pool is None:
                pool = gpr_feature_pool(cfg, stream_data, transform, fresh, features, ctx, args.num_workers)
            feats, labels = pool.batch(max(cfg.gpr_batch // ctx.world_size, 1), cfg.seed, ctx.rank, it)
        else:
            batch = next(batches, None)
            if batch is None:
                break
            feats, labels = batch
        lr = sched.apply(opt, it)
        if views_done(it):  # one text pass of the global prompt alone; the views stay as they are
            if fixed_views is None:
                with torch.no_grad():
                    fixed_views = learner.text(vocab).seg.detach()
            losses = learner.step_global(feats, labels, vocab, fixed_views)
        else:  # one text-tower pass for all (k+1)·C prompts (gradients flow into the prompt vectors), Eq. 10 + anchor
            losses = learner.step(feats, labels, vocab, prior=prior)
        it += 1

        terms = torch.stack([losses[k].detach().float() for k in ("total", "seg", "cls", "oc")])
        terms = all_reduce_sum(terms, ctx) / ctx.world_size
        ips = bar.update(feats.shape[0] * ctx.world_size,
                         **dict(zip(("loss", "seg", "cls", "oc"), terms.tolist())), lr=lr)
        tau2 = prompts.tau2()
        logger.log({"iter": it, "lr": lr, **dict(zip(("loss", "seg", "cls", "oc"), terms.tolist())),
                    "tau1": float(prompts.tau1().detach()),
                    "tau2": None if tau2 is None else float(tau2.detach()),
                    "img_per_s": ips, "step_s": time.perf_counter() - t0})  # data, image tower and step
        t0 = time.perf_counter()
        if tb:
            tb.grid_step(it)
        if validation is not None and selecting and it <= cfg.max_iters and (it % cfg.val_every == 0
                                                                             or it == cfg.max_iters):
            selecting = not validate(it)
            stopped = not selecting and not views_only
        if it % cfg.ckpt_every == 0 or it == total or stopped:
            save_state(it)
        if args.simulate_kill_at is not None and it == args.simulate_kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection for the resume test
        if stopped:
            log.info("early stop at iteration %d: no better validation for %d checks (best: iteration %d, "
                     "score %.2f)", it, cfg.patience, tracker.best_iter, tracker.best_score)
            break
    bar.close()

    if tracker.best_state is not None:  # the validated best, not the last iterate
        best = tracker.best_state
        if global_last:  # ... but the global prompt of the last one
            best = splice_global(best, prompts.state_dict())
        prompts.load_state_dict(best)
    gpr_fit = None
    if cfg.gpr_fit or cfg.gpr_shifts > 1:  # the shipped prompts are fixed from here; a crash refits on resume
        gpr_fit = fit_gpr_stage(cfg, clip, model, prompts, seen_vocab, stream_data, transform, fresh, amp, ctx,
                                args.num_workers)
    prompts.set_gpr_shifts(cfg.gpr_shifts)  # an inference setting the checkpoint carries (mvpseg/gpr_shifts.py)
    final = out / "prompts.safetensors"
    if ctx.is_main:
        selection = None if validation is None else {
            "mode": cfg.select, "held_out_classes": [seen_vocab[i] for i in holdout.held_out],
            "validation_images": len(val_idx), "best_iter": tracker.best_iter,
            "best_score": tracker.best_score if math.isfinite(tracker.best_score) else None,
            "stopped_early_at": it if tracker.should_stop and not views_only else None,
            # views_only: the last validation is where the views' selection stopped; training went on
            "views_stopped_at": (tracker.history[-1]["iter"] if views_only and tracker.should_stop else None),
            # NaN (a class absent from the validation images) is not JSON: written as null
            "history": [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in h.items()}
                        for h in tracker.history]}
        save_prompts(final, prompts, clip, gamma=cfg.gamma, training_classes=vocab,
                     extra={"train_config": _config_record(cfg), "iterations": it, "world_size": ctx.world_size,
                            "selection": selection, "gpr_fit": gpr_fit,
                            "command": getattr(args, "command", None)})
        logger.log({"event": "done", "iter": it, "prompts": str(final),
                    "skipped_unreadable": unreadable_names(unreadable) if cfg.skip_missing else [],
                    "best_iter": tracker.best_iter if validation is not None else None})
        log.info("wrote %s%s", final, "" if validation is None else
                 f" (prompts of iteration {tracker.best_iter}, validation score {tracker.best_score:.2f})")
    if tb:
        tb.close()
    barrier(ctx)
    return final


def main(argv=None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    args.command = command_line("training.train_prompts", argv)
    cfg = config_from_args(args)
    if cfg.n_seg < 1:
        raise SystemExit("--n-seg must be >= 1")
    apply_runtime(args)
    with distributed_session(args.device) as ctx:
        return train(cfg, args, ctx)


if __name__ == "__main__":
    main()
