"""The command line of GPR's branch — calibration, which iterate it comes from, the adapter, the global-only
phase and its pool, the fit after training, its shifts and its floor — and how a recipe's defaults for them
resolve against what is asked (``gpr_branch``): a recipe's GPR settings apply only where they can, and the ones
that go together (the fit, its shifts, its floor) are dropped together.
"""
from __future__ import annotations

import argparse

from .selection import GPR_SELECT_MODES


def add_gpr_args(p: argparse.ArgumentParser) -> None:
    """The GPR-branch options of ``train_prompts`` (each None by default: the recipe's value)."""
    g = p.add_argument_group("GPR's branch (Eq. 6-8; docs/recipe.md)")
    g.add_argument("--gpr-bias", default=None, choices=["on", "off"],
                   help="calibrated GPR: learn a logit offset β in Eq. 6, g_c = σ(s_c/τ2 − β) (with a global prompt "
                        "only; docs/history/gpr-study.md). Off: the paper's Eq. 6. Default: off, but on under "
                        "--recipe default where the dataset ignores its background (VOC)")
    g.add_argument("--gpr-select", default=None, choices=list(GPR_SELECT_MODES),
                   help="which iterate the global prompt, τ2 and the GPR bias come from: joint = the one selected "
                        "on the segmentation views' validation (default); last = the final one, trained for all "
                        "--max-iters (no early stop), while the segmentation views keep the selected iterate "
                        "(docs/history/gpr-study.md); views = the final one too, while the views are scored "
                        "without GPR and selected with early stopping exactly as without a global prompt (Table 1 "
                        "row 4's views; docs/history/gpr-views-study.md). Default: joint, but views under --recipe "
                        "default where the dataset ignores its background (VOC)")
    g.add_argument("--gpr-adapter", type=int, default=None, metavar="WIDTH",
                   help="GPR reads the dense features through a learned class-agnostic residual MLP of this hidden "
                        "width (mvpseg/gpr_adapter.py; 0 = off, Eq. 6 as printed). Default: the recipe's (0)")
    g.add_argument("--gpr-iters", type=int, default=None, metavar="N",
                   help="with --gpr-select views: the global branch (global prompt, τ2, bias, adapter) trains to "
                        "iteration N, alone once the views' selection has stopped (the views stop by --max-iters at "
                        "the latest). Default: the recipe's (0: --max-iters)")
    g.add_argument("--gpr-pool", type=int, default=None, metavar="N",
                   help="with --gpr-select views: the global branch's steps after the views stop draw minibatches of "
                        "--gpr-batch images from the frozen dense features of N training images, computed once and "
                        "kept in memory (training/gpr_pool.py; 0 = the training stream's batches). Default: the "
                        "recipe's (0)")
    g.add_argument("--gpr-batch", type=int, default=None, metavar="B",
                   help="images per step drawn from the --gpr-pool (over all processes). Default: the recipe's (32)")
    g.add_argument("--gpr-fit", type=int, default=None, metavar="N",
                   help="after training, fit GPR's reading of the features — a new GPR adapter, τ2 and the bias — on "
                        "the presence of the seen classes in N training images' frozen dense features, the learned "
                        "prompts fixed (mvpseg/learning/gpr_fit.py; 0 = off). Default: the recipe's (--recipe "
                        "default: 6000 where the background is ignored, else 0)")
    g.add_argument("--gpr-fit-width", type=int, default=128, metavar="WIDTH",
                   help="hidden width of the adapter --gpr-fit fits (default 128)")
    g.add_argument("--gpr-fit-steps", type=int, default=1500, metavar="N",
                   help="Adam steps of --gpr-fit, minibatches of 256 images (default 1500)")
    g.add_argument("--gpr-shifts", type=int, default=None, metavar="K",
                   help="the prompts' GPR averages Eq. 6 over K × K sub-cell shifts of the image at inference "
                        "(mvpseg/gpr_shifts.py; recorded in the checkpoint, training unchanged). Default: the "
                        "recipe's (--recipe default: 2 where the background is ignored, else 1: the image alone)")
    g.add_argument("--gpr-floor", default=None, metavar="M",
                   help="with --gpr-fit or --gpr-shifts: the refitted GPR logits may fall at most M below the "
                        "prompts' own Eq. 6 reading before the fit, so the fit cannot take an unseen class away "
                        "(mvpseg/gpr_floor.py, H-GPR10; recorded in the checkpoint). 'off': no floor. Default: the "
                        "recipe's (--recipe default: 2 with the recipe's fit, else off)")


