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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mvpseg.builder import baseline_prompt_sets
from mvpseg.checkpoint import load_prompts
from mvpseg.clip_backbone import FrozenCLIP, load_clip
from mvpseg.dense import default_dense_mode
from mvpseg.model import MVPSeg
from mvpseg.prompts import PromptSet
from mvpseg.student import StudentConfig, StudentNet, fuse_views, save_student

from .checkpointing import CheckpointManager, atomic_write_text, restore_state
from .cli import (add_clip_args, add_data_args, add_runtime_args, amp_dtype, apply_runtime, clip_spec,
                  command_line)
from .data import EvalShard, TrainStream, eval_loader, train_loader
from .datasets import UNREADABLE_RECORD, build_dataset, get_profile
from .distributed import (DistContext, all_reduce_sum, barrier, distributed_session, rng_state,
                          seed_everything)
from .evaluate import evaluate_dataset, render_markdown
from .metrics import ConfusionMatrix, SegScores, dumps, summarize
from .pseudo_labels import (IGNORE_INDEX, TEACHER, UNLABELED, HideUnseen, assign_unseen, check_no_leak,
                            default_switch_iter, phase_at, teacher_scores)
from .runlog import JsonlLogger, Progress
from .schedule import LRSchedule
from .tensorboard_log import MaskSnapshot, add_tensorboard_args, open_tensorboard, student_rows
from .train_prompts import seg_loss_weight

log = logging.getLogger("mvpseg.distill")

# MaskCLIP+ zero-shot configs (paper Sec. 4.3: "the same settings as MaskCLIP"). The toy world row is ours.
DATASET_DEFAULTS = {
    "voc20": dict(max_iters=20000, lr=0.01, weight_decay=5e-4, head="deeplabv2"),
    "context60": dict(max_iters=40000, lr=0.004, weight_decay=1e-4, head="deeplabv3plus"),
    "cocostuff171": dict(max_iters=80000, lr=0.01, weight_decay=5e-4, head="deeplabv2"),
    "toyworld": dict(max_iters=2000, lr=0.01, weight_decay=5e-4, head="deeplabv2"),
}
RESUME_KEYS = ("dataset", "split", "prompts", "backbone", "head", "background", "lr", "momentum",
               "weight_decay", "power", "min_lr", "max_iters", "switch_iter", "global_batch", "seed",
               "crop_size", "train_scale", "teacher_gpr", "clip", "pretrained", "dense", "sliding")


