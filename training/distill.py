"""MVP-SEG+ knowledge transfer (paper Sec. 3.3 / 4.3, MaskCLIP+'s transductive schedule): train a DeepLab
student whose classifier is the frozen, view-fused MVP-SEG text embeddings.

Seen pixels are trained on ground truth throughout. Unseen pixels (ground truth of an unseen class, hidden
before augmentation, see ``training/pseudo_labels.py``) get MVP-SEG's pseudo labels, scored against the unseen
classes only, during the first ``--switch-iter`` iterations (default 1/10), then the student's own detached
predictions (self-training). Single process::

    python -m training.distill --dataset voc --data-root data/VOCdevkit/VOC2012 \\
        --prompts runs/voc/prompts.safetensors --out runs/voc-plus

4 GPUs (global batch 16 = 4 per GPU, MaskCLIP+), SyncBatchNorm on CUDA::

    torchrun --nproc_per_node 4 -m training.distill --dataset voc ... --global-batch 16

After training, the penalty on the seen classes' logits (calibrated stacking, against the seen-class bias of
zero-shot students) is chosen on the training images and stored in the student (``--seen-penalty auto``, the
default; ``training/calibrate_student.py``).

``--prompts maskclip-85`` distils from MaskCLIP's handcrafted prompts instead (MaskCLIP+). Training state is
checkpointed atomically every ``--ckpt-every`` iterations and ``--resume`` reproduces the uninterrupted run
(data order and augmentation are functions of (seed, position), see ``training/data.py``). Outputs:
``<out>/student.safetensors`` + ``.json`` (loads into ``mvpseg.StudentPredictor``), ``<out>/log.jsonl``,
``<out>/eval.md`` / ``eval.json`` (mIoU seen / unseen, hIoU, through ``training/metrics.py``).
"""
from __future__ import annotations

if not __package__:  # run by path (python training/distill.py): import as the package would
    import _as_script; __package__ = _as_script.PACKAGE  # noqa: E702

import argparse
import contextlib
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mvpseg.builder import baseline_prompt_sets
from mvpseg.clip_backbone import load_clip
from mvpseg.dense import default_dense_mode
from mvpseg.model import MVPSeg
from mvpseg.student import CLIP_BACKBONE, StudentConfig, StudentNet, fuse_views, save_student

from .calibrate_student import resolve_seen_penalty
from .checkpointing import CheckpointManager, atomic_write_text, restore_state
from .cli import amp_dtype, apply_runtime, clip_spec, command_line
from .data import TrainStream, train_loader
from .datasets import UNREADABLE_RECORD, build_dataset, get_profile
from .distill_config import (RESUME_KEYS, DistillConfig, build_parser, config_from_args, config_record,
                             load_teacher_prompts)
from .distill_schedule import measure_step, resolve_schedule, resolve_student
from .distributed import DistContext, all_reduce_sum, barrier, distributed_session, rng_state, seed_everything
from .evaluate import evaluate_dataset, render_markdown
from .metrics import SegScores, dumps
from .pseudo_labels import (IGNORE_INDEX, TEACHER, UNLABELED, HideUnseen, assign_unseen, check_no_leak, phase_at,
                            teacher_scores)
from .runlog import JsonlLogger, Progress
from .student_eval import evaluate_student_penalties
from .tensorboard_log import MaskSnapshot, open_tensorboard, student_rows
from .train_prompts import seg_loss_weight

log = logging.getLogger("mvpseg.distill")

