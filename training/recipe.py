"""The prompt-learning configuration: Table 1 variants, the learning recipes, the command line, the optimiser.

``--recipe default`` is the recipe docs/recipe.md measured (AdamW, constant lr, λ_OC on a mean over prompt
pairs, a warm start fitted to the 85-template embeddings plus an anchor to them, temperatures calibrated
before learning, fresh samples from procedural datasets, selection on held-out seen classes); ``--recipe
paper`` is sec. 4.3 as printed. An option given on the command line overrides its recipe's value.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

import torch

from mvpseg.learning import OPTIMIZERS, LearnRecipe
from mvpseg.learning import build_optimizer as _build_optimizer
from mvpseg.losses import LossWeights

from .cli import add_clip_args, add_data_args, add_runtime_args
from .datasets import get_profile, ignores_background
from .gpr_options import add_gpr_args, gpr_branch
from .schedule import LRSchedule
from .selection import SELECT_MODES
from .tensorboard_log import add_tensorboard_args

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
                    seg_reduction="pixel", init_fit=200, lambda_prior=8.0, init_fit_oc=False,
                    calib_steps=50, cls_mode="paper", residual=True, gpr_bias=False, gpr_select="joint",
                    gpr_adapter=0, gpr_iters=0, gpr_pool=0, gpr_batch=32, gpr_fit=0, gpr_shifts=1,
                    gpr_floor=None),
    "paper": dict(optimizer="sgd", lr=2e-4, lr_policy="poly", warmup_iters=1000, max_iters=8000,
                  global_batch=8, weight_decay=5e-4, lambda_oc="paper", select="none", fresh="off",
                  seg_reduction="pixel", init_fit=0, lambda_prior=0.0, init_fit_oc=False,
                  calib_steps=0, cls_mode="bce", residual=False, gpr_bias=False, gpr_select="joint",
                  gpr_adapter=0, gpr_iters=0, gpr_pool=0, gpr_batch=32, gpr_fit=0, gpr_shifts=1,
                  gpr_floor=None),
}
# Handcrafted sets the warm start and anchor can use (names of mvpseg.baseline_prompt_sets(); the first is the
# fallback), or "auto": the best of them on the validation images (train_prompts.choose_prior).
# Where the dataset ignores its background (VOC's protocol; training.datasets.ignores_background) a recipe may
# set other defaults: calibrated GPR on row 4's own views (H-GPR5, rule R28e, docs/history/gpr-views-study.md),
# its reading of the features refitted after training and averaged over 2 × 2 sub-cell shifts (H-GPR9,
# docs/history/gpr-presence-fix-study.md), the refitted logits at most 2 below the prompts' own (H-GPR10,
# docs/history/gpr-floor-study.md). Where the variant has no global prompt these do not apply.
BACKGROUND_IGNORED = {"default": dict(cls_mode="bce", gpr_bias="on", gpr_select="views", gpr_fit=6000,
                                      gpr_shifts=2, gpr_floor=2.0)}
HANDCRAFTED = ("maskclip-85", "a-photo-of", "parts")
PRIOR_CHOICES = ("auto", *HANDCRAFTED)
# Settings a resumed run must share with its checkpoint.
RESUME_KEYS = ("dataset", "split", "n_seg", "n_ctx", "use_global", "gamma", "lambda_seg", "text_encoder",
               "lambda_cls", "lambda_oc", "cls_mode", "optimizer", "lr", "momentum", "weight_decay",
               "warmup_iters", "warmup_ratio", "lr_policy", "max_iters", "global_batch", "seed",
               "crop_size", "train_scale", "clip", "pretrained", "select", "holdout_frac", "val_images",
               "val_every", "patience", "select_confidence", "fresh", "lambda_prior", "tau1_init",
               "seg_reduction", "init_fit", "prior_prompts", "dense", "sliding", "gpr_bias", "residual",
               "gpr_select", "gpr_adapter", "gpr_iters", "gpr_pool", "gpr_batch", "gpr_fit", "gpr_fit_width",
               "gpr_fit_steps")
# Settings that only matter while selecting a model: a run with --select none ignores them, so they are not
# compared on resume (a state written before they existed resumes under any of their values).
SELECTION_KEYS = ("holdout_frac", "val_images", "val_every", "patience", "select_confidence")


def resume_keys(cfg: "TrainConfig") -> tuple[str, ...]:
    """RESUME_KEYS that this configuration's result depends on: selection settings only when it selects, the
    handcrafted prior only when something uses it (warm start or anchor)."""
    unused = set(SELECTION_KEYS) if cfg.select == "none" else set()
    if not cfg.learn_recipe.uses_prior:
        unused.add("prior_prompts")
    return tuple(k for k in RESUME_KEYS if k not in unused)


# What states written before these settings existed implicitly used.
LEGACY_DEFAULTS = {"optimizer": "sgd", "select": "none", "holdout_frac": 0.25, "val_images": 64,
                   "val_every": 50, "patience": 4, "select_confidence": 0.0, "fresh": "off",
                   "lambda_prior": 0.0, "tau1_init": None,
                   "seg_reduction": "pixel", "init_fit": 0, "prior_prompts": "maskclip-85", "sliding": None,
                   "gpr_bias": False, "residual": False, "gpr_select": "joint",
                   "gpr_adapter": 0, "gpr_iters": 0, "gpr_pool": 0, "gpr_batch": 32, "gpr_fit": 0,
                   "gpr_fit_width": 128, "gpr_fit_steps": 1500}
# (a state written before "dense" existed used the tower's default mode: train_prompts adds it per tower)


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
    cls_mode: str = "paper"
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
    select_confidence: float = 0.9  # a new best must win ≥ this share of paired bootstrap resamples
    fresh: str = "auto"  # auto | on | off: fresh samples from a procedural dataset (auto: when it is one)
    lambda_prior: float = 8.0  # pull of the mean view towards the 85-template embeddings (KgCoOp-style)
    tau1_init: float | None = None  # None: 100/k
    seg_reduction: str = "pixel"  # L_seg: mean over pixels (paper) | over classes (mvpseg.losses.seg_loss)
    init_fit: int = 200  # text-only steps fitting every view to the handcrafted embeddings before training
    init_fit_lr: float = 2e-3  # AdamW lr of those steps (its own: the warm start must not change with --lr)
    init_fit_oc: bool = False  # those steps also minimise λ_OC · L_OC, so the views start apart (docs/history/recipe-addenda.md, 4th/6th addenda)
    calib_steps: int = 50  # Adam steps fitting log τ1/log τ2 alone before learning (context frozen)
    calib_lr: float = 0.05
    gpr_bias: bool = False  # calibrated GPR: a learned logit offset in Eq. 6 (LearnedPrompts.enable_gpr_bias)
    # which iterate the global prompt (its context, τ2, β) comes from: "joint" = the selected one, as the
    # segmentation views; "last" = the final one (GPR_SELECT_MODES, training/selection.py)
    gpr_select: str = "joint"
    # the GPR adapter φ's hidden width (0 = none: Eq. 6 on the frozen features; mvpseg/gpr_adapter.py)
    gpr_adapter: int = 0
    # with gpr_select "views": the global branch trains to max(max_iters, gpr_iters), alone after the views stop
    gpr_iters: int = 0
    # ... drawing minibatches of gpr_batch images from the frozen features of gpr_pool training images (0: the
    # training stream's batches; training/gpr_pool.py)
    gpr_pool: int = 0
    gpr_batch: int = 32
    # after training: a fresh GPR adapter of gpr_fit_width, τ2 and β fitted on the frozen features of gpr_fit
    # training images, the shipped prompts fixed (0: none; mvpseg.learning.gpr_fit, H-GPR7)
    gpr_fit: int = 0
    gpr_fit_width: int = 128
    gpr_fit_steps: int = 1500
    # at inference, GPR averages Eq. 6 over k × k sub-cell shifts of the image (mvpseg/gpr_shifts.py); recorded in
    # the prompt checkpoint, training is unchanged
    gpr_shifts: int = 1
    # gpr_fit / gpr_shifts are the recipe's, not the command line's: dropped where the training set holds fewer
    # distinct images than gpr_fit (training.gpr_pool.fit_for_dataset)
    gpr_fit_auto: bool = False
    gpr_shifts_auto: bool = False
    # the refitted GPR logits may fall at most gpr_floor below the prompts' own reading (mvpseg/gpr_floor.py;
    # None: no floor); the recipe's goes with its fit
    gpr_floor: float | None = None
    gpr_floor_auto: bool = False
    prior_prompts: str = "auto"  # handcrafted set behind the warm start, the anchor and the residual form
    residual: bool = True  # t = norm(h + e − e0): exactly handcrafted at the start (LearnedPrompts.set_prior)
    crop_size: int | None = None
    train_scale: tuple[int, int] | None = None
    ckpt_every: int = 500
    keep_ckpts: int = 2
    text_checkpointing: bool = False
    text_encoder: str = "shared-prefix"
    skip_missing: bool = False
    clip: str = "RN50"
    pretrained: str | None = "openai"
    # dense features the prompts are learned on (--dense; None until the CLIP is loaded, then its resolved
    # mode: train_prompts records the resolved one, so --resume compares modes, not flags) and --sliding
    dense: str | None = None
    sliding: tuple[int, int] | None = None

    @property
    def loss_weights(self) -> LossWeights:
        return LossWeights(seg=self.lambda_seg, cls=self.lambda_cls if self.use_global else 0.0,
                           oc=self.lambda_oc)

    @property
    def learn_recipe(self) -> LearnRecipe:
        """What each learning step does (``mvpseg.learning``, shared with the demo's Learn tab)."""
        return LearnRecipe(optimizer=self.optimizer, lr=self.lr, momentum=self.momentum,
                           weight_decay=self.weight_decay, lambda_seg=self.lambda_seg, lambda_cls=self.lambda_cls,
                           lambda_oc=self.lambda_oc, cls_mode=self.cls_mode, seg_reduction=self.seg_reduction,
                           lambda_prior=self.lambda_prior, init_fit=self.init_fit, init_fit_lr=self.init_fit_lr,
                           init_fit_oc=self.init_fit_oc, calib_steps=self.calib_steps, calib_lr=self.calib_lr,
                           residual=self.residual)

    @property
    def total_iters(self) -> int:
        """Iterations of the run: ``max_iters`` for the views (and everything without ``gpr_select`` views), up to
        ``gpr_iters`` for the global branch alone."""
        views = self.use_global and self.gpr_select == "views"
        return max(self.max_iters, self.gpr_iters) if views else self.max_iters

    @property
    def schedule(self) -> LRSchedule:
        """The lr schedule over every iteration of the run (``total_iters``)."""
        return LRSchedule(self.lr, self.total_iters, self.warmup_iters, self.warmup_ratio,
                          self.lr_policy)


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description or __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
                   help="pull of each class's mean view embedding towards its --prior-prompts embedding "
                        "(KgCoOp-style, 0 = off; docs/recipe.md)")
    p.add_argument("--prior-prompts", default="auto", choices=PRIOR_CHOICES,
                   help="handcrafted set the warm start fits and the anchor pulls towards; auto: the best of "
                        "them on the validation images' seen classes (paired bootstrap; 85 templates unless "
                        "another wins with --select-confidence; without validation: the 85 templates)")
    p.add_argument("--tau1-init", type=float, default=None, help="initial τ1 (default 100/k)")
    p.add_argument("--init-fit", type=int, default=None,
                   help="text-only AdamW steps that first fit every prompt's class embeddings to the handcrafted "
                        "ones of --prior-prompts (a handcrafted starting point for 32 context tokens; 0 = random start)")
    p.add_argument("--init-fit-oc", default=None, choices=["on", "off"],
                   help="the warm start also minimises the training's λ_OC · L_OC, so the views start orthogonal "
                        "instead of identical (default: the recipe's)")
    p.add_argument("--calib-steps", type=int, default=None,
                   help="before learning, fit only the temperatures (log τ1, log τ2; context frozen) for this many "
                        "Adam steps with the training loss, so the context does not do the temperature's job "
                        "(default: the recipe's; 0 = off; docs/recipe.md)")
    p.add_argument("--calib-lr", type=float, default=0.05, help="Adam lr of the --calib-steps (on log τ)")
    p.add_argument("--init-fit-lr", type=float, default=2e-3,
                   help="AdamW learning rate of the --init-fit steps (independent of --lr)")
    p.add_argument("--seg-reduction", default=None, choices=["pixel", "class"],
                   help="L_seg mean over labelled pixels (paper) or over the classes present (mIoU's weighting)")
    p.add_argument("--cls-loss", dest="cls_mode", default=None, choices=["bce", "paper"],
                   help="L_cls: paper = Eq. 7 as printed (present classes only, so g_c → 1 and GPR turns neutral); "
                        "bce = binary cross-entropy over all classes (GPR can suppress absent ones). Default: the "
                        "recipe's (default: paper, docs/history/recipe-addenda.md, ninth addendum, but bce where "
                        "the dataset ignores its background, as VOC: docs/recipe.md; paper: bce)")
    add_gpr_args(p)
    p.add_argument("--residual", default=None, choices=["on", "off"],
                   help="residual prompts: every class embedding is the handcrafted prior's plus the change of the "
                        "learned context's embedding since the warm start, so learning starts from the handcrafted "
                        "classifier exactly (docs/recipe.md). Default: the recipe's (default: on; paper: off)")
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
                   help="holdout: mIoU of held-out *seen* classes on held-out images; seen: mIoU "
                        "over seen classes; none: keep the final iterate")
    g.add_argument("--holdout-frac", type=float, default=0.25,
                   help="share of seen classes held out of training for --select holdout")
    g.add_argument("--val-images", type=int, default=64,
                   help="validation images taken out of the training split (at most a fifth of it)")
    g.add_argument("--val-every", type=int, default=50, help="iterations between validations")
    g.add_argument("--select-confidence", type=float, default=0.9,
                   help="a validation replaces the best only if it scores higher in at least this share of "
                        "paired bootstrap resamples of the validation images (0: any higher score)")
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
                   help="drop (and count) samples whose files are missing, and replace a sample that turns out "
                        "unreadable when drawn by the next readable one (logged), instead of failing")
    p.add_argument("--simulate-kill-at", type=int, default=None, help=argparse.SUPPRESS)
    add_clip_args(p)
    add_runtime_args(p)
    add_tensorboard_args(p)
    return p


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    v, r = VARIANTS[a.variant], dict(RECIPES[a.recipe])
    if a.recipe in BACKGROUND_IGNORED and ignores_background(a.dataset, a.data_root):
        r.update(BACKGROUND_IGNORED[a.recipe])

    def pick(name):  # explicit option, else the recipe's default (for this dataset)
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
        lambda_cls=a.lambda_cls, lambda_oc=lambda_oc, cls_mode=pick("cls_mode"), optimizer=pick("optimizer"),
        lr=pick("lr"), momentum=a.momentum, weight_decay=pick("weight_decay"),
        warmup_iters=pick("warmup_iters"), warmup_ratio=a.warmup_ratio, lr_policy=pick("lr_policy"),
        max_iters=pick("max_iters"), global_batch=pick("global_batch"), seed=a.seed, crop_size=a.crop_size,
        train_scale=tuple(a.train_scale) if a.train_scale else None, ckpt_every=a.ckpt_every,
        keep_ckpts=a.keep_ckpts, text_checkpointing=a.text_checkpointing, text_encoder=a.text_encoder,
        skip_missing=a.skip_missing, clip=a.clip, pretrained=a.pretrained, recipe=a.recipe,
        select=pick("select"), holdout_frac=a.holdout_frac, val_images=a.val_images, val_every=a.val_every,
        patience=a.patience, select_confidence=a.select_confidence, fresh=pick("fresh"),
        lambda_prior=pick("lambda_prior"), tau1_init=a.tau1_init, seg_reduction=pick("seg_reduction"),
        init_fit=pick("init_fit"), init_fit_lr=a.init_fit_lr, init_fit_oc=pick("init_fit_oc") in (True, "on"),
        calib_steps=pick("calib_steps"), calib_lr=a.calib_lr,
        gpr_bias=pick("gpr_bias") in (True, "on") and v["use_global"] and not a.no_global,
        prior_prompts=a.prior_prompts, dense=getattr(a, "dense", None),
        residual=pick("residual") in (True, "on"), gpr_select=pick("gpr_select"),
        **gpr_branch(a, pick, v["use_global"] and not a.no_global),
        sliding=tuple(a.sliding) if getattr(a, "sliding", None) else None,
    )


def _config_record(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d["train_scale"] = list(cfg.train_scale) if cfg.train_scale else None
    d["sliding"] = list(cfg.sliding) if cfg.sliding else None
    return d


def build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """The optimiser of ``cfg``'s recipe (``mvpseg.learning.build_optimizer``)."""
    return _build_optimizer(cfg.learn_recipe, params)
