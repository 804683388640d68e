"""Prompt learning judged across the toy CLIP family × layouts × seeds (issues #27, #28;
docs/history/transfer-study.md). Each CLIP's runs are ``benchmarks/recipe_ablation.py`` runs (the same training
and evaluation scripts, nothing of its own) under ``<out>/<clip>/``; this script adds the family and the
statistics: per run Δ mIoU(U) and Δ hIoU against the best handcrafted set of that evaluation, with a 90 %
paired bootstrap interval over the evaluation images, and the mean over runs with a bootstrap interval over runs.

    python -m training.toyworld.family --members fam-a fam-b fam-d          # the CLIPs, once (≈ 15–20 min each)
    python benchmarks/family_study.py --clips toyclip fam-a --threads 1 --out runs/family-study &
    python benchmarks/family_study.py --clips fam-b fam-d --threads 1 --out runs/family-study &   # 2 cores
    python benchmarks/family_study.py --summary-only --out runs/family-study

Writes ``<out>/family.md`` and ``<out>/family.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import recipe_ablation as ra  # noqa: E402

FAMILY = REPO / "assets" / "toyclip-family"
LAYOUTS = ("voc", "sparse-c", "medium-b", "crowded")


def clip_files(name: str) -> tuple[Path, Path]:
    """(config, weights) of a family member or of a bundled toy CLIP."""
    folder = REPO / "assets" / name if (REPO / "assets" / name).is_dir() else FAMILY / name
    config, weights = folder / f"{name}.json", folder / f"{name}.safetensors"
    if not weights.is_file():
        raise SystemExit(f"toy CLIP {name!r} not found at {weights}: make it with "
                         f"python -m training.toyworld.family --members {name}")
    return config, weights


def load_family_clip(name: str):
    """A family member or bundled toy CLIP as ``FrozenCLIP`` on the CPU, through the scripts' own CLIP options."""
    import torch

    from mvpseg.clip_backbone import load_clip
    from training.cli import clip_spec
    from training.evaluate import build_parser

    config, weights = clip_files(name)
    args = build_parser().parse_args(["--clip", name, "--model-config", str(config), "--pretrained", str(weights),
                                      "--data", "toyworld=x"])
    return load_clip(clip_spec(args), torch.device("cpu"))


