"""MVP-SEG prompt learning (paper Sec. 3.2 / 4.3) on seen classes only.

Single process (CPU or one GPU)::

    python -m training.train_prompts --dataset voc --data-root data/VOCdevkit/VOC2012 --out runs/voc

Several GPUs (or CPU processes, gloo) with the same global batch::

    torchrun --nproc_per_node 4 -m training.train_prompts --dataset voc ... --global-batch 8

Per step the frozen image tower runs once under ``no_grad`` for the local batch, the text tower runs
forward/backward once for all (k+1)·C prompts of the seen vocabulary, gradients of the prompt vectors
and temperatures are averaged over processes, and SGD steps.  ``--variant`` selects a row of Table 1;
``--n-seg`` sweeps the prompt count of Fig. 3.  Training state is checkpointed atomically every
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
from .shared_prefix import SharedPrefixEncoder, supports_shared_prefix

log = logging.getLogger("mvpseg.train")

# Table 1 rows: (k segmentation prompts, global prompt / GPR, λ_OC).  λ_cls only acts with GPR.
VARIANTS = {
    "single": dict(n_seg=1, use_global=False, lambda_oc=0.0),
    "multi": dict(n_seg=3, use_global=False, lambda_oc=0.0),
    "multi-oc": dict(n_seg=3, use_global=False, lambda_oc=100.0),
    "mvpseg": dict(n_seg=3, use_global=True, lambda_oc=100.0),
}
OPTIMIZERS = ("sgd", "adamw")  # sgd: the paper's; adamw: an extension (build_optimizer)
# Settings a resumed run must share with its checkpoint.
RESUME_KEYS = ("dataset", "split", "n_seg", "n_ctx", "use_global", "gamma", "lambda_seg", "text_encoder",
               "lambda_cls", "lambda_oc", "cls_mode", "optimizer", "lr", "momentum", "weight_decay",
               "warmup_iters", "warmup_ratio", "lr_policy", "max_iters", "global_batch", "seed",
               "crop_size", "train_scale", "clip", "pretrained")


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
    lambda_oc: float = 100.0
    cls_mode: str = "bce"
    optimizer: str = "sgd"
    lr: float = 2e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_iters: int = 1000
    warmup_ratio: float = 1e-3
    lr_policy: str = "poly"
    max_iters: int = 8000
    global_batch: int = 8
    seed: int = 0
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
    p.add_argument("--lambda-oc", type=float, default=None, help="default: from --variant")
    p.add_argument("--cls-loss", dest="cls_mode", default="bce", choices=["bce", "paper"])
    p.add_argument("--optimizer", default="sgd", choices=list(OPTIMIZERS),
                   help="sgd: the paper's (momentum SGD); adamw: per-coordinate steps, for short schedules")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (adamw: unused)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--warmup-iters", type=int, default=1000)
    p.add_argument("--warmup-ratio", type=float, default=1e-3)
    p.add_argument("--lr-policy", default="poly", choices=["poly", "constant"])
    p.add_argument("--max-iters", type=int, default=8000)
    p.add_argument("--global-batch", type=int, default=8, help="images per step over all processes")
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
    v = VARIANTS[a.variant]
    n_seg = a.n_seg if a.n_seg is not None else v["n_seg"]
    return TrainConfig(
        dataset=get_profile(a.dataset).name, data_root=str(a.data_root), out=str(a.out),
        split=a.split, variant=a.variant, n_seg=n_seg, n_ctx=a.n_ctx,
        use_global=v["use_global"] and not a.no_global, gamma=a.gamma, lambda_seg=a.lambda_seg,
        lambda_cls=a.lambda_cls, lambda_oc=a.lambda_oc if a.lambda_oc is not None else v["lambda_oc"],
        cls_mode=a.cls_mode, optimizer=a.optimizer, lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay,
        warmup_iters=a.warmup_iters, warmup_ratio=a.warmup_ratio, lr_policy=a.lr_policy,
        max_iters=a.max_iters, global_batch=a.global_batch, seed=a.seed, crop_size=a.crop_size,
        train_scale=tuple(a.train_scale) if a.train_scale else None, ckpt_every=a.ckpt_every,
        keep_ckpts=a.keep_ckpts, text_checkpointing=a.text_checkpointing, text_encoder=a.text_encoder,
        skip_missing=a.skip_missing, clip=a.clip, pretrained=a.pretrained,
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
    prompts = LearnedPrompts(clip.text_width, n_seg=cfg.n_seg, n_ctx=cfg.n_ctx,
                             use_global=cfg.use_global).to(ctx.device)
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

    start = 0 if resume_path is None else restore_state(
        resume_path, _config_record(cfg), RESUME_KEYS, {"prompts": prompts}, opt, scaler,
        cfg.schedule.state_dict(), defaults={"optimizer": "sgd"})  # states written before --optimizer existed were SGD runs

    profile = get_profile(cfg.dataset)
    data = build_dataset(cfg.dataset, cfg.data_root, cfg.split, label_space="seen", train=True,
                         on_missing="skip" if cfg.skip_missing else "error")
    vocab = tuple(data.prompt_names)  # seen classes only: unseen names never reach the text tower
    overrides = {"pad_value": tuple(clip.pixel_mean.flatten().tolist())}
    if cfg.crop_size:
        overrides["crop_size"] = cfg.crop_size
    if cfg.train_scale:
        overrides["scale"] = cfg.train_scale
    transform = profile.train_transform(data, **overrides)
    stream = TrainStream(data, transform, cfg.global_batch,
                         cfg.max_iters, cfg.seed, ctx.rank, ctx.world_size, start_iter=start)
    loader = train_loader(stream, num_workers=args.num_workers)

    logger = JsonlLogger(out / "log.jsonl", enabled=ctx.is_main,
                         resume_iter=start if resume_path is not None else None)
    logger.log({"event": "resume" if resume_path else "start", "from_iter": start,
                "checkpoint": str(resume_path) if resume_path else None,
                "world_size": ctx.world_size, "device": str(ctx.device),
                "dataset_size": len(data), "skipped_missing": getattr(data, "skipped", 0),
                "crop_size": transform.crop_size,
                "vocabulary": list(vocab), "config": _config_record(cfg)})
    if ctx.is_main:
        log.info("%s | %d seen classes | %d prompts per step | world %d", data, len(vocab),
                 len(vocab) * (cfg.n_seg + int(cfg.use_global)), ctx.world_size)
    bar = Progress(cfg.max_iters, start, enabled=ctx.is_main and not args.no_progress)
    weights, sched = cfg.loss_weights, cfg.schedule

    def save_state(iteration: int) -> None:
        if ctx.is_main:
            ckpts.save(iteration, {
                "prompts": {k: v.detach().cpu() for k, v in prompts.state_dict().items()},
                "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                "scheduler": sched.state_dict(), "rng": rng_state(),
                "config": _config_record(cfg),
            })
        barrier(ctx)

    it = start
    for images, labels in loader:
        t0 = time.perf_counter()
        lr = sched.apply(opt, it)
        images = clip.normalize(images.to(ctx.device, non_blocking=True))
        labels = labels.to(ctx.device, non_blocking=True)
        amp = (torch.autocast(ctx.device.type, dtype=dtype) if dtype is not None
               else contextlib.nullcontext())
        with amp:
            with torch.no_grad():
                feats = model.image_features(images)  # frozen image tower, once per batch
            # one text-tower pass for all (k+1)·C prompts (gradients flow into the prompt vectors)
            text = encoder.encode(prompts, vocab) if encoder else model.text_features(vocab)
            outputs = model.head(feats, text)
        losses = model.losses(outputs, labels, weights, cfg.cls_mode)
        w_seg = seg_loss_weight(labels, ctx)
        total = losses["total"] + (w_seg - 1.0) * weights.seg * losses["seg"]
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
        if it % cfg.ckpt_every == 0 or it == cfg.max_iters:
            save_state(it)
        if args.simulate_kill_at is not None and it == args.simulate_kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection for the resume test
    bar.close()

    final = out / "prompts.safetensors"
    if ctx.is_main:
        save_prompts(final, prompts, clip, gamma=cfg.gamma, training_classes=vocab,
                     extra={"train_config": _config_record(cfg), "iterations": it,
                            "world_size": ctx.world_size})
        logger.log({"event": "done", "iter": it, "prompts": str(final)})
        log.info("wrote %s", final)
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
