"""Which parts of the prompt-learning recipe make learned prompts generalise to unseen classes (docs/recipe.md).

For every world × seed, each *arm* is one ``training/train_prompts.py`` run (``--dataset toyworld``, seen
classes only) and all arms plus the three handcrafted prompt sets are scored by ``training/evaluate.py`` on
one fixed evaluation set (split ``val``, seed 0, all classes), so the script adds no training or evaluation
logic of its own. Arms: the default recipe, the default with one element reverted at a time
(leave-one-out), and the recipe documented before (the issue's 20.6 row). Training uses ``seed`` both for
the prompts and for the world's training scenes; model selection inside training only ever sees training
scenes and seen classes.

    python benchmarks/recipe_ablation.py --out runs/recipe                # everything in docs/recipe.md
    python benchmarks/recipe_ablation.py --worlds sparse --seeds 0 --arms default old --out /tmp/r
    python benchmarks/recipe_ablation.py --worlds sparse --seeds 0 --arms default --dense clearclip \
        --model-config assets/toyclip-vit/toyclip-vit.json --weights assets/toyclip-vit/toyclip-vit.safetensors

Prints per-world tables (mean ± sd over seeds of mIoU(U) and hIoU, and each arm's margin over the best
handcrafted set per seed) and writes ``<out>/summary.md`` / ``summary.json``; finished runs are reused.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# World name → toyworld spec (without length/seed). "medium-b" was designed for this study: another layout
# *and* another zero-shot split (training/toyworld.py, UNSEEN_SPLITS["b"]).
WORLDS = {"sparse": "world=sparse", "crowded": "world=crowded", "medium-b": "world=medium,unseen=b",
          # designed for the second addendum (docs/history/recipe-addenda.md): crowded layout, a third zero-shot split
          "crowded-c": "world=crowded,unseen=c",
          # designed for the third addendum (confirmation only: nothing tuned or looked at on them before)
          "sparse-c": "world=sparse,unseen=c", "medium-a": "world=medium", "crowded-b": "world=crowded,unseen=b",
          # designed for the tenth addendum (a last check of the final default; nothing run on them before)
          "sparse-b": "world=sparse,unseen=b", "medium-c": "world=medium,unseen=c",
          # need the zoom-2 toy CLIP: --model-config assets/toyclip-zoom2/toyclip-zoom2.json --weights ...
          "sparse-zoom2": "world=sparse,zoom=2", "medium-zoom2": "world=medium,zoom=2",
          # designed for the eleventh addendum (is the crowded-layout tie the layout's or the CLIP's?)
          "crowded-zoom2": "world=crowded,zoom=2",
          # the VOC-like layout (issues #24/#27/#28; docs/history/gpr-study.md): creatures only, background and
          # stuff ignored
          "voc": "world=voc,background=ignore,stuff=ignore",
          "voc-zoom2": "world=voc,background=ignore,stuff=ignore,zoom=2"}  # with the zoom-2 toy CLIP
# Arm → train_prompts arguments on top of the defaults ("old": the recipe documented before this study,
# the 20.6 row: SGD lr 2e-3, 40 warm-up, poly, 400 it × batch 8 on a fixed pool of 400 scenes,
# λ3 = 100 on Eq. 5's sum, final iterate). Arms ride on the *current* defaults: the runs docs/recipe.md reports
# before its ninth addendum had the full-BCE L_cls as the default (add "--cls-loss bce" to rerun them as run).
# The GPR fit and shifts became the default where the background is ignored with H-GPR9, and the floor under the
# fit with H-GPR10; the arms of the studies before each pin it off, so that each keeps measuring what it measured.
NO_FIT = ["--gpr-fit", "0", "--gpr-shifts", "1"]
NO_FLOOR = ["--gpr-floor", "off"]
VIEWS_GPR = ["--cls-loss", "bce", "--gpr-bias", "on", "--gpr-select", "views"]  # calibrated GPR on row 4's views
ARMS: dict[str, list[str]] = {
    "default": [],
    "plain": ["--residual", "off"],  # the default before issue #27's study: prompts not in residual form
    # pilots of issue #27's study (docs/history/transfer-study.md): more validation images for selection
    "val256": ["--val-images", "256"],
    "plain-val256": ["--residual", "off", "--val-images", "256"],
    "class-seg": ["--seg-reduction", "class"],  # class-balanced L_seg (first addendum of transfer-study.md)
    "no-prior": ["--lambda-prior", "0"],  # warm start kept, no pull while learning
    "no-warm-start": ["--init-fit", "0"],  # random start (CoOp's), pull kept
    "no-anchor": ["--lambda-prior", "0", "--init-fit", "0"],  # neither: the independent recipe + GPR
    "oc-100": ["--recipe", "default", "--lambda-oc", "300"],  # = the paper's 100 on the sum over 3 pairs
    "no-gpr": ["--variant", "multi-oc"],
    "fixed-pool": ["--fresh", "off"],
    # the same fixed pool with calibrated GPR on row 4's views but no fit (H-GPR9's small-dataset check)
    "fixed-pool-views": ["--fresh", "off", *VIEWS_GPR, *NO_FIT],
    "no-select": ["--select", "none"],
    "sgd-poly": ["--optimizer", "sgd", "--warmup-iters", "40", "--lr-policy", "poly"],
    "tau1-100": ["--tau1-init", "100"],
    "cls-paper": ["--cls-loss", "paper", *NO_FIT],  # Eq. 7 as printed (present classes only): the default since addendum 9
    "cls-bce": ["--cls-loss", "bce", *NO_FIT],  # the full BCE over all classes: the default before the ninth addendum
    "gpr-bias": ["--cls-loss", "bce", "--gpr-bias", "on", *NO_FIT],  # calibrated GPR (H-GPR1, docs/history/gpr-study.md)
    # calibrated GPR whose global prompt comes from the last iterate (H-GPR3, docs/history/gpr-study.md)
    "gpr-last": ["--cls-loss", "bce", "--gpr-bias", "on", "--gpr-select", "last", *NO_FIT],
    # ... and whose views are selected exactly as without GPR (H-GPR5, docs/history/gpr-views-study.md)
    "gpr-views": [*VIEWS_GPR, *NO_FIT],
    # ... with GPR reading the features through the adapter φ (width 128), the global branch trained alone on to
    # iteration 2,000, from 500 on minibatches of 32 from 4,000 training scenes' features (H-GPR6,
    # docs/history/gpr-adapter-study.md)
    "gpr-adapter": [*VIEWS_GPR, "--gpr-adapter", "128",
                    "--gpr-iters", "2000", "--gpr-pool", "4000", "--gpr-batch", "32"],
    # ... or, instead, φ (width 128), τ2 and β fitted after training on the frozen features of 6,000 training
    # scenes, the shipped prompts fixed (H-GPR7, docs/history/gpr-fit-study.md)
    "gpr-fit": [*VIEWS_GPR, "--gpr-fit", "6000", "--gpr-shifts", "1", *NO_FLOOR],
    # ... and GPR averaged over 2 × 2 sub-cell shifts of the image at inference (H-GPR8,
    # docs/history/gpr-shift-study.md; the default where the background is ignored from H-GPR9 to H-GPR10)
    "gpr-fit-shift": [*VIEWS_GPR, "--gpr-fit", "6000", "--gpr-shifts", "2", *NO_FLOOR],
    # the VOC-like default's GPR (fit, shifts, floor: H-GPR10) on a labelled layout (docs/history/labelled-fit-pilot.md)
    "labelled-fit": [*VIEWS_GPR, "--gpr-fit", "6000", "--gpr-shifts", "2", "--gpr-floor", "2"],
    # the default recipe as it is for the layout (Eq. 7 where the background is labelled) + the same fit
    "default-fit": ["--gpr-fit", "6000", "--gpr-shifts", "1", *NO_FLOOR],
    # third addendum: AdamW steps a quarter of the default's (fixed at 5e-4 = 0.025 × the toy CLIPs'
    # token-embedding RMS), with 2× the iterations and validations half as often (the same number of checks)
    "lr-rel": ["--lr", "5e-4", "--max-iters", "1000", "--val-every", "100"],
    # fourth addendum: the warm start also minimises λ_OC · L_OC, so the views start apart
    "oc-warm": ["--init-fit-oc", "on"],
    # fifth addendum: fit log τ1 / log τ2 alone (50 Adam steps, lr 0.05) before learning (the L_cls of that
    # time: the full BCE, since these runs predate the ninth addendum)
    "calib": ["--calib-steps", "50", "--cls-loss", "bce"],
    # issue #27's trajectory ceiling (benchmarks/trajectory_oracle.py): the default trained for all 500
    # iterations, a training state every 50 (selection still records every validation; no early stop)
    "trajectory": ["--patience", "0", "--ckpt-every", "50", "--keep-ckpts", "20"],
    # sixth addendum: both (the views start apart, then the temperatures are calibrated)
    "oc-calib": ["--init-fit-oc", "on", "--calib-steps", "50"],
    "old": ["--recipe", "paper", "--lr", "2e-3", "--warmup-iters", "40", "--max-iters", "400",
            "--global-batch", "8"],
}
POOL = 400  # scenes in the fixed pool of the fixed-pool and old arms
BASELINES = ("maskclip-85", "parts", "a-photo-of")


def clip_args(a) -> list[str]:
    return ["--clip", Path(a.model_config).stem, "--model-config", str(a.model_config), "--pretrained",
            str(a.weights), "--device", a.device, "--num-workers", str(a.workers), "--cpu-threads",
            str(a.threads), "--no-progress", *(["--dense", a.dense] if a.dense else [])]


def train_arm(a, world: str, seed: int, arm: str) -> Path:
    from training.train_prompts import main as train_main

    out = Path(a.out) / world / f"seed{seed}" / arm
    final = out / "prompts.safetensors"
    if final.is_file():
        return final
    if out.exists():
        import shutil

        shutil.rmtree(out)  # an interrupted run: start it again
    extra = ARMS[arm]
    pool = arm in ("fixed-pool", "fixed-pool-views", "old")
    spec = f"{WORLDS[world]},seed={seed}" + (f",length={POOL}" if pool else "")
    argv = ["--dataset", "toyworld", "--data-root", spec, "--out", str(out), "--seed", str(seed),
            "--ckpt-every", "1000000", *extra, *clip_args(a)]
    return Path(train_main(argv))


def evaluate_world(a, world: str, seed: int, ckpts: dict[str, Path]) -> dict:
    from training.evaluate import main as eval_main

    root = Path(a.out) / world / f"seed{seed}"
    merged = root / "eval.json"  # every method scored so far on this world × seed's evaluation set
    rows = json.loads(merged.read_text()) if merged.is_file() else {}
    todo = {arm: p for arm, p in ckpts.items() if arm not in rows}
    missing = [b for b in BASELINES if b not in rows]
    if todo or missing:  # score only what is new: the evaluation set and the frozen model are fixed
        spec = f"{WORLDS[world]},seed=0,length={a.eval_images}"
        report = eval_main(["--data", "toyworld=" + spec, "--baselines", *missing,
                            *[x for arm, p in todo.items() for x in ("--prompts", f"{arm}={p}")],
                            "--out", str(root / f"eval-{len(rows)}"), "--save-confusions", *clip_args(a)])
        rows.update(report["results"]["toyworld"])
        merged.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def _ms(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"


def summarise(results: dict, arms: list[str]) -> tuple[str, dict]:
    """results[world][seed] = evaluate rows. Margin = arm − best handcrafted set of that seed's table."""
    md, summary = [], {}
    for world, per_seed in results.items():
        seeds = sorted(per_seed)
        rows, summary[world] = [], {}
        best = {s: {k: max(per_seed[s][b][k] for b in BASELINES) for k in ("miou_unseen", "hiou")} for s in seeds}
        for name in [*BASELINES, *arms]:
            u = [per_seed[s][name]["miou_unseen"] for s in seeds]
            h = [per_seed[s][name]["hiou"] for s in seeds]
            ss = [per_seed[s][name]["miou_seen"] for s in seeds]
            du = [per_seed[s][name]["miou_unseen"] - best[s]["miou_unseen"] for s in seeds]
            dh = [per_seed[s][name]["hiou"] - best[s]["hiou"] for s in seeds]
            summary[world][name] = {"unseen": u, "seen": ss, "hiou": h, "margin_unseen": du, "margin_hiou": dh}
            margins = " / ".join(f"{x:+.1f}" for x in du)
            rows.append(f"| {name} | {_ms(u)} | {_ms(ss)} | {_ms(h)} | {margins} | "
                        f"{' / '.join(f'{x:+.1f}' for x in dh)} |")
        md += [f"### {world} ({WORLDS[world]}; seeds {', '.join(map(str, seeds))})", "",
               "| arm | mIoU(U) | mIoU(S) | hIoU | Δ mIoU(U) vs best handcrafted, per seed | Δ hIoU, per seed |",
               "|---|---:|---:|---:|---|---|", *rows, ""]
    return "\n".join(md), summary


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/recipe")
    p.add_argument("--worlds", nargs="+", default=["sparse", "crowded", "medium-b"], choices=list(WORLDS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--eval-images", type=int, default=150)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--model-config", default=str(REPO / "assets/toyclip/toyclip.json"))
    p.add_argument("--weights", default=str(REPO / "assets/toyclip/toyclip.safetensors"))
    p.add_argument("--dense", default=None, help="dense-feature mode for training and evaluation (a ViT CLIP: "
                   "maskclip-vit, sclip, clearclip, naclip; default: the tower's)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    results: dict = {}
    for seed in a.seeds:  # seed-major, so a partial study already covers every world
        for world in a.worlds:
            ckpts = {}
            for arm in a.arms:
                t = time.perf_counter()
                ckpts[arm] = train_arm(a, world, seed, arm)
                print(f"[recipe] {world} seed {seed} {arm}: {time.perf_counter() - t:.0f} s", flush=True)
            results.setdefault(world, {})[seed] = evaluate_world(a, world, seed, ckpts)
            md, summary = summarise(results, a.arms)
            out = Path(a.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "summary.md").write_text(md + f"\nWall time so far: {time.perf_counter() - t0:.0f} s.\n")
            (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(md)
    return summary


if __name__ == "__main__":
    main()