@dataclass(frozen=True)
class DistillConfig:
    dataset: str
    data_root: str
    out: str
    prompts: str
    split: str | None = None
    backbone: str = "resnet101"
    head: str = "deeplabv2"
    backbone_weights: str | None = "imagenet"
    require_pretrained: bool = False
    background: bool = False
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    power: float = 0.9
    min_lr: float = 1e-4
    max_iters: int = 20000
    switch_iter: int = 2000
    global_batch: int = 16
    seed: int = 0
    crop_size: int | None = None
    train_scale: tuple[int, int] | None = None
    teacher_gpr: bool = True
    ckpt_every: int = 1000
    keep_ckpts: int = 2
    eval_split: str | None = None
    eval_scale: tuple[int, int] | None = None
    eval_limit: int | None = None
    eval_teacher: bool = True
    skip_missing: bool = False
    clip: str = "RN50"
    pretrained: str | None = "openai"
    # the teacher's dense features behind the pseudo labels (--dense, resolved once the CLIP is loaded) and
    # --sliding; both are recorded in the student checkpoint
    dense: str | None = None
    sliding: tuple[int, int] | None = None

    @property
    def schedule(self) -> LRSchedule:
        # mmseg's schedule_{20,40,80}k: poly, power 0.9, min_lr 1e-4, no warmup.
        return LRSchedule(self.lr, self.max_iters, warmup_iters=0, policy="poly", power=self.power,
                          min_lr=self.min_lr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p, "run folder (checkpoints, log.jsonl, student, eval)")
    p.add_argument("--prompts", required=True,
                   help="MVP-SEG prompt checkpoint (.safetensors + .json from training.train_prompts), or a "
                        "handcrafted set (maskclip-85 | parts | a-photo-of) for a MaskCLIP+ baseline")
    g = p.add_argument_group("student")
    g.add_argument("--backbone", default="resnet101",
                   help="resnet18 | resnet34 | resnet50 | resnet101 | resnet152 | resnet-tiny")
    g.add_argument("--head", default=None, choices=["deeplabv2", "deeplabv3plus"],
                   help="default: deeplabv3plus for Context, deeplabv2 otherwise")
    g.add_argument("--backbone-weights", default="imagenet",
                   help="imagenet | imagenet-v2 | none | PATH (.pth / .safetensors torchvision state dict)")
    g.add_argument("--require-pretrained", action="store_true",
                   help="fail instead of falling back to random init when ImageNet weights are unavailable")
    g.add_argument("--background", default="auto", choices=["auto", "on", "off"],
                   help="learnable background embedding (auto: when class 0 is 'background')")
    g = p.add_argument_group("schedule (defaults: MaskCLIP+ for the dataset)")
    g.add_argument("--max-iters", type=int, default=None, help="VOC 20k, Context 40k, COCO-Stuff 80k")
    g.add_argument("--switch-iter", type=int, default=None, help="end of MVP-SEG guidance (default 1/10)")
    g.add_argument("--lr", type=float, default=None, help="0.01 (Context 0.004)")
    g.add_argument("--weight-decay", type=float, default=None, help="5e-4 (Context 1e-4)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--power", type=float, default=0.9)
    g.add_argument("--min-lr", type=float, default=1e-4)
    g.add_argument("--global-batch", type=int, default=16, help="images per step over all processes")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--crop-size", type=int, default=None, help="default: 512 (480 for Context)")
    g.add_argument("--train-scale", type=int, nargs=2, default=None, metavar=("LONG", "SHORT"),
                   help="mmcv img_scale of the random resize (default: the dataset's)")
    g.add_argument("--no-teacher-gpr", action="store_true", help="pseudo labels from Eq. 4 instead of Eq. 8")
    g = p.add_argument_group("checkpoints and evaluation")
    g.add_argument("--ckpt-every", type=int, default=1000)
    g.add_argument("--keep-ckpts", type=int, default=2)
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from the latest checkpoint in --out (or from the given state file)")
    g.add_argument("--eval-split", default=None, help="default: the dataset's validation split")
    g.add_argument("--eval-scale", type=int, nargs=2, default=None, metavar=("LONG", "SHORT"),
                   help="override the dataset's keep-ratio evaluation img_scale")
    g.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N images only")
    g.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    g.add_argument("--no-eval-teacher", action="store_true", help="do not score MVP-SEG beside the student")
    g.add_argument("--skip-missing", action="store_true", help="drop samples whose files are missing and skip unreadable ones (logged)")
    g.add_argument("--cache-samples", action="store_true",
                   help="keep decoded training samples in memory (small datasets, the procedural toy world)")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # interruption, for tests
    add_clip_args(p)
    add_runtime_args(p)
    add_tensorboard_args(p)
    return p


