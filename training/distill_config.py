"""The settings of ``training.distill``: ``DistillConfig``, its command line, the teacher prompts by name, and
what a resume must match. What the command line leaves open is resolved at start
(``training/distill_schedule.py``)."""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

from mvpseg.builder import baseline_prompt_sets
from mvpseg.checkpoint import load_prompts
from mvpseg.clip_backbone import FrozenCLIP
from mvpseg.prompts import PromptSet
from mvpseg.student import CLIP_BACKBONE, MASKCLIP_HEAD

from .calibrate_student import AUTO, DEFAULT_IMAGES, parse_penalty
from .cli import add_clip_args, add_data_args, add_runtime_args
from .datasets import get_profile
from .distill_schedule import BENCHMARK_DEFAULTS
from .pseudo_labels import default_switch_iter
from .schedule import LRSchedule
from .tensorboard_log import add_tensorboard_args


RESUME_KEYS = ("dataset", "split", "prompts", "backbone", "head", "output_stride", "freeze_backbone",
               "normalize_features", "head_context", "background", "optimizer", "lr", "momentum",
               "weight_decay", "power", "min_lr", "max_iters", "switch_iter", "global_batch", "seed",
               "crop_size", "train_scale", "teacher_gpr", "clip", "pretrained", "dense", "sliding")


@dataclass(frozen=True)
class DistillConfig:
    dataset: str
    data_root: str
    out: str
    prompts: str
    split: str | None = None
    # None below: resolved at start (training/distill_schedule.py) and written to the log and checkpoints
    backbone: str | None = "resnet101"
    head: str | None = "deeplabv2"
    output_stride: int | None = 8
    freeze_backbone: bool = True  # the clip backbone only (a torchvision ResNet is fine-tuned, as MaskCLIP+)
    normalize_features: bool = True  # the clip backbone only
    head_context: int | None = 0  # the maskclip head's residual 3×3 context branch (hidden channels; 0: none)
    backbone_weights: str | None = "imagenet"
    require_pretrained: bool = False
    background: bool = False
    optimizer: str = "sgd"
    lr: float | None = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    power: float = 0.9
    min_lr: float = 1e-4
    max_iters: int | None = 20000
    switch_iter: int | None = 2000
    global_batch: int | None = 16
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
    # calibrated stacking after training (training/calibrate_student.py): "auto" (the rule) or a fixed penalty;
    # not a resume key, since it changes nothing before the last iteration
    seen_penalty: str | float = "auto"
    calibration_images: int = 300

    @property
    def schedule(self) -> LRSchedule:
        # mmseg's schedule_{20,40,80}k: poly, power 0.9, min_lr 1e-4, no warmup.
        return LRSchedule(self.lr, self.max_iters, warmup_iters=0, policy="poly", power=self.power,
                          min_lr=self.min_lr)


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p, "run folder (checkpoints, log.jsonl, student, eval)")
    p.add_argument("--prompts", required=True,
                   help="MVP-SEG prompt checkpoint (.safetensors + .json from training.train_prompts), or a "
                        "handcrafted set (maskclip-85 | parts | a-photo-of) for a MaskCLIP+ baseline")
    g = p.add_argument_group("student")
    g.add_argument("--backbone", default=None,
                   help="resnet18 | resnet34 | resnet50 | resnet101 | resnet152 | resnet-tiny | clip (the CLIP's "
                        "own ResNet image tower with MaskCLIP's projection as head: the student starts at its "
                        "teacher; docs/distill.md). Default: resnet101 on the benchmarks (MaskCLIP+), elsewhere "
                        "clip for a ResNet CLIP")
    g.add_argument("--head", default=None, choices=["deeplabv2", "deeplabv3plus", MASKCLIP_HEAD],
                   help="default: maskclip with --backbone clip, else deeplabv3plus for Context, deeplabv2 otherwise")
    g.add_argument("--output-stride", type=int, default=None, choices=[8, 16, 32],
                   help="student backbone dilation (default 8; the clip backbone 16)")
    g.add_argument("--train-clip-tower", action="store_true",
                   help="with --backbone clip: fine-tune the tower too (default: frozen, only the head learns)")
    g.add_argument("--head-context", type=int, default=None, metavar="C",
                   help="maskclip head: a residual 3×3 context branch with C hidden channels, starting at zero "
                        "(default 128; 0: the projection alone)")
    g.add_argument("--unnormalized-features", action="store_true",
                   help="with --backbone clip: MaskCLIP+'s unnormalised features instead of unit norm × a scale")
    g.add_argument("--backbone-weights", default="imagenet",
                   help="imagenet | imagenet-v2 | none | PATH (.pth / .safetensors torchvision state dict)")
    g.add_argument("--require-pretrained", action="store_true",
                   help="fail instead of falling back to random init when ImageNet weights are unavailable")
    g.add_argument("--background", default="auto", choices=["auto", "on", "off"],
                   help="learnable background embedding (auto: when class 0 is 'background')")
    g = p.add_argument_group("schedule (defaults: MaskCLIP+'s on the benchmarks, elsewhere sized to the data and "
                             "the device at start: training/distill_schedule.py)")
    g.add_argument("--max-iters", type=int, default=None, help="VOC 20k, Context 40k, COCO-Stuff 80k")
    g.add_argument("--switch-iter", type=int, default=None, help="end of MVP-SEG guidance (default 1/10)")
    g.add_argument("--lr", type=float, default=None, help="0.01 (Context 0.004); the clip backbone: 0.2")
    g.add_argument("--weight-decay", type=float, default=None, help="5e-4 (Context 1e-4)")
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"], help="sgd: MaskCLIP+'s")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--power", type=float, default=0.9)
    g.add_argument("--min-lr", type=float, default=1e-4)
    g.add_argument("--global-batch", type=int, default=None,
                   help="images per step over all processes (benchmarks 16; elsewhere 8 on a CPU, 16 on a GPU)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--crop-size", type=int, default=None, help="default: 512 (480 for Context)")
    g.add_argument("--train-scale", type=int, nargs=2, default=None, metavar=("LONG", "SHORT"),
                   help="mmcv img_scale of the random resize (default: the dataset's)")
    g.add_argument("--no-teacher-gpr", action="store_true", help="pseudo labels from Eq. 4 instead of Eq. 8")
    g = p.add_argument_group("calibrated stacking (after training; docs/distill.md)")
    g.add_argument("--seen-penalty", type=parse_penalty, default=AUTO,
                   help="lower the seen classes' logits by this at test time; auto (default): the penalty that "
                        "balances seen-class recall and unseen-pixel recall on the training images; 0: off")
    g.add_argument("--calibration-images", type=int, default=DEFAULT_IMAGES,
                   help="training images the auto penalty is chosen on (default 300)")
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
    g.add_argument("--save-confusions", action="store_true",
                   help="also write <out>/confusions.npz: per method, the per-image confusion matrices (one process)")
    g.add_argument("--skip-missing", action="store_true", help="drop samples whose files are missing and skip unreadable ones (logged)")
    g.add_argument("--cache-samples", action="store_true",
                   help="keep decoded training samples in memory (small datasets, the procedural toy world)")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # interruption, for tests
    add_clip_args(p)
    add_runtime_args(p)
    add_tensorboard_args(p)
    return p