def gpr_branch(a: argparse.Namespace, pick, use_global: bool) -> dict:
    """The GPR-branch options (adapter, global-only iterations and pool, the fit after training, shifts, floor) as
    TrainConfig fields: a recipe's defaults apply only where they can (a global prompt; gpr_iters and gpr_pool with
    --gpr-select views; the floor with a fit or shifts); given explicitly where they cannot, they are refused.
    ``pick(name)``: the option if given, else the recipe's value."""
    width, iters, views = pick("gpr_adapter"), pick("gpr_iters"), pick("gpr_select") == "views"
    pool, batch, fit, shifts = pick("gpr_pool"), pick("gpr_batch"), pick("gpr_fit"), pick("gpr_shifts")
    floor = _floor_margin(pick("gpr_floor"))
    if min(width, iters, pool, fit) < 0 or min(batch, a.gpr_fit_width, a.gpr_fit_steps) < 1:
        raise SystemExit("--gpr-adapter, --gpr-iters, --gpr-pool and --gpr-fit must be >= 0, --gpr-batch, "
                         "--gpr-fit-width and --gpr-fit-steps >= 1")
    if shifts < 1:
        raise SystemExit("--gpr-shifts must be >= 1")
    for flag, value in (("--gpr-adapter", a.gpr_adapter), ("--gpr-fit", a.gpr_fit),
                        ("--gpr-shifts", (a.gpr_shifts or 1) - 1)):
        if value and not use_global:
            raise SystemExit(f"{flag} needs a global prompt (--variant mvpseg without --no-global)")
    if width and fit and a.gpr_fit is None:  # an adapter asked for wins over the recipe's fit (shifts, floor)
        fit, shifts = 0, shifts if a.gpr_shifts is not None else 1
        floor = floor if a.gpr_floor is not None else None
    if floor is not None and not (use_global and (fit or shifts > 1)):
        if a.gpr_floor is not None and a.gpr_floor != "off":
            raise SystemExit("--gpr-floor bounds a refitted GPR: it needs --gpr-fit or --gpr-shifts")
        floor = None
    if width and fit:  # the fit replaces any adapter: training one before it would be thrown away
        raise SystemExit("--gpr-adapter and --gpr-fit exclude each other (--gpr-fit fits its own adapter)")
    for flag, value in (("--gpr-iters", a.gpr_iters), ("--gpr-pool", a.gpr_pool)):
        if value and not (use_global and views):
            raise SystemExit(f"{flag} needs a global prompt and --gpr-select views")
    on = use_global and views
    return {"gpr_adapter": width if use_global else 0, "gpr_iters": iters if on else 0,
            "gpr_pool": pool if on else 0, "gpr_batch": batch, "gpr_fit": fit if use_global else 0,
            "gpr_fit_width": a.gpr_fit_width, "gpr_fit_steps": a.gpr_fit_steps,
            "gpr_shifts": shifts if use_global else 1,
            "gpr_fit_auto": bool(use_global and fit and a.gpr_fit is None),
            "gpr_shifts_auto": bool(use_global and shifts > 1 and a.gpr_shifts is None),
            "gpr_floor": floor, "gpr_floor_auto": bool(floor is not None and a.gpr_floor is None)}


def _floor_margin(value) -> float | None:
    """--gpr-floor's value (a number, 'off', or the recipe's float / None) as a margin ≥ 0 or None."""
    if value is None or value == "off":
        return None
    try:
        margin = float(value)
    except ValueError:
        raise SystemExit(f"--gpr-floor takes a margin in logits (>= 0) or 'off', got {value!r}") from None
    if not margin >= 0 or margin == float("inf"):
        raise SystemExit(f"--gpr-floor must be a finite margin >= 0, got {value!r}")
    return margin
