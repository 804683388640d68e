"""MVP-SEG+ judged across toy CLIPs × layouts × seeds (issue #24; docs/history/distill-study.md and its sequel).

Per CLIP × layout × seed: the teacher prompts (``training.train_prompts``, default recipe), then two students with
``training.distill`` and no student or schedule flag (the defaults under test): MVP-SEG+ (the learned prompts as
teacher) and MaskCLIP+ (``--prompts maskclip-85``), each scored beside its teacher on the same 150 images with
per-image confusions. This script adds the statistics: Δ = student − teacher per run with a 90 % paired
bootstrap interval over images, MVP-SEG+ − MaskCLIP+ per run, and means over runs with intervals over runs.

    python benchmarks/distill_study.py --clips fam-b --threads 1 --out runs/distill-study &
    python benchmarks/distill_study.py --clips fam-d --threads 1 --out runs/distill-study &   # 2 cores
    python benchmarks/distill_study.py --summary-only --out runs/distill-study
    python benchmarks/distill_study.py --rescore 600 --layouts voc --out runs/distill-study  # more scenes
    python benchmarks/distill_study.py --calibrate --out runs/distill-study   # H24c: the seen-class penalty

Writes ``<out>/study.md`` and ``<out>/study.json``; ``--rescore N`` scores the finished students and teachers
again on N evaluation scenes (the first 150 are the study's) and writes ``<out>/study-N.{md,json}``;
``--calibrate`` (after ``--rescore 600 --layouts voc``) gives every finished student the seen-class penalty that
``training.distill`` now chooses after training and writes ``<out>/study-cal.{md,json}`` and
``<out>/calibration-gain.md``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import family_study as fs  # noqa: E402
import recipe_ablation as ra  # noqa: E402

LAYOUTS = ("voc", "sparse-c", "medium-b")
TRAIN_IMAGES, EVAL_IMAGES = 300, 150
STUDENTS = {"mvp-seg+": None, "maskclip+": "maskclip-85"}  # arm → --prompts (None: the learned teacher)


def clip_args(clip: str, threads: int) -> list[str]:
    config, weights = fs.clip_files(clip)
    return ["--clip", clip, "--model-config", str(config), "--pretrained", str(weights), "--device", "cpu",
            "--num-workers", "0", "--cpu-threads", str(threads), "--no-progress"]


def world(layout: str, seed: int) -> str:
    return f"{ra.WORLDS[layout]},seed={seed},length={TRAIN_IMAGES}"


def teacher_prompts(out: Path, clip: str, layout: str, seed: int, threads: int) -> Path:
    from training.train_prompts import main as train_main

    folder = out / clip / layout / f"seed{seed}" / "prompts"
    final = folder / "prompts.safetensors"
    if not final.is_file():
        if folder.exists():
            import shutil

            shutil.rmtree(folder)  # an interrupted run: start again
        train_main(["--dataset", "toyworld", "--data-root", f"{ra.WORLDS[layout]},seed={seed}", "--out",
                    str(folder), "--seed", str(seed), "--ckpt-every", "1000000", *clip_args(clip, threads)])
    return final


def student(out: Path, clip: str, layout: str, seed: int, arm: str, prompts: Path, threads: int) -> Path:
    from training.distill import main as distill_main

    folder = out / clip / layout / f"seed{seed}" / arm
    if not (folder / "eval.json").is_file():
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        distill_main(["--dataset", "toyworld", "--data-root", world(layout, seed), "--out", str(folder),
                      "--prompts", STUDENTS[arm] or str(prompts), "--seed", str(seed), "--eval-limit",
                      str(EVAL_IMAGES), "--cache-samples", "--ckpt-every", "100000", "--save-confusions",
                      *clip_args(clip, threads)])
    return folder


def _boot(mats: np.ndarray, unseen: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u, s = fs.miou_unseen_seen(np.stack([mats[i].sum(0) for i in idx]), unseen)
    return u, fs.hiou(u, s)


def _student(folder: Path, clip, names: tuple[str, ...]):
    """(network, C×D fused class embeddings of ``names``, background index) of a finished run's student."""
    import torch

    from mvpseg.student import fuse_views, load_student

    loaded = load_student(folder / "student.safetensors", clip, check_dense=False)
    with torch.no_grad():
        emb = fuse_views(loaded.prompts.encode(clip, names))
    return loaded.net, emb, 0 if loaded.net.config.background else None


