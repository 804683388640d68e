"""``python -m training.report RUN_DIR [RUN_DIR …] [--out DIR]``: a training run's ``log.jsonl`` as curves and a
summary, for any run of ``training.train_prompts`` or ``training.distill`` (with or without ``--tensorboard``).

Writes ``DIR/curves.png`` (one figure, the runs overlaid, one subplot per scalar family the logs hold: losses,
learning rate, temperatures τ1/τ2, validation mIoU — train_prompts' held-out and trained seen classes, the 85
templates' reference dashed, distill's final evaluation as markers) and ``DIR/summary.md`` (per run: the
command, the main settings, iterations, best and last validation, wall time, and the full config).  Default
DIR: ``RUN_DIR/report`` for one run, ``./report`` for several.  Lines of a log that cannot be read (a torn
last line of a killed run) are skipped and counted; a missing folder or log is one ``error:`` line, exit 2.
"""
from __future__ import annotations

if not __package__:  # run by path (python training/report.py): import as the package would
    import _as_script; __package__ = _as_script.PACKAGE  # noqa: E702

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .runlog import EVAL, LOSS, LR, REFERENCE, TEMPERATURE, VALIDATION, read_jsonl_lenient, scalars_of

LOG_NAME = "log.jsonl"
PANELS = ((LOSS, "losses"), (LR, "learning rate"), (TEMPERATURE, "temperatures τ1, τ2"),
          (VALIDATION, "validation mIoU"))
# settings shown in the summary (the full config follows in a collapsed block)
KEY_SETTINGS = ("dataset", "data_root", "clip", "pretrained", "dense", "recipe", "variant", "prompts", "backbone",
                "head", "optimizer", "lr", "max_iters", "global_batch", "seed")


class ReportError(Exception):
    """A run folder or log that cannot be reported on (one line)."""


@dataclass
class Run:
    """One run folder's log, read leniently."""

    path: Path
    label: str
    records: list[dict]
    bad_lines: int = 0
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for rec in self.records:
            step, scalars = scalars_of(rec)
            for tag, value in scalars.items():
                self.series.setdefault(tag, []).append((int(step or 0), value))

    def events(self, name: str) -> list[dict]:
        return [r for r in self.records if r.get("event") == name]

    @property
    def start(self) -> dict:
        starts = self.events("start") or self.events("resume")
        return starts[0] if starts else {}

    @property
    def config(self) -> dict:
        cfg = self.start.get("config")
        return cfg if isinstance(cfg, dict) else {}

    @property
    def kind(self) -> str:
        if "backbone" in self.config or "pseudo_px" in {k for r in self.records for k in r}:
            return "distill"
        return "train_prompts" if self.config or "tau1" in {k for r in self.records for k in r} else "unknown"

    @property
    def iterations(self) -> int | None:
        iters = [r["iter"] for r in self.records if isinstance(r.get("iter"), int)]
        return max(iters) if iters else None

    def wall_seconds(self) -> float | None:
        """Seconds from each start/resume record to the last record before the next one, summed (the time a
        killed run was down is not counted); logs without timestamps: the sum of the iterations' step_s."""
        total, seg_start, last = 0.0, None, None
        for rec in self.records:
            t = rec.get("time")
            if not isinstance(t, (int, float)):
                continue
            if rec.get("event") in ("start", "resume"):
                if seg_start is not None and last is not None:
                    total += last - seg_start
                seg_start = t
            last = t
        if seg_start is not None and last is not None:
            return total + last - seg_start
        steps = [r["step_s"] for r in self.records if isinstance(r.get("step_s"), (int, float))]
        return float(sum(steps)) if steps else None

    def validation(self) -> tuple[dict | None, dict | None]:
        """(best, last) validation: train_prompts' selection records (best = the one at ``best_iter``, else the
        highest score); distill: (None, its final evaluation), as it does not validate while it trains."""
        vals = self.events("validation")
        if vals:
            best_iter = vals[-1].get("best_iter")
            best = next((v for v in vals if v.get("iter") == best_iter), None)
            if best is None:
                scored = [v for v in vals if isinstance(v.get("score"), (int, float))]
                best = max(scored, key=lambda v: v["score"]) if scored else None
            return best, vals[-1]
        done = [r for r in self.events("done") if any(k.startswith(f"{EVAL}/") for k in scalars_of(r)[1])]
        return None, (done[-1] if done else None)