def miou_unseen_seen(mats: np.ndarray, unseen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mats R×C×C (summed confusions of R resamples) → (mIoU(U), mIoU(S)) per resample, classes with an empty
    union left out, as training.metrics does."""
    tp = np.diagonal(mats, axis1=1, axis2=2).astype(np.float64)
    union = mats.sum(1) + mats.sum(2) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan) * 100
    return np.nanmean(iou[:, unseen], 1), np.nanmean(iou[:, ~unseen], 1)


def hiou(u: np.ndarray, s: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(u + s > 0, 2 * u * s / (u + s), 0.0)


def resampled(mats: np.ndarray, idx: np.ndarray, unseen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mIoU(U), hIoU) of N×C×C per-image confusions on each bootstrap resample ``idx`` (R×N image indices)."""
    u, s = miou_unseen_seen(np.stack([mats[i].sum(0) for i in idx]), unseen)
    return u, hiou(u, s)


def load_confusions(root: Path) -> dict[str, np.ndarray]:
    """method → N×C×C per-image confusions of one world × seed (every evaluation chunk of recipe_ablation)."""
    out: dict[str, np.ndarray] = {}
    for f in sorted(root.glob("eval-*/confusions-toyworld.npz")):
        with np.load(f) as z:
            out.update({k: z[k] for k in z.files})
    return out


def run_stats(root: Path, arms: list[str], draws: int = 1000, ref: str | None = None) -> dict:
    """Per arm: Δ mIoU(U), Δ hIoU vs the best handcrafted set, 90 % paired bootstrap intervals over images;
    with ``ref`` (an arm) also ``d_ref``: Δ mIoU(U) vs that arm, with its interval (Table 1 row 5 − row 4)."""
    rows = json.loads((root / "eval.json").read_text())
    mats = load_confusions(root)
    any_row = next(iter(rows.values()))
    unseen = np.array([c["unseen"] for c in any_row["per_class"]])
    rng = np.random.default_rng(0)
    n = next(iter(mats.values())).shape[0] if mats else 0
    idx = rng.integers(0, n, (draws, n)) if n else None
    best_u = max(rows[b]["miou_unseen"] for b in ra.BASELINES)
    best_h = max(rows[b]["hiou"] for b in ra.BASELINES)
    boot = {}
    if n and all(b in mats for b in ra.BASELINES):
        for name in dict.fromkeys([*ra.BASELINES, *arms, *([ref] if ref else [])]):
            if name in mats:
                boot[name] = resampled(mats[name], idx, unseen)
    out = {}
    for arm in arms:
        if arm not in rows:
            continue
        r = {"miou_unseen": rows[arm]["miou_unseen"], "miou_seen": rows[arm]["miou_seen"], "hiou": rows[arm]["hiou"],
             "d_unseen": rows[arm]["miou_unseen"] - best_u, "d_hiou": rows[arm]["hiou"] - best_h,
             "gpr": rows[arm].get("gpr")}
        if arm in boot:
            bu = np.max([boot[b][0] for b in ra.BASELINES], 0)
            bh = np.max([boot[b][1] for b in ra.BASELINES], 0)
            r["d_unseen_ci"] = [float(x) for x in np.nanpercentile(boot[arm][0] - bu, [5, 95])]
            r["d_hiou_ci"] = [float(x) for x in np.nanpercentile(boot[arm][1] - bh, [5, 95])]
        if ref is not None and ref in rows and arm != ref:
            r["d_ref"] = rows[arm]["miou_unseen"] - rows[ref]["miou_unseen"]
            if arm in boot and ref in boot:
                r["d_ref_ci"] = [float(x) for x in np.nanpercentile(boot[arm][0] - boot[ref][0], [5, 95])]
        meta = root / arm / "prompts.json"
        if meta.is_file():
            sel = (json.loads(meta.read_text()).get("extra") or {}).get("selection") or {}
            r["best_iter"] = sel.get("best_iter")
        out[arm] = r
    return out


def summarise(out: Path, arms: list[str], ref: str | None = None) -> dict:
    """Every finished run under ``out`` → family.md / family.json (with ``ref``: each arm against that arm)."""
    runs = []
    for clip_dir in sorted(p for p in out.iterdir() if p.is_dir()):
        for world_dir in sorted(p for p in clip_dir.iterdir() if p.is_dir() and p.name in ra.WORLDS):
            for seed_dir in sorted(world_dir.glob("seed*")):
                if (seed_dir / "eval.json").is_file():
                    stats = run_stats(seed_dir, arms, ref=ref)
                    runs += [{"clip": clip_dir.name, "layout": world_dir.name, "seed": int(seed_dir.name[4:]),
                              "arm": arm, **r} for arm, r in stats.items()]
    md = ["| CLIP | layout | seed | arm | mIoU(U) | Δ mIoU(U) [90 % CI over images] | Δ hIoU | kept iter. | "
          "GPR AUC(U) | sep.(U) |", "|---|---|---|---|---:|---|---:|---:|---:|---:|"]
    for r in runs:
        ci = r.get("d_unseen_ci")
        g = (r.get("gpr") or {}).get("unseen") or {}
        md.append(f"| {r['clip']} | {r['layout']} | {r['seed']} | {r['arm']} | {r['miou_unseen']:.1f} | "
                  f"{r['d_unseen']:+.1f}" + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else "") +
                  f" | {r['d_hiou']:+.1f} | {r.get('best_iter', '')} | {g.get('auc', float('nan')):.2f} | "
                  f"{g.get('separation', float('nan')):.2f} |")
    md += ["", "| arm | runs | mean Δ mIoU(U) [90 % CI over runs] | worst | runs < −1.0 | runs Δ hIoU < 0 | "
           "mean Δ hIoU |", "|---|---:|---|---:|---:|---:|---:|"]
    rng = np.random.default_rng(1)
    for arm in arms:
        d = np.array([r["d_unseen"] for r in runs if r["arm"] == arm])
        h = np.array([r["d_hiou"] for r in runs if r["arm"] == arm])
        if not d.size:
            continue
        ci = np.percentile(d[rng.integers(0, d.size, (2000, d.size))].mean(1), [5, 95])
        md.append(f"| {arm} | {d.size} | {d.mean():+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}] | {d.min():+.1f} | "
                  f"{int((d < -1.0).sum())} | {int((h < 0).sum())} | {h.mean():+.2f} |")
    layouts = sorted({r["layout"] for r in runs})
    md += ["", "Mean Δ mIoU(U) over seeds (seeds run), per arm × CLIP × layout:", "",
           "| arm | CLIP | " + " | ".join(layouts) + " |", "|---|---|" + "---:|" * len(layouts)]
    for arm in arms:
        for clip in sorted({r["clip"] for r in runs if r["arm"] == arm}):
            cells = []
            for layout in layouts:
                d = [r["d_unseen"] for r in runs if (r["arm"], r["clip"], r["layout"]) == (arm, clip, layout)]
                cells.append(f"{np.mean(d):+.1f} ({len(d)})" if d else "")
            md.append(f"| {arm} | {clip} | " + " | ".join(cells) + " |")
    if ref is not None:
        md += ["", f"Each arm against `{ref}` (mIoU(U), 90 % paired bootstrap interval over images):", "",
               "| CLIP | layout | seed | arm | Δ mIoU(U) vs " + ref + " | GPR AUC(U) | sep.(U) |",
               "|---|---|---|---|---|---:|---:|"]
        for r in runs:
            if "d_ref" in r:
                ci = r.get("d_ref_ci")
                g = (r.get("gpr") or {}).get("unseen") or {}
                md.append(f"| {r['clip']} | {r['layout']} | {r['seed']} | {r['arm']} | {r['d_ref']:+.1f}"
                          + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else "")
                          + f" | {g.get('auc', float('nan')):.3f} | {g.get('separation', float('nan')):.3f} |")
    text = "\n".join(md) + "\n"
    write_summary(out, "family", text, runs)
    return {"runs": runs, "markdown": text}


