"""A ceiling for issue #27: how far could *any* selection or weight-space interpolation along the default recipe's
trajectories go? (docs/history/transfer-study.md, "Trajectory ceiling").

Each run is the ``trajectory`` arm of ``benchmarks/recipe_ablation.py``: the default recipe trained for all 500
iterations (``--patience 0``) with a training state every 50 iterations. For every iterate t ∈ {0, 50, …, 500}
(t = 0: the residual form's start, the handcrafted prior itself) and every interpolation weight α ∈ {¼, ½, ¾, 1}
(context ctx0 + α·(ctx_t − ctx0): weight-space ensembling of the learned prompts with the prior, α = 0 being the
prior), the prompts are scored on the run's evaluation scenes. Per run it reports

- ``default``: the iterate the default's selection keeps (its patience-4 early stop replayed from the validation
  history, which is the default run's own up to that stop: the same seed, scenes and steps);
- ``last``: iteration 500, α = 1 (no selection);
- ``oracle``: the (t, α) with the highest mIoU(U) *on the evaluation scenes, with the unseen labels* — a choice
  no method can make, so an upper bound for every selection rule and interpolation weight on these trajectories;
- ``oracle_h``: the same, among the (t, α) whose Δ hIoU ≥ 0 (issue #27's bar asks both of every run).

Δ is against the best handcrafted set of that evaluation (in hindsight), as in ``family_study``.

    python benchmarks/family_study.py --clips toyclip fam-a --arms trajectory --threads 1 --out runs/traj &
    python benchmarks/family_study.py --clips fam-b fam-d --arms trajectory --threads 1 --out runs/traj &
    python benchmarks/trajectory_oracle.py --out runs/traj          # → runs/traj/trajectory.{json,md}
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import family_study as fs  # noqa: E402
import recipe_ablation as ra  # noqa: E402
import gpr_analysis as ga  # noqa: E402
from mvpseg.checkpoint import load_prompts  # noqa: E402
from mvpseg.model import MVPSeg  # noqa: E402
from training.checkpointing import load_state  # noqa: E402
from training.selection import ValidationSet  # noqa: E402

ALPHAS = (0.25, 0.5, 0.75, 1.0)
ARM = "trajectory"
PATIENCE = 4  # the default recipe's early stop (training/recipe.py)


def replay_selection(history: list[dict], patience: int = PATIENCE) -> int:
    """The iteration the default's selection keeps: the last accepted validation before ``patience``
    consecutive rejections (``BestTracker``'s rule; acceptance does not depend on the patience)."""
    best, bad = 0, 0
    for h in history:
        if h["accepted"]:
            best, bad = int(h["iter"]), 0
        else:
            bad += 1
        if bad >= patience:
            break
    return best


def eval_features(clip, world: str, n: int):
    """The run's evaluation scenes (family_study's: split val, seed 0) as cached dense features and labels, in
    the ``ValidationSet`` that scores prompt sets on cached features."""
    ds, loader = ga._eval_scenes(world, n)
    feats, labels = [], []
    with torch.no_grad():
        for image, label, _ in loader:
            feats.append(clip.dense_features(clip.normalize(image[None])).float())
            labels.append(label)
    return ds, ValidationSet(feats, labels)


def confusions(ps, clip, ds, cached: ValidationSet, gamma: float) -> np.ndarray:
    """N×C×C per-image confusions of prompt set ``ps`` (Eq. 8's prediction, as training.evaluate scores it)."""
    return cached.confusions(MVPSeg(clip, ps, gamma=gamma), ds.prompt_names).astype(np.int64)


def scores(mats: np.ndarray, unseen: np.ndarray) -> tuple[float, float, float]:
    u, s = fs.miou_unseen_seen(mats.sum(0)[None], unseen)
    return float(u[0]), float(s[0]), float(fs.hiou(u, s)[0])


def interval(mats: np.ndarray, base: dict[str, np.ndarray], unseen: np.ndarray, draws: int = 1000) -> list[float]:
    """90 % paired bootstrap interval over images of Δ mIoU(U) against the best handcrafted set per resample."""
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(mats), (draws, len(mats)))
    u = fs.resampled(mats, idx, unseen)[0]
    b = np.max([fs.resampled(m, idx, unseen)[0] for m in base.values()], 0)
    return [float(x) for x in np.nanpercentile(u - b, [5, 95])]