def load_run(path: str | Path) -> Run:
    """Reads RUN_DIR/log.jsonl (or a log file given directly); ReportError when there is nothing to read."""
    p = Path(path)
    if not p.exists():
        raise ReportError(f"{p}: no such run folder")
    log = p if p.is_file() else p / LOG_NAME
    if not log.is_file():
        raise ReportError(f"{p} has no {LOG_NAME} (is it the --out folder of training.train_prompts or "
                          "training.distill?)")
    try:
        records, bad = read_jsonl_lenient(log)
    except OSError as e:
        raise ReportError(f"cannot read {log}: {e}") from None
    if not records:
        raise ReportError(f"{log} holds no readable records ({bad} unreadable lines)")
    run_dir = log.parent
    return Run(run_dir, run_dir.name or str(run_dir), records, bad)


def _labels(runs: list[Run]) -> None:
    """Distinct labels: the folder name, with its parent when two runs share a name."""
    names = [r.label for r in runs]
    for r in runs:
        if names.count(r.label) > 1:
            r.label = f"{r.path.parent.name}/{r.path.name}"


def _fmt(v, digits: int = 2) -> str:
    if isinstance(v, bool) or v is None:
        return "–" if v is None else str(v)
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) >= 10 ** -digits or v == 0 else f"{v:.3g}"
    return str(v)


def _duration(s: float | None) -> str:
    if s is None:
        return "–"
    m, sec = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m {sec:02d}s" if h else (f"{m}m {sec:02d}s" if m else f"{s:.1f} s")


def _scores(rec: dict) -> str:
    return (f"score {_fmt(rec.get('score'))} (held-out {_fmt(rec.get('miou_held_out'))}, trained "
            f"{_fmt(rec.get('miou_trained'))})")


def _validation_text(rec: dict | None) -> str:
    if rec is None:
        return "–"
    if rec.get("event") == "validation":
        return f"{_scores(rec)} at iteration {rec.get('iter')}"
    by_method: dict[str, dict[str, float]] = {}
    for tag, v in scalars_of(rec)[1].items():  # eval/<method>/<metric>
        _, method, metric = tag.split("/", 2)
        by_method.setdefault(method, {})[metric] = v
    return "; ".join(f"{m}: mIoU(S) {_fmt(d.get('miou_seen'))}, mIoU(U) {_fmt(d.get('miou_unseen'))}, hIoU "
                     f"{_fmt(d.get('hiou'))}" for m, d in by_method.items()) + f" at iteration {rec.get('iter')}"