def config_from_args(a: argparse.Namespace) -> DistillConfig:
    name = get_profile(a.dataset).name
    d = DATASET_DEFAULTS.get(name, DATASET_DEFAULTS["voc20"])
    max_iters = a.max_iters if a.max_iters is not None else d["max_iters"]
    switch = a.switch_iter if a.switch_iter is not None else default_switch_iter(max_iters)
    if not 0 <= switch <= max_iters:
        raise SystemExit(f"--switch-iter {switch} must lie in [0, --max-iters {max_iters}]")
    weights = None if str(a.backbone_weights).lower() in ("none", "random") else a.backbone_weights
    return DistillConfig(
        dataset=name, data_root=str(a.data_root), out=str(a.out), prompts=str(a.prompts), split=a.split,
        backbone=a.backbone, head=a.head or d["head"], backbone_weights=weights,
        require_pretrained=a.require_pretrained, lr=a.lr if a.lr is not None else d["lr"],
        momentum=a.momentum, weight_decay=a.weight_decay if a.weight_decay is not None else d["weight_decay"],
        power=a.power, min_lr=a.min_lr, max_iters=max_iters, switch_iter=switch, global_batch=a.global_batch,
        seed=a.seed, crop_size=a.crop_size, train_scale=tuple(a.train_scale) if a.train_scale else None,
        teacher_gpr=not a.no_teacher_gpr, ckpt_every=a.ckpt_every, keep_ckpts=a.keep_ckpts,
        eval_split=a.eval_split, eval_scale=tuple(a.eval_scale) if a.eval_scale else None,
        eval_limit=a.eval_limit, eval_teacher=not a.no_eval_teacher,
        skip_missing=a.skip_missing, clip=a.clip, pretrained=a.pretrained, dense=getattr(a, "dense", None),
        sliding=tuple(a.sliding) if getattr(a, "sliding", None) else None)


def load_teacher_prompts(spec: str, clip: FrozenCLIP) -> tuple[PromptSet, float]:
    """(prompt set, γ): a learned checkpoint (checked against ``clip``) or a handcrafted set by name."""
    handcrafted = baseline_prompt_sets()
    if spec in handcrafted:
        return handcrafted[spec].to(clip.device).eval(), 10.0
    prompts = load_prompts(spec, clip, name="mvp-seg")
    return prompts.eval(), float(prompts.meta.gamma)