def run_one(run: Path, clip, cache: dict) -> dict:
    seed_dir = run.parent
    world = seed_dir.parent.name
    meta = json.loads((run / "prompts.json").read_text())
    history = meta["extra"]["selection"]["history"]
    gamma = float(meta.get("gamma", 10.0))
    if world not in cache:
        cache[world] = eval_features(clip, world, 150)
    ds, cached = cache[world]
    rows = json.loads((seed_dir / "eval.json").read_text())
    base = {b: m for b, m in fs.load_confusions(seed_dir).items() if b in ra.BASELINES}
    unseen = np.array([c["unseen"] for c in rows[ARM]["per_class"]])
    best_u = max(rows[b]["miou_unseen"] for b in ra.BASELINES)
    best_h = max(rows[b]["hiou"] for b in ra.BASELINES)

    ps = load_prompts(str(run / "prompts.safetensors"), clip, name=ARM).eval()
    check = scores(confusions(ps, clip, ds, cached, gamma), unseen)[0]
    if abs(check - rows[ARM]["miou_unseen"]) > 0.05:  # this loop must score exactly as training.evaluate does
        raise SystemExit(f"{run}: re-scored mIoU(U) {check:.2f} ≠ evaluate's {rows[ARM]['miou_unseen']:.2f}")
    ctx0 = ps.ctx0.detach().clone()
    states = {0: None, **{int(p.stem.split("_")[1]): p for p in sorted((run / "checkpoints").glob("state_*.pt"))}}
    cands, mats_of = [], {}
    for it, path in sorted(states.items()):
        if path is not None:
            ps.load_state_dict(load_state(path)["prompts"])
        ctx_t = ps.ctx.detach().clone()
        for alpha in ((0.0,) if it == 0 else ALPHAS):
            with torch.no_grad():
                ps.ctx.copy_(ctx0 + alpha * (ctx_t - ctx0))
            mats = confusions(ps, clip, ds, cached, gamma)
            u, s, h = scores(mats, unseen)
            cands.append({"iter": it, "alpha": alpha, "miou_unseen": u, "miou_seen": s, "hiou": h,
                          "d_unseen": u - best_u, "d_hiou": h - best_h})
            mats_of[(it, alpha)] = mats
        with torch.no_grad():
            ps.ctx.copy_(ctx_t)

    def pick(key: tuple[int, float]) -> dict:
        c = next(x for x in cands if (x["iter"], x["alpha"]) == key)
        return {**c, "d_unseen_ci": interval(mats_of[key], base, unseen)}

    kept = replay_selection(history)
    oracle = max(cands, key=lambda x: x["miou_unseen"])
    ok_h = [x for x in cands if x["d_hiou"] >= 0]
    oracle_h = max(ok_h, key=lambda x: x["miou_unseen"]) if ok_h else None
    last = max(states)
    return {"clip": run.parents[2].name, "layout": world, "seed": int(seed_dir.name[4:]),
            "default": pick((kept, 1.0 if kept else 0.0)), "last": pick((last, 1.0)),
            "oracle": pick((oracle["iter"], oracle["alpha"])),
            "oracle_h": None if oracle_h is None else pick((oracle_h["iter"], oracle_h["alpha"])),
            "candidates": cands}


def _mean_ci(xs: list[float], draws: int = 2000) -> str:
    x = np.asarray(xs, float)
    rng = np.random.default_rng(0)
    boots = x[rng.integers(0, len(x), (draws, len(x)))].mean(1)
    lo, hi = np.percentile(boots, [5, 95])
    return f"{x.mean():+.2f} [{lo:+.2f}, {hi:+.2f}]"