def rescore(seed_dir: Path, clip, layout: str, seed: int, n: int) -> None:
    """Both students and their teachers of one finished run, scored on ``n`` evaluation scenes with per-image
    confusions: ``<arm>/eval-<n>.json`` and ``<arm>/confusions-<n>.npz`` beside the study's own files."""
    from mvpseg.builder import baseline_prompt_sets
    from mvpseg.checkpoint import load_prompts
    from training.datasets import build_dataset, get_profile
    from training.distributed import DistContext
    from training.evaluate import evaluate_dataset
    from training.student_eval import evaluate_student

    data = build_dataset("toyworld", f"{ra.WORLDS[layout]},seed={seed},length={n}", None, label_space="full")
    tf, ctx = get_profile("toyworld").eval_transform(), DistContext()
    for arm, teacher in STUDENTS.items():
        if (seed_dir / arm / f"eval-{n}.json").is_file():
            continue
        net, emb, bg = _student(seed_dir / arm, clip, tuple(data.prompt_names))
        per: dict[str, list] = {"student": []}
        rows = {"student": evaluate_student(net, emb, bg, data, tf, ctx, n, None, False, per["student"])}
        prompts = (baseline_prompt_sets()[teacher] if teacher else
                   load_prompts(str(seed_dir / "prompts" / "prompts.safetensors"), clip, name="teacher").eval())
        gamma = 10.0 if teacher else float(prompts.meta.gamma)
        rows.update(evaluate_dataset(clip, {"teacher": (prompts, gamma)}, data, tf, ctx, n, 0, None, False,
                                     per_image=per))
        np.savez_compressed(seed_dir / arm / f"confusions-{n}.npz", **{k: np.stack(v) for k, v in per.items()})
        (seed_dir / arm / f"eval-{n}.json").write_text(json.dumps({"results": {k: v.as_dict() for k, v in rows.items()}}))


def stacking(seed_dir: Path, clip, layout: str, seed: int, n: int, penalties: list[float]) -> dict:
    """Exploratory: the MVP-SEG+ student of one finished run on ``n`` evaluation scenes with the seen classes'
    logits lowered by each penalty (calibrated stacking, against the seen-class bias): penalty → mIoU(U), mIoU(S),
    hIoU. Written to ``mvp-seg+/stacking-<n>.json``."""
    from training.datasets import build_dataset, get_profile
    from training.distributed import DistContext
    from training.student_eval import evaluate_student_penalties

    data = build_dataset("toyworld", f"{ra.WORLDS[layout]},seed={seed},length={n}", None, label_space="full")
    net, emb, bg = _student(seed_dir / "mvp-seg+", clip, tuple(data.prompt_names))
    scores = evaluate_student_penalties(net, emb, bg, data, get_profile("toyworld").eval_transform(), DistContext(),
                                        penalties, n, progress=False)
    out = {p: {"miou_unseen": sc.miou_unseen, "miou_seen": sc.miou_seen, "hiou": sc.hiou}
           for p, sc in zip(penalties, scores)}
    (seed_dir / "mvp-seg+" / f"stacking-{n}.json").write_text(json.dumps(out, indent=1))
    return out


def student_key(rows: dict, calibrated: bool = True) -> str:
    """The student's row of an eval.json: the calibrated one, or (``calibrated=False``) the row without the
    penalty where ``training.distill`` wrote both (runs before calibrated stacking have one student row)."""
    plain = [k for k in rows if "student" in k and "no seen penalty" in k]
    if plain and not calibrated:
        return plain[0]
    return next(k for k in rows if "student" in k and "no seen penalty" not in k)


CALIBRATED_SCENES = {"voc": 600}  # H24c: VOC-like layouts on 600 scenes, the others on the study's 150