def distill(cfg: DistillConfig, args: argparse.Namespace, ctx: DistContext) -> Path | None:
    out = Path(cfg.out)
    ckpts = CheckpointManager(out / "checkpoints", keep=cfg.keep_ckpts)
    resume_path = ckpts.resolve(args.resume)
    if args.resume is None and ckpts.latest() is not None:
        raise SystemExit(f"{out} already holds training checkpoints: pass --resume to continue or choose a new --out")
    seed_everything(cfg.seed)  # identical student initialisation on every process
    clip = load_clip(clip_spec(args), ctx.device)
    cfg = resolve_student(replace(cfg, dense=clip.dense_mode), clip)  # resolved: --resume compares values
    prompts, gamma = load_teacher_prompts(cfg.prompts, clip)  # learned prompts: refused under another mode
    teacher = MVPSeg(clip, prompts, gamma=gamma).eval()  # pseudo labels from the CLIP's dense settings

    profile = get_profile(cfg.dataset)
    data = build_dataset(cfg.dataset, cfg.data_root, cfg.split, label_space="full", train=True,
                         on_missing="skip" if cfg.skip_missing else "error")
    if cfg.skip_missing and hasattr(data, "record_unreadable"):  # corrupt samples persist: resume skips them
        data.record_unreadable(out / UNREADABLE_RECORD)
    vocab, unseen = tuple(data.prompt_names), tuple(data.unseen_indices)
    auto_bg = vocab[0].lower() == "background"
    background = {"auto": auto_bg, "on": True, "off": False}[args.background]
    cfg = replace(cfg, background=background)
    bg_index = 0 if background else None
    with torch.no_grad():  # frozen text: the student's classifier and the teacher's unseen vocabulary
        views = prompts.encode(clip, vocab)
        class_emb, n_views = fuse_views(views).to(ctx.device), views.seg.shape[0]
        unseen_text = prompts.encode(clip, [vocab[i] for i in unseen]).detach() if unseen else None
    unseen_ids = torch.tensor(unseen, dtype=torch.long, device=ctx.device)

    own_tower = cfg.backbone == CLIP_BACKBONE  # the CLIP's image tower: its weights, its input statistics
    student = StudentNet(StudentConfig(cfg.backbone, cfg.head, clip.embed_dim, cfg.output_stride,
                                       background=background,
                                       normalization=clip.normalization if own_tower else "imagenet",
                                       normalize_features=own_tower and cfg.normalize_features,
                                       frozen_backbone=own_tower and cfg.freeze_backbone,
                                       head_context=cfg.head_context),
                         cfg.backbone_weights, cfg.require_pretrained,
                         clip_visual=clip.model.visual if own_tower else None).to(ctx.device).train()
    if own_tower and not resume_path:  # start at the teacher's Eq. 4 scores (the head is MaskCLIP's projection):
        tau1 = torch.as_tensor(prompts.tau1()).detach()
        student.set_logit_scale(float(tau1) * n_views)  # τ1 Σ_i f̂·t_c^i = τ1·K f̂·w_c
        if background:  # and "background" as the prompts encode it
            with torch.no_grad():
                student.bg_embedding.copy_(class_emb[bg_index][None].to(student.bg_embedding))
    crop = (cfg.crop_size or profile.crop_size) * int(getattr(data, "pixel_scale", 1))
    cfg, sized_because = resolve_schedule(cfg, len(data), ctx, resume_path, lambda b: measure_step(
        student, class_emb, bg_index, b, crop))
    model: nn.Module = student
    if ctx.distributed:
        if ctx.device.type == "cuda":  # MaskCLIP+ uses SyncBN; gloo (CPU) has no SyncBN kernels
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
    trainable = [p for p in student.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:  # MaskCLIP+'s
        opt = torch.optim.SGD(trainable, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    dtype = amp_dtype(args.amp, ctx.device.type)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    sched = cfg.schedule

    start = 0 if resume_path is None else restore_state(
        resume_path, config_record(cfg), RESUME_KEYS, {"student": student}, opt, scaler, sched.state_dict(),
        defaults={"dense": default_dense_mode(clip.model.visual), "sliding": None, "output_stride": 8, "optimizer": "sgd",
                  "freeze_backbone": True, "normalize_features": True, "head_context": 0})  # states from before them

    overrides: dict = {"crop_size": cfg.crop_size} if cfg.crop_size else {}
    if cfg.train_scale:
        overrides["scale"] = cfg.train_scale
    stream = TrainStream(HideUnseen(data, unseen, cache=args.cache_samples), profile.train_transform(data, **overrides),
                         cfg.global_batch, cfg.max_iters, cfg.seed, ctx.rank, ctx.world_size, start_iter=start)
    loader = train_loader(stream, num_workers=args.num_workers)
    tb = open_tensorboard(args, out, ctx.is_main, start, cfg.max_iters)  # None without --tensorboard
    if tb:  # the first evaluation image: the teacher's per-view masks and the student's class probabilities
        tb.watch(MaskSnapshot(build_dataset(cfg.dataset, cfg.data_root, cfg.eval_split, label_space="full"), 0,
                              profile.eval_transform(), vocab, ctx.device,
                              student_rows(student, class_emb, bg_index, teacher, vocab)),
                 "teacher's segmentation views, student's class probabilities", start)
    logger = JsonlLogger(out / "log.jsonl", enabled=ctx.is_main, resume_iter=start if resume_path else None,
                         sinks=[tb] if tb else ())
    logger.log({"event": "resume" if resume_path else "start", "from_iter": start, "world_size": ctx.world_size,
                "command": getattr(args, "command", None),
                "checkpoint": str(resume_path) if resume_path else None, "device": str(ctx.device),
                "dataset_size": len(data), "vocabulary": list(vocab), "unseen": [vocab[i] for i in unseen],
                "backbone_init": student.backbone_init, "config": config_record(cfg),
                "schedule_sized": sized_because})
    if ctx.is_main:
        log.info("%s | %d classes (%d unseen) | teacher %s for %d of %d iterations of %d images%s | student %s + "
                 "%s (%s), lr %g", data, len(vocab), len(unseen), cfg.prompts, cfg.switch_iter, cfg.max_iters,
                 cfg.global_batch, f" (schedule {sized_because})" if sized_because else "", cfg.backbone, cfg.head,
                 student.backbone_init, cfg.lr)
    bar = Progress(cfg.max_iters, start, enabled=ctx.is_main and not args.no_progress, desc="distill")

    def save_state(iteration: int) -> None:
        if ctx.is_main:
            ckpts.save(iteration, {"student": {k: v.detach().cpu() for k, v in student.state_dict().items()},
                                   "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                                   "scheduler": sched.state_dict(), "rng": rng_state(),
                                   "config": config_record(cfg)})
        barrier(ctx)

    it = start
    for images, labels in loader:
        t0 = time.perf_counter()
        phase = phase_at(it, cfg.switch_iter)
        if it == cfg.switch_iter and it > start:  # (a run resumed exactly here logged it before)
            logger.log({"event": "self-training", "iter": it})
        lr = sched.apply(opt, it)
        images = images.to(ctx.device, non_blocking=True)
        labels = labels.to(ctx.device, non_blocking=True)
        check_no_leak(labels, unseen_ids)
        cast = torch.autocast(ctx.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with cast:
            logits = model(student.normalize(images), class_emb, bg_index)
            if phase == TEACHER and unseen_text is not None:
                scores = teacher_scores(teacher, clip.normalize(images), unseen_text, cfg.teacher_gpr)
            else:  # self-training: the student's own detached scores of the unseen classes
                scores = logits.detach()[:, unseen_ids]
        targets = assign_unseen(labels, scores, unseen_ids)
        logits = F.interpolate(logits.float(), size=targets.shape[-2:], mode="bilinear", align_corners=False)
        valid = targets != IGNORE_INDEX
        loss = (F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX) if bool(valid.any())
                else logits.sum() * 0.0)  # keeps the graph (and DDP's hooks) alive on an all-ignored crop
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss * seg_loss_weight(targets, ctx, IGNORE_INDEX)).backward()
        scaler.step(opt)
        scaler.update()
        it += 1

        stats = torch.stack([loss.detach().float(), (labels == UNLABELED).sum().float(), valid.sum().float()])
        stats = all_reduce_sum(stats, ctx)
        if not bool(torch.isfinite(stats[0])) and dtype != torch.float16:  # (fp16's scaler skips such steps)
            bar.close()  # every process sees the same reduced loss, so all stop here together
            raise SystemExit(f"distillation diverged at iteration {it}: the loss is not finite (lr {lr:g}). Start "
                             f"a new --out with a lower --lr; the student of a finished run is never written from "
                             f"a diverged one")
        ips = bar.update(images.shape[0] * ctx.world_size, loss=float(stats[0]) / ctx.world_size, lr=lr)
        logger.log({"iter": it, "phase": phase, "lr": lr, "loss": float(stats[0]) / ctx.world_size,
                    "pseudo_px": int(stats[1]), "labelled_px": int(stats[2]), "img_per_s": ips,
                    "step_s": time.perf_counter() - t0})
        if tb:
            tb.grid_step(it)
        if it % cfg.ckpt_every == 0 or it == cfg.max_iters:
            save_state(it)
        if args.stop_after is not None and it >= args.stop_after:
            bar.close()
            return None  # simulated crash (tests): only the checkpoints written so far survive
    bar.close()

    seen_penalty, calibration = resolve_seen_penalty(cfg.seen_penalty, student, class_emb, bg_index, data, unseen,
                                                     profile.eval_transform(), ctx, cfg.calibration_images, dtype,
                                                     not args.no_progress)
    logger.log({"event": "calibrated", "seen_penalty": seen_penalty})
    evals: dict[str, SegScores] = {}
    if not args.no_eval:
        eval_data = build_dataset(cfg.dataset, cfg.data_root, cfg.eval_split, label_space="full")
        tf = profile.eval_transform(**({"scale": cfg.eval_scale} if cfg.eval_scale else {}))
        learned = cfg.prompts not in baseline_prompt_sets()
        per_image: dict[str, list] | None = {} if args.save_confusions else None
        name = "MVP-SEG+ (student)" if learned else f"{cfg.prompts}+ (student)"
        # with a penalty, also the student without it (what the calibration changed), from the same forward passes
        rows = {name: seen_penalty, **({name.replace("(student)", "(student, no seen penalty)"): 0.0}
                                       if seen_penalty > 0 else {})}
        scores = evaluate_student_penalties(student, class_emb, bg_index, eval_data, tf, ctx, list(rows.values()),
                                            cfg.eval_limit, dtype, not args.no_progress,
                                            None if per_image is None else [per_image.setdefault(k, []) for k in rows])
        evals.update(zip(rows, scores))
        if cfg.eval_teacher:  # the teacher on the same images, through training/evaluate.py
            name = "MVP-SEG (teacher)" if learned else f"{cfg.prompts} (teacher)"
            evals.update(evaluate_dataset(clip, {name: (prompts, gamma)}, eval_data, tf, ctx, cfg.eval_limit,
                                          0, dtype, not args.no_progress, per_image=per_image))
        if per_image is not None and ctx.is_main:  # --save-confusions runs in one process (checked in main)
            np.savez_compressed(out / "confusions.npz", **{k: np.stack(v) for k, v in per_image.items()})
    final = out / "student.safetensors"
    if ctx.is_main:
        header = {"CLIP": clip.spec.describe(), "teacher prompts": cfg.prompts, "student": f"{cfg.backbone} + "
                  f"{cfg.head}", "backbone init": student.backbone_init, "iterations": it,
                  "teacher-guided iterations": cfg.switch_iter, "processes": ctx.world_size,
                  "seen-class penalty": seen_penalty,
                  "teacher dense features": clip.dense.describe() if clip.dense else None}
        results = {k: v.as_dict() for k, v in evals.items()}
        save_student(final, student, prompts, clip, class_names=vocab, background_index=bg_index, unseen=unseen,
                     seen_penalty=seen_penalty,
                     extra={"train_config": config_record(cfg), "iterations": it, "eval": results,
                            "command": getattr(args, "command", None), "seen_calibration": calibration})
        if evals:
            md = render_markdown({cfg.dataset: evals}, header)
            atomic_write_text(out / "eval.md", md)
            atomic_write_text(out / "eval.json", dumps({"header": header, "results": results}))
            print(md)
        logger.log({"event": "done", "iter": it, "student": str(final),
                    **{f"{k} {m}": results[k][m] for k in results for m in ("miou_seen", "miou_unseen", "hiou")}})
        log.info("wrote %s", final)
    if tb:
        tb.close()
    barrier(ctx)
    return final


def main(argv=None) -> Path | None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = build_parser(__doc__).parse_args(argv)
    args.command = command_line("training.distill", argv)
    cfg = config_from_args(args)
    apply_runtime(args)
    with distributed_session(args.device) as ctx:
        if args.save_confusions and ctx.world_size > 1:
            raise SystemExit("--save-confusions runs in one process (its per-image matrices are not gathered)")
        return distill(cfg, args, ctx)


if __name__ == "__main__":
    main()