def render(results: list[dict]) -> str:
    md = ["| CLIP | layout | seed | default: iter, Δ U [90 % CI], Δ h | last (500): Δ U, Δ h | "
          "oracle: (iter, α), Δ U [90 % CI], Δ h | oracle with Δ h ≥ 0: (iter, α), Δ U |",
          "|---|---|---:|---|---|---|---|"]
    for r in results:
        d, la, o, oh = r["default"], r["last"], r["oracle"], r["oracle_h"]
        ci = lambda c: f"[{c['d_unseen_ci'][0]:+.1f}, {c['d_unseen_ci'][1]:+.1f}]"  # noqa: E731
        md.append(f"| {r['clip']} | {r['layout']} | {r['seed']} | {d['iter']}, {d['d_unseen']:+.1f} {ci(d)}, "
                  f"{d['d_hiou']:+.1f} | {la['d_unseen']:+.1f}, {la['d_hiou']:+.1f} | ({o['iter']}, {o['alpha']:g}), "
                  f"{o['d_unseen']:+.1f} {ci(o)}, {o['d_hiou']:+.1f} | "
                  + ("none" if oh is None else f"({oh['iter']}, {oh['alpha']:g}), {oh['d_unseen']:+.1f}") + " |")
    md += ["", "| choice | runs | mean Δ mIoU(U) [90 % CI over runs] | worst | runs < −1.0 | runs Δ hIoU < 0 |",
           "|---|---:|---|---:|---:|---:|"]
    for key in ("default", "last", "oracle", "oracle_h"):
        rs = [r[key] if r[key] is not None else None for r in results]
        du = [x["d_unseen"] if x else float("nan") for x in rs]
        if key == "oracle_h":  # a run without any (t, α) of Δ hIoU ≥ 0 counts as failing; its Δ U: the oracle's
            du = [x["d_unseen"] if x else r["oracle"]["d_unseen"] for x, r in zip(rs, results)]
        dh = [x["d_hiou"] if x else -1.0 for x in rs]
        md.append(f"| {key} | {len(du)} | {_mean_ci(du)} | {min(du):+.1f} | {sum(v < -1.0 for v in du)} | "
                  f"{sum(v < 0 for v in dh)} |")
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/traj")
    p.add_argument("--clips", nargs="+", default=["toyclip", "fam-a", "fam-b", "fam-d"])
    p.add_argument("--reuse", nargs="*", default=[], help="trajectory JSON files of earlier passes: their runs "
                   "are taken as they are, not scored again")
    p.add_argument("--stem", default="trajectory", help="output name: <out>/<stem>.json and .md")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    results = [r for f in a.reuse for r in json.loads(Path(f).read_text())]
    done = {(r["clip"], r["layout"], r["seed"]) for r in results}
    for name in a.clips:
        runs = [st for st in sorted(Path(a.out, name).glob(f"*/seed*/{ARM}/prompts.safetensors"))
                if (name, st.parents[2].name, int(st.parents[1].name[4:])) not in done]
        if not runs:
            continue
        clip, cache = fs.load_family_clip(name), {}
        for st in runs:
            r = run_one(st.parent, clip, cache)
            results.append(r)
            print(f"{r['clip']} {r['layout']} seed {r['seed']}: default (iter {r['default']['iter']}) "
                  f"{r['default']['d_unseen']:+.1f}, oracle ({r['oracle']['iter']}, {r['oracle']['alpha']:g}) "
                  f"{r['oracle']['d_unseen']:+.1f}", flush=True)
    results.sort(key=lambda r: (r["clip"], r["layout"], r["seed"]))
    Path(a.out, f"{a.stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    md = render(results)
    Path(a.out, f"{a.stem}.md").write_text(md)
    print(md)
    return results


if __name__ == "__main__":
    main()