def calibrate(seed_dir: Path, clip, layout: str, seed: int) -> None:
    """H24c on one finished run: each student's seen-class penalty chosen on its 300 training images
    (``training.calibrate_student``, exactly what ``training.distill --seen-penalty auto`` does after training),
    then the student scored with it on the layout's judged scenes. Writes ``<arm>/calibration.json``,
    ``eval-cal.json`` and ``confusions-cal.npz``; the teacher rows are the already scored ones of those scenes."""
    from training.calibrate_student import calibrate_student
    from training.datasets import build_dataset, get_profile
    from training.distributed import DistContext
    from training.student_eval import evaluate_student

    n = CALIBRATED_SCENES.get(layout, EVAL_IMAGES)
    suffix = f"-{n}" if n != EVAL_IMAGES else ""
    train = build_dataset("toyworld", world(layout, seed), None, label_space="full", train=True)
    data = build_dataset("toyworld", f"{ra.WORLDS[layout]},seed={seed},length={n}", None, label_space="full")
    tf, ctx = get_profile("toyworld").eval_transform(), DistContext()
    for arm in STUDENTS:
        folder = seed_dir / arm
        if (folder / "eval-cal.json").is_file():
            continue
        net, emb, bg = _student(folder, clip, tuple(data.prompt_names))
        choice = calibrate_student(net, emb, bg, train, tuple(train.unseen_indices), tf, ctx, TRAIN_IMAGES)
        (folder / "calibration.json").write_text(json.dumps(choice.as_record(), indent=1))
        per: list = []
        row = evaluate_student(net, emb, bg, data, tf, ctx, n, None, False, per, choice.penalty)
        rows = json.loads((folder / f"eval{suffix}.json").read_text())["results"]
        t_key = next(k for k in rows if "teacher" in k)
        with np.load(folder / f"confusions{suffix}.npz") as z:
            teacher_mats = z[t_key]
        (folder / "eval-cal.json").write_text(json.dumps({"seen_penalty": choice.penalty, "results": {
            "student (calibrated)": row.as_dict(), t_key: rows[t_key]}}))
        np.savez_compressed(folder / "confusions-cal.npz",
                            **{"student (calibrated)": np.stack(per), t_key: teacher_mats})
        print(f"{seed_dir} {arm}: penalty {choice.penalty:g}, U {row.miou_unseen:.1f} hIoU {row.hiou:.1f}", flush=True)


def calibration_gain(out: Path) -> str:
    """A24c: per MVP-SEG+ run, mIoU(U) and hIoU with the chosen penalty minus without it (same scenes)."""
    lines, du, dh = [], [], []
    for folder in sorted(out.glob("*/*/seed*/mvp-seg+")):
        cal = folder / "eval-cal.json"
        if not cal.is_file():
            continue
        layout = folder.parents[1].name
        n = CALIBRATED_SCENES.get(layout, EVAL_IMAGES)
        plain = json.loads((folder / (f"eval-{n}.json" if n != EVAL_IMAGES else "eval.json")).read_text())["results"]
        p0 = plain[student_key(plain, calibrated=False)]
        c = json.loads(cal.read_text())
        p1 = c["results"]["student (calibrated)"]
        du.append(p1["miou_unseen"] - p0["miou_unseen"])
        dh.append(p1["hiou"] - p0["hiou"])
        lines.append(f"| {folder.parents[2].name} | {layout} | {folder.parent.name[4:]} | {c['seen_penalty']:g} | "
                     f"{p0['miou_unseen']:.1f} → {p1['miou_unseen']:.1f} ({du[-1]:+.1f}) | "
                     f"{p0['hiou']:.1f} → {p1['hiou']:.1f} ({dh[-1]:+.1f}) |")
    if not lines:
        return ""
    rng = np.random.default_rng(2)
    return "\n".join(["| CLIP | layout | seed | p* | MVP-SEG+ mIoU(U), p = 0 → p* | hIoU, p = 0 → p* |",
                      "|---|---|---|---:|---|---|", *lines, "",
                      f"Over {len(du)} runs, p* − p = 0: mIoU(U) {_mean_ci(np.array(du), rng)}, "
                      f"hIoU {_mean_ci(np.array(dh), rng)}."]) + "\n"