def render_markdown(runs: Sequence[Run]) -> str:
    """The summary: one table over the runs, then a section per run."""
    lines = ["# Training runs", "", "| run | script | dataset | iterations | best validation | last validation "
             "| wall time |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        best, last = r.validation()
        lines.append(f"| {r.label} | {r.kind} | {r.config.get('dataset', '–')} | {_fmt(r.iterations)} | "
                     f"{_validation_text(best)} | {_validation_text(last)} | {_duration(r.wall_seconds())} |")
    for r in runs:
        best, last = r.validation()
        lines += ["", f"## {r.label}", "", f"- folder: `{r.path}`", f"- script: {r.kind}"]
        if r.start.get("command"):
            lines.append(f"- command: `{r.start['command']}`")
        lines += [f"- iterations: {_fmt(r.iterations)}", f"- wall time: {_duration(r.wall_seconds())}",
                  f"- best validation: {_validation_text(best)}", f"- last validation: {_validation_text(last)}"]
        ref = r.events(REFERENCE)
        if ref:
            lines.append(f"- 85 templates on the same validation images: {_scores(ref[-1])}")
        resumes = len(r.events("resume"))
        if resumes:
            lines.append(f"- resumed {resumes} time(s)")
        if r.bad_lines:
            lines.append(f"- {r.bad_lines} unreadable log line(s) skipped")
        shown = [(k, r.config[k]) for k in KEY_SETTINGS if k in r.config]
        if shown:
            lines += ["", "| setting | value |", "| --- | --- |", *(f"| {k} | `{json.dumps(v)}` |" for k, v in shown)]
        if r.config:
            lines += ["", "<details><summary>full config</summary>", "", "```json",
                      json.dumps(r.config, indent=1, sort_keys=True), "```", "", "</details>"]
    return "\n".join(lines) + "\n"


def plot_curves(runs: Sequence[Run], path: Path) -> list[str]:
    """One figure, a subplot per family present in any run (PANELS order), runs in one colour each; returns the
    panel titles drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [(fam, title) for fam, title in PANELS if any(
        t == fam or t.startswith(fam + "/") or (fam == VALIDATION and t.startswith((EVAL + "/", REFERENCE + "/")))
        for r in runs for t in r.series)]
    if not present:
        raise ReportError("the logs hold no scalars to plot (no iteration or validation records)")
    fig, axes = plt.subplots(len(present), 1, figsize=(8, 2.8 * len(present)), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for ax, (fam, title) in zip(axes[:, 0], present):
        for i, run in enumerate(runs):
            c = colours[i % len(colours)]
            tags = sorted((t for t in run.series if t == fam or t.startswith(fam + "/")),
                          key=lambda t: (not t.endswith("/total"), t))  # the total loss solid
            if fam == VALIDATION:
                tags = [t for t in tags if t.endswith(("/miou_held_out", "/miou_trained"))]
            for j, tag in enumerate(tags):
                xs, ys = zip(*run.series[tag])
                ax.plot(xs, ys, styles[j % len(styles)], color=c, marker="." if len(xs) < 30 else None,
                        label=f"{run.label}: {tag.split('/', 1)[-1]}")
            if fam == VALIDATION:
                for tag in (t for t in run.series if t == f"{REFERENCE}/miou_held_out"):
                    ax.axhline(run.series[tag][-1][1], color=c, ls=(0, (1, 3)), lw=1,
                               label=f"{run.label}: 85 templates, held-out")
                for k, tag in enumerate(sorted(t for t in run.series if t.startswith(EVAL + "/") and
                                               t.endswith("/miou_unseen"))):
                    xs, ys = zip(*run.series[tag])
                    ax.plot(xs, ys, "o^sD"[k % 4], color=c, label=f"{run.label}: {tag.split('/')[1]} mIoU(U)")
        ax.set_title(title)
        ax.set_xlabel("iteration")
        if fam == LR:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if fam == TEMPERATURE:
            ax.set_yscale("log")  # τ1 ≈ 10–100 and τ2 ≈ 0.07 on one axis
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [title for _, title in present]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="--out folders of training runs (or log.jsonl files)")
    p.add_argument("--out", default=None, help="folder for curves.png and summary.md (default: RUN_DIR/report for "
                                               "one run, ./report for several)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Writes the report; returns 0, or 2 after one ``error:`` line."""
    args = build_parser().parse_args(argv)
    try:
        runs = [load_run(p) for p in args.runs]
        _labels(runs)
        for r in runs:
            if r.bad_lines:
                print(f"warning: {r.path / LOG_NAME}: skipped {r.bad_lines} unreadable line(s)", file=sys.stderr)
        out = Path(args.out) if args.out else (runs[0].path / "report" if len(runs) == 1 else Path("report"))
        plot_curves(runs, out / "curves.png")
        (out / "summary.md").write_text(render_markdown(runs))
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out / 'curves.png'} and {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
