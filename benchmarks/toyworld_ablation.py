"""Table 1 and Fig. 3 of the paper, measured in the toy world with the bundled toy CLIP, on CPU.

Every learned row is a run of ``training/train_prompts.py`` (``--dataset toyworld``, seen classes
only) and every row is scored by ``training/evaluate.py`` on one fixed validation set (all 21
classes; features computed once per image for all methods), so this script adds no training or
evaluation logic of its own. Rows:

* Table 1: handcrafted baseline (MaskCLIP's 85 templates) · single learned prompt · 3 prompts
  without OCLoss · 3 prompts + OCLoss · 3 prompts + OCLoss + GPR (``--variant single | multi |
  multi-oc | mvpseg``);
* Fig. 3: number of segmentation prompts k = 1…5 with OCLoss, no GPR (k = 1 and k = 3 are the
  ``single`` and ``multi-oc`` runs of Table 1: with one prompt OCLoss is 0).

Prints both tables as markdown (mIoU(U), mIoU(S), mIoU, hIoU) and the wall time; writes
``<out>/ablation.md`` and ``<out>/ablation.json``. Finished runs are reused with ``--reuse``.

    python benchmarks/toyworld_ablation.py                       # defaults: docs/toyworld.md
    python benchmarks/toyworld_ablation.py --iters 20 --train-images 32 --val-images 16 --out /tmp/abl
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a plain script from anywhere

# (row label, train_prompts arguments); None = handcrafted baseline (no training).
TABLE1: list[tuple[str, str | None, list[str]]] = [
    ("Baseline (85 handcrafted templates)", None, []),
    ("Single learned prompt", "single", ["--variant", "single"]),
    ("3 prompts, no OCLoss", "multi", ["--variant", "multi"]),
    ("3 prompts + OCLoss", "multi-oc", ["--variant", "multi-oc"]),
    ("3 prompts + OCLoss + GPR", "mvpseg", ["--variant", "mvpseg"]),
]
# k → run name (reusing Table 1 runs where they are the same configuration)
SWEEP: dict[int, tuple[str, list[str]]] = {
    1: ("single", ["--variant", "single"]),
    2: ("multi-oc-k2", ["--variant", "multi-oc", "--n-seg", "2"]),
    3: ("multi-oc", ["--variant", "multi-oc"]),
    4: ("multi-oc-k4", ["--variant", "multi-oc", "--n-seg", "4"]),
    5: ("multi-oc-k5", ["--variant", "multi-oc", "--n-seg", "5"]),
}


def clip_args(a: argparse.Namespace) -> list[str]:
    # the registry name follows the config file (toyclip.json -> "toyclip", toyclip-zoom2.json -> ...),
    # so prompt checkpoints name the model they were learned for
    return ["--clip", Path(a.model_config).stem, "--model-config", str(a.model_config), "--pretrained", str(a.weights),
            "--device", a.device, "--num-workers", str(a.workers), "--cpu-threads", str(a.threads),
            "--no-progress"]


def world_spec(a: argparse.Namespace, length: int) -> str:
    """The toyworld ``--data-root`` spec shared by training and evaluation."""
    return f"length={length},seed={a.seed},world={a.world},background={a.background},zoom={a.zoom}"


def train_run(a: argparse.Namespace, name: str, extra: list[str]) -> Path:
    """One prompt-learning run (``training.train_prompts.main``); returns its prompt checkpoint."""
    from training.train_prompts import main as train_main

    out = Path(a.out) / name
    final = out / "prompts.safetensors"
    if a.reuse and final.is_file():
        return final
    if out.exists():
        import shutil

        shutil.rmtree(out)  # a stale partial run: start it again from scratch
    argv = ["--dataset", "toyworld", "--data-root", world_spec(a, a.train_images),
            "--out", str(out), "--recipe", "paper", "--max-iters", str(a.iters), "--global-batch", str(a.batch),
            "--lr", str(a.lr), "--warmup-iters", str(a.warmup), "--seed", str(a.seed),
            "--ckpt-every", str(a.iters), *extra, *clip_args(a)]
    return Path(train_main(argv))


def table(rows: list[tuple[str, dict]]) -> str:
    """The evaluator's summary table, from the rows of its JSON report."""
    from training.metrics import summary_table

    return summary_table([(label, SimpleNamespace(**r)) for label, r in rows])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/toyworld_ablation")
    p.add_argument("--world", default="sparse", help="scene layout, a name in training.toyworld.WORLDS "
                   "(crowded: objects ≈ 30 %% of pixels; sparse: ≈ 4 %%, the first Table 1)")
    from training.toyworld.dataset import BACKGROUND_MODES

    p.add_argument("--background", default="class", choices=BACKGROUND_MODES,
                   help="class: background scored as class 0 (PASCAL Context's protocol); ignore: "
                   "background pixels ignored and not in the vocabulary (the paper's Table 1 on VOC)")
    p.add_argument("--zoom", type=int, default=1, help="pixel magnification of the world (WorldConfig.zoom); "
                   "use with a toy CLIP pretrained at that zoom (pretrain_toyclip --zoom)")
    p.add_argument("--iters", type=int, default=400, help="prompt-learning iterations per run")
    p.add_argument("--batch", type=int, default=8, help="global batch (paper: 8)")
    p.add_argument("--lr", type=float, default=2e-3, help="SGD lr (paper: 2e-4 for 8k iterations)")
    p.add_argument("--warmup", type=int, default=40, help="linear warmup iterations")
    p.add_argument("--train-images", type=int, default=400)
    p.add_argument("--val-images", type=int, default=200, help="fixed validation set (split 'val')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--no-sweep", action="store_true", help="Table 1 only")
    p.add_argument("--reuse", action="store_true", help="keep finished runs found in --out")
    p.add_argument("--model-config", default=str(REPO / "assets/toyclip/toyclip.json"))
    p.add_argument("--weights", default=str(REPO / "assets/toyclip/toyclip.safetensors"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    t0 = time.perf_counter()
    runs: dict[str, list[str]] = {name: extra for _, name, extra in TABLE1 if name}
    if not a.no_sweep:
        runs.update({name: extra for name, extra in SWEEP.values()})
    ckpts, train_s = {}, {}
    import training.train_prompts  # noqa: F401  (import time is not charged to the first row)

    for name, extra in runs.items():
        t = time.perf_counter()
        ckpts[name] = train_run(a, name, extra)
        train_s[name] = round(time.perf_counter() - t, 1)
        print(f"[ablation] {name}: {train_s[name]} s", flush=True)

    from training.evaluate import main as eval_main

    t = time.perf_counter()
    report = eval_main(["--data", "toyworld=" + world_spec(a, a.val_images), "--baselines", "maskclip-85",
                        *[x for name, path in ckpts.items() for x in ("--prompts", f"{name}={path}")],
                        "--out", str(Path(a.out) / "eval"), *clip_args(a)])
    eval_s = round(time.perf_counter() - t, 1)
    res = report["results"]["toyworld"]
    rows1 = [(label, res[name or "maskclip-85"]) for label, name, _ in TABLE1]
    md = ["## Table 1 (toy world)", "", table(rows1)]
    if not a.no_sweep:
        rows2 = [(f"k = {k}" + (" (= single)" if k == 1 else ""), res[name]) for k, (name, _) in SWEEP.items()]
        md += ["", "## Number of segmentation prompts (OCLoss, no GPR)", "", table(rows2)]
    wall = round(time.perf_counter() - t0, 1)
    md += ["", (f"Wall time: {wall} s ({sum(train_s.values()):.0f} s prompt learning over {len(runs)} runs, "
                f"{eval_s} s evaluation of {a.val_images} images); {a.iters} iterations × batch {a.batch}, "
                f"SGD lr {a.lr}, {a.train_images} training images, world {a.world!r}, background {a.background}, zoom {a.zoom}, device {a.device}, "
                f"{a.threads} threads.")]
    text = "\n".join(md) + "\n"
    print(text)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(text)
    summary = {"args": vars(a), "wall_seconds": wall, "train_seconds": train_s, "eval_seconds": eval_s,
               "rows": {label: res[name or "maskclip-85"] for label, name, _ in TABLE1},
               "sweep": {} if a.no_sweep else {k: res[name] for k, (name, _) in SWEEP.items()}}
    (out / "ablation.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


if __name__ == "__main__":
    main()