def config_from_args(a: argparse.Namespace) -> DistillConfig:
    """The run's settings. The benchmarks get MaskCLIP+'s where the command line is silent; elsewhere what it
    leaves out stays None here and is sized at start (``resolve_defaults``)."""
    name = get_profile(a.dataset).name
    d = BENCHMARK_DEFAULTS.get(name)
    max_iters = a.max_iters if a.max_iters is not None else (d["max_iters"] if d else None)
    switch = a.switch_iter
    if switch is None and max_iters is not None and (d or a.max_iters is not None):
        switch = default_switch_iter(max_iters)
    if switch is not None and max_iters is not None and not 0 <= switch <= max_iters:
        raise SystemExit(f"--switch-iter {switch} must lie in [0, --max-iters {max_iters}]")
    if (a.head == MASKCLIP_HEAD and a.backbone not in (None, CLIP_BACKBONE)) or (
            a.backbone == CLIP_BACKBONE and a.head not in (None, MASKCLIP_HEAD)):
        raise SystemExit(f"--head {MASKCLIP_HEAD} and --backbone {CLIP_BACKBONE} go together (MaskCLIP's projection is "
                         f"the CLIP tower's own), got --backbone {a.backbone} --head {a.head}")
    if a.seen_penalty == AUTO and a.calibration_images < 1:
        raise SystemExit(f"--calibration-images must be ≥ 1 with --seen-penalty auto, got {a.calibration_images}")
    backbone = a.backbone or ("resnet101" if d else None)
    head = a.head or (MASKCLIP_HEAD if backbone == CLIP_BACKBONE else d["head"] if d else None)
    weights = None if str(a.backbone_weights).lower() in ("none", "random") else a.backbone_weights
    return DistillConfig(
        dataset=name, data_root=str(a.data_root), out=str(a.out), prompts=str(a.prompts), split=a.split,
        backbone=backbone, head=head, output_stride=a.output_stride, backbone_weights=weights,
        freeze_backbone=not a.train_clip_tower, normalize_features=not a.unnormalized_features,
        head_context=a.head_context,
        require_pretrained=a.require_pretrained,
        lr=a.lr if a.lr is not None else (d["lr"] if d and backbone != CLIP_BACKBONE else None),
        optimizer=a.optimizer, momentum=a.momentum,
        weight_decay=a.weight_decay if a.weight_decay is not None else (d["weight_decay"] if d else 5e-4),
        power=a.power, min_lr=a.min_lr, max_iters=max_iters, switch_iter=switch,
        global_batch=a.global_batch if a.global_batch is not None else (16 if d else None),
        seed=a.seed, crop_size=a.crop_size, train_scale=tuple(a.train_scale) if a.train_scale else None,
        teacher_gpr=not a.no_teacher_gpr, ckpt_every=a.ckpt_every, keep_ckpts=a.keep_ckpts,
        eval_split=a.eval_split, eval_scale=tuple(a.eval_scale) if a.eval_scale else None,
        eval_limit=a.eval_limit, eval_teacher=not a.no_eval_teacher,
        skip_missing=a.skip_missing, clip=a.clip, pretrained=a.pretrained, dense=getattr(a, "dense", None),
        sliding=tuple(a.sliding) if getattr(a, "sliding", None) else None,
        seen_penalty=a.seen_penalty, calibration_images=a.calibration_images)


def load_teacher_prompts(spec: str, clip: FrozenCLIP) -> tuple[PromptSet, float]:
    """(prompt set, γ): a learned checkpoint (checked against ``clip``) or a handcrafted set by name."""
    handcrafted = baseline_prompt_sets()
    if spec in handcrafted:
        return handcrafted[spec].to(clip.device).eval(), 10.0
    prompts = load_prompts(spec, clip, name="mvp-seg")
    return prompts.eval(), float(prompts.meta.gamma)


def config_record(cfg: DistillConfig) -> dict:
    d = asdict(cfg)
    for key in ("train_scale", "eval_scale", "sliding"):  # tuples read back from JSON as lists
        d[key] = list(d[key]) if d[key] else None
    return d