def run_stats(seed_dir: Path, draws: int = 1000, suffix: str = "") -> dict | None:
    """Both students of one CLIP × layout × seed: scores, Δ vs teacher with 90 % bootstrap intervals, and
    MVP-SEG+ − MaskCLIP+ (``suffix`` "-N": the scores of ``--rescore N``)."""
    arms = {}
    for arm in STUDENTS:
        f = seed_dir / arm / f"eval{suffix}.json"
        if not f.is_file():
            return None
        rows = json.loads(f.read_text())["results"]
        with np.load(seed_dir / arm / f"confusions{suffix}.npz") as z:
            mats = {k: z[k] for k in z.files}
        arms[arm] = (rows, mats)
    rows0 = next(iter(arms.values()))[0]
    unseen = np.array([c["unseen"] for c in next(iter(rows0.values()))["per_class"]])
    n = next(iter(next(iter(arms.values()))[1].values())).shape[0]
    idx = np.random.default_rng(0).integers(0, n, (draws, n))
    out: dict = {}
    boots = {}
    for arm, (rows, mats) in arms.items():
        s_key = student_key(rows)
        t_key = next(k for k in rows if "teacher" in k)
        su, sh = _boot(mats[s_key], unseen, idx)
        tu, th = _boot(mats[t_key], unseen, idx)
        boots[arm] = su
        out[arm] = {"student": {k: rows[s_key][k] for k in ("miou_unseen", "miou_seen", "hiou")},
                    "teacher": {k: rows[t_key][k] for k in ("miou_unseen", "miou_seen", "hiou")},
                    "d_unseen": rows[s_key]["miou_unseen"] - rows[t_key]["miou_unseen"],
                    "d_hiou": rows[s_key]["hiou"] - rows[t_key]["hiou"],
                    "d_unseen_ci": [float(x) for x in np.nanpercentile(su - tu, [5, 95])],
                    "d_hiou_ci": [float(x) for x in np.nanpercentile(sh - th, [5, 95])]}
    gap = out["mvp-seg+"]["student"]["miou_unseen"] - out["maskclip+"]["student"]["miou_unseen"]
    out["plus_vs_maskclip_plus"] = {"d_unseen": gap,
                                    "ci": [float(x) for x in np.nanpercentile(boots["mvp-seg+"] - boots["maskclip+"],
                                                                               [5, 95])]}
    return out


def _mean_ci(x: np.ndarray, rng) -> str:
    ci = np.percentile(x[rng.integers(0, x.size, (2000, x.size))].mean(1), [5, 95])
    return f"{x.mean():+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]"