def write_summary(out: Path, stem: str, markdown: str, runs: list) -> None:
    """``<out>/<stem>.md`` and ``.json``, each replaced atomically (another study process may read them)."""
    for name, body in ((f"{stem}.md", markdown), (f"{stem}.json", json.dumps(runs, indent=1) + "\n")):
        tmp = out / f".{name}.{os.getpid()}"
        tmp.write_text(body)
        os.replace(tmp, out / name)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/family-study")
    p.add_argument("--clips", nargs="+", default=["toyclip", "fam-a", "fam-b", "fam-d"])
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(ra.WORLDS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=["default", "plain"], choices=list(ra.ARMS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-images", type=int, default=150, help="evaluation scenes per layout (seed 0, split val)")
    p.add_argument("--summary-only", action="store_true")
    p.add_argument("--ref", default=None, choices=list(ra.ARMS),
                   help="also compare every arm with this one per run (e.g. no-gpr: Table 1 row 5 − row 4)")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not a.summary_only:
        for clip in a.clips:
            config, weights = clip_files(clip)
            ra.main(["--out", str(out / clip), "--worlds", *a.layouts, "--seeds", *map(str, a.seeds),
                     "--arms", *a.arms, "--threads", str(a.threads), "--workers", "0",
                     "--eval-images", str(a.eval_images),
                     "--model-config", str(config), "--weights", str(weights)])
    result = summarise(out, list(ra.ARMS), ref=a.ref)  # every arm that has runs under ``out``, in ARMS order
    print(result["markdown"])
    return result


if __name__ == "__main__":
    main()