@torch.no_grad()
def evaluate_student(student: StudentNet, class_emb: torch.Tensor, bg_index: int | None, dataset, transform,
                     ctx: DistContext, limit: int | None = None, amp=None, progress: bool = True) -> SegScores:
    """Whole-image, single-scale scores of the student on ``dataset`` (full label space), with the
    conventions of ``training/evaluate.py``: logits resized bilinearly to the label's size, argmax."""
    was_training = student.training
    student.eval()
    cm = ConfusionMatrix(len(dataset.class_names), dataset.ignore_index)
    shard = EvalShard(dataset, transform, ctx.rank, ctx.world_size, limit)
    bar = Progress(len(shard), enabled=progress and ctx.is_main, desc="eval student")
    cast = torch.autocast(ctx.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    for image, label, _ in eval_loader(shard):
        with cast:
            logits = student(student.normalize(image[None].to(ctx.device)), class_emb, bg_index)
        logits = F.interpolate(logits.float(), size=tuple(label.shape), mode="bilinear", align_corners=False)
        cm.update(logits.argmax(1)[0], label)
        bar.update(ctx.world_size)
    bar.close()
    cm.all_reduce()
    student.train(was_training)
    return summarize(cm.mat.numpy(), tuple(dataset.class_names), tuple(dataset.unseen_indices))


def _config_record(cfg: DistillConfig) -> dict:
    d = asdict(cfg)
    for key in ("train_scale", "eval_scale", "sliding"):  # tuples read back from JSON as lists
        d[key] = list(d[key]) if d[key] else None
    return d


def distill(cfg: DistillConfig, args: argparse.Namespace, ctx: DistContext) -> Path | None:
    out = Path(cfg.out)
    ckpts = CheckpointManager(out / "checkpoints", keep=cfg.keep_ckpts)
    resume_path = ckpts.resolve(args.resume)
    if args.resume is None and ckpts.latest() is not None:
        raise SystemExit(f"{out} already holds training checkpoints: pass --resume to continue or choose a new --out")
    seed_everything(cfg.seed)  # identical student initialisation on every process
    clip = load_clip(clip_spec(args), ctx.device)
    cfg = replace(cfg, dense=clip.dense_mode)  # resolved: --resume compares modes, not flags
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
        class_emb = fuse_views(prompts.encode(clip, vocab)).to(ctx.device)
        unseen_text = prompts.encode(clip, [vocab[i] for i in unseen]).detach() if unseen else None
    unseen_ids = torch.tensor(unseen, dtype=torch.long, device=ctx.device)

    student = StudentNet(StudentConfig(cfg.backbone, cfg.head, clip.embed_dim, background=background),
                         cfg.backbone_weights, cfg.require_pretrained).to(ctx.device).train()
    model: nn.Module = student
    if ctx.distributed:
        if ctx.device.type == "cuda":  # MaskCLIP+ uses SyncBN; gloo (CPU) has no SyncBN kernels
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
    opt = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    dtype = amp_dtype(args.amp, ctx.device.type)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    sched = cfg.schedule

    start = 0 if resume_path is None else restore_state(
        resume_path, _config_record(cfg), RESUME_KEYS, {"student": student}, opt, scaler, sched.state_dict(),
        defaults={"dense": default_dense_mode(clip.model.visual), "sliding": None})  # states from before them

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
                "backbone_init": student.backbone_init, "config": _config_record(cfg)})
    if ctx.is_main:
        log.info("%s | %d classes (%d unseen) | teacher %s for %d of %d iterations | backbone %s", data,
                 len(vocab), len(unseen), cfg.prompts, cfg.switch_iter, cfg.max_iters, student.backbone_init)
    bar = Progress(cfg.max_iters, start, enabled=ctx.is_main and not args.no_progress, desc="distill")

    def save_state(iteration: int) -> None:
        if ctx.is_main:
            ckpts.save(iteration, {"student": {k: v.detach().cpu() for k, v in student.state_dict().items()},
                                   "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                                   "scheduler": sched.state_dict(), "rng": rng_state(),
                                   "config": _config_record(cfg)})
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

    evals: dict[str, SegScores] = {}
    if not args.no_eval:
        eval_data = build_dataset(cfg.dataset, cfg.data_root, cfg.eval_split, label_space="full")
        tf = profile.eval_transform(**({"scale": cfg.eval_scale} if cfg.eval_scale else {}))
        learned = cfg.prompts not in baseline_prompt_sets()
        evals["MVP-SEG+ (student)" if learned else f"{cfg.prompts}+ (student)"] = evaluate_student(
            student, class_emb, bg_index, eval_data, tf, ctx, cfg.eval_limit, dtype, not args.no_progress)
        if cfg.eval_teacher:  # the teacher on the same images, through training/evaluate.py
            name = "MVP-SEG (teacher)" if learned else f"{cfg.prompts} (teacher)"
            evals.update(evaluate_dataset(clip, {name: (prompts, gamma)}, eval_data, tf, ctx, cfg.eval_limit,
                                          0, dtype, not args.no_progress))
    final = out / "student.safetensors"
    if ctx.is_main:
        header = {"CLIP": clip.spec.describe(), "teacher prompts": cfg.prompts, "student": f"{cfg.backbone} + "
                  f"{cfg.head}", "backbone init": student.backbone_init, "iterations": it,
                  "teacher-guided iterations": cfg.switch_iter, "processes": ctx.world_size,
                  "teacher dense features": clip.dense.describe() if clip.dense else None}
        results = {k: v.as_dict() for k, v in evals.items()}
        save_student(final, student, prompts, clip, class_names=vocab, background_index=bg_index, unseen=unseen,
                     extra={"train_config": _config_record(cfg), "iterations": it, "eval": results,
                            "command": getattr(args, "command", None)})
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
    args = build_parser().parse_args(argv)
    args.command = command_line("training.distill", argv)
    cfg = config_from_args(args)
    apply_runtime(args)
    with distributed_session(args.device) as ctx:
        return distill(cfg, args, ctx)


if __name__ == "__main__":
    main()