def summarise(out: Path, suffix: str = "") -> dict:
    runs = []
    for clip_dir in sorted(p for p in out.iterdir() if p.is_dir()):
        for layout in LAYOUTS:
            for seed_dir in sorted((clip_dir / layout).glob("seed*")):
                stats = run_stats(seed_dir, suffix=suffix)
                if stats:
                    runs.append({"clip": clip_dir.name, "layout": layout, "seed": int(seed_dir.name[4:]), **stats})
    md = ["| CLIP | layout | seed | MVP-SEG teacher U / S | MVP-SEG+ U / S | Δ mIoU(U) [90 % CI] | Δ hIoU | "
          "MaskCLIP teacher U | MaskCLIP+ U | Δ mIoU(U) | MVP-SEG+ − MaskCLIP+ (U) [90 % CI] |",
          "|---|---|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in runs:
        p, m, g = r["mvp-seg+"], r["maskclip+"], r["plus_vs_maskclip_plus"]
        md.append(f"| {r['clip']} | {r['layout']} | {r['seed']} | {p['teacher']['miou_unseen']:.1f} / "
                  f"{p['teacher']['miou_seen']:.1f} | {p['student']['miou_unseen']:.1f} / {p['student']['miou_seen']:.1f} | "
                  f"{p['d_unseen']:+.1f} [{p['d_unseen_ci'][0]:+.1f}, {p['d_unseen_ci'][1]:+.1f}] | {p['d_hiou']:+.1f} | "
                  f"{m['teacher']['miou_unseen']:.1f} | {m['student']['miou_unseen']:.1f} | {m['d_unseen']:+.1f} | "
                  f"{g['d_unseen']:+.1f} [{g['ci'][0]:+.1f}, {g['ci'][1]:+.1f}] |")
    rng = np.random.default_rng(1)
    if runs:
        d = np.array([r["mvp-seg+"]["d_unseen"] for r in runs])
        h = np.array([r["mvp-seg+"]["d_hiou"] for r in runs])
        dm = np.array([r["maskclip+"]["d_unseen"] for r in runs])
        g = np.array([r["plus_vs_maskclip_plus"]["d_unseen"] for r in runs])
        md += ["", f"Over {len(runs)} runs: MVP-SEG+ − its teacher, mIoU(U) {_mean_ci(d, rng)} (worst {d.min():+.1f}; "
               f"{int((d >= 3.0).sum())} of them ≥ +3.0), hIoU {_mean_ci(h, rng)} ({int((h > 0).sum())} > 0); "
               f"MaskCLIP+ − its teacher, mIoU(U) {_mean_ci(dm, rng)}; MVP-SEG+ − MaskCLIP+, mIoU(U) "
               f"{_mean_ci(g, rng)} ({int((g > 0).sum())} > 0).",
               "", "Mean over seeds per CLIP × layout (MVP-SEG+ − teacher / MVP-SEG+ − MaskCLIP+, mIoU(U); runs):", "",
               "| CLIP | " + " | ".join(LAYOUTS) + " |", "|---|" + "---|" * len(LAYOUTS)]
        for clip in sorted({r["clip"] for r in runs}):
            cells = []
            for layout in LAYOUTS:
                sel = [r for r in runs if (r["clip"], r["layout"]) == (clip, layout)]
                cells.append(f"{np.mean([r['mvp-seg+']['d_unseen'] for r in sel]):+.1f} / "
                             f"{np.mean([r['plus_vs_maskclip_plus']['d_unseen'] for r in sel]):+.1f} ({len(sel)})"
                             if sel else "")
            md.append(f"| {clip} | " + " | ".join(cells) + " |")
    text = "\n".join(md) + "\n"
    fs.write_summary(out, f"study{suffix}", text, runs)
    return {"runs": runs, "markdown": text}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/distill-study")
    p.add_argument("--clips", nargs="+", default=["fam-b", "fam-d"])
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--summary-only", action="store_true")
    p.add_argument("--rescore", type=int, default=None, metavar="N",
                   help="score the finished runs again on N evaluation scenes (nothing is trained)")
    p.add_argument("--calibrate", action="store_true",
                   help="H24c: each finished student with its seen-class penalty chosen on its training images "
                        "(nothing is trained); writes <out>/study-cal.md")
    p.add_argument("--stacking", type=float, nargs="+", default=None, metavar="PENALTY",
                   help="with --rescore: also the MVP-SEG+ students with the seen logits lowered by each penalty "
                        "(exploratory; docs/history/distill-calibration.md)")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.calibrate:
        import torch

        torch.set_num_threads(a.threads)
        if not a.summary_only:
            for clip_name in a.clips:
                clip = fs.load_family_clip(clip_name)
                for layout in a.layouts:
                    for seed_dir in sorted((out / clip_name / layout).glob("seed*")):
                        if run_stats(seed_dir) is not None:
                            calibrate(seed_dir, clip, layout, int(seed_dir.name[4:]))
        result = summarise(out, "-cal")
        gain = calibration_gain(out)
        (out / "calibration-gain.md").write_text(gain)
        print(result["markdown"] + "\n" + gain)
        return result
    if a.rescore:
        import torch

        torch.set_num_threads(a.threads)
        for clip_name in a.clips:
            clip = fs.load_family_clip(clip_name)
            for layout in a.layouts:
                for seed_dir in sorted((out / clip_name / layout).glob("seed*")):
                    if run_stats(seed_dir) is not None:
                        rescore(seed_dir, clip, layout, int(seed_dir.name[4:]), a.rescore)
                        if a.stacking:
                            res = stacking(seed_dir, clip, layout, int(seed_dir.name[4:]), a.rescore, a.stacking)
                            print(f"{clip_name} {layout} {seed_dir.name}: " + " | ".join(
                                f"penalty {p:g}: U {r['miou_unseen']:.1f} h {r['hiou']:.1f}" for p, r in res.items()))
        result = summarise(out, f"-{a.rescore}")
        print(result["markdown"])
        return result
    if not a.summary_only:
        for clip in a.clips:
            for layout in a.layouts:
                for seed in a.seeds:
                    prompts = teacher_prompts(out, clip, layout, seed, a.threads)
                    for arm in a.arms:
                        student(out, clip, layout, seed, arm, prompts, a.threads)
    result = summarise(out)
    print(result["markdown"])
    return result


if __name__ == "__main__":
    main()
