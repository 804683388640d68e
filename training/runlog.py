"""JSONL run log and a progress bar (main process only), and the one reading of its records as scalars that
TensorBoard (``training/tensorboard_log.py``) and the run report (``training/report.py``) share."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Protocol, Sequence

from tqdm import tqdm

# Scalar families: the tag prefix before "/" (TensorBoard's sections; one subplot each in the report).
LOSS, LR, TEMPERATURE, VALIDATION, REFERENCE, EVAL, SPEED, PIXELS = (
    "loss", "lr", "temperature", "validation", "validation_reference", "eval", "speed", "pixels")
# iteration-record key -> tag (train_prompts: loss, seg, cls, oc, tau1, tau2; distill: loss, pseudo_px, ...)
_ITER_TAGS = {"loss": f"{LOSS}/total", "seg": f"{LOSS}/seg", "cls": f"{LOSS}/cls", "oc": f"{LOSS}/oc", "lr": LR,
              "tau1": f"{TEMPERATURE}/tau1", "tau2": f"{TEMPERATURE}/tau2", "img_per_s": f"{SPEED}/img_per_s",
              "step_s": f"{SPEED}/step_s", "pseudo_px": f"{PIXELS}/pseudo", "labelled_px": f"{PIXELS}/labelled"}
VALIDATION_KEYS = ("miou_trained", "miou_held_out", "hiou", "score")
EVAL_METRICS = ("miou_seen", "miou_unseen", "hiou")


class RecordSink(Protocol):
    """Something else that receives every logged record (``TensorBoardLog``)."""

    def log(self, record: dict) -> None: ...


class JsonlLogger:
    """Appends one JSON object per line; on resume drops records of iterations after ``resume_iter``
    (they belong to the interrupted run and are about to be recomputed)."""

    def __init__(self, path: Path | None, enabled: bool = True, resume_iter: int | None = None,
                 sinks: Sequence[RecordSink] = ()):
        self.path = Path(path) if path else None
        self.enabled = enabled and self.path is not None
        self.sinks = tuple(sinks) if self.enabled else ()
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_iter is not None and self.path.is_file():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # torn last line of a killed run
                if rec.get("iter") is None or rec["iter"] <= resume_iter:
                    kept.append(line)
            self.path.write_text("".join(k + "\n" for k in kept))
        elif resume_iter is None and self.path.exists():
            self.path.unlink()

    def log(self, record: dict) -> None:
        """Appends ``record`` with its wall-clock ``time`` (Unix seconds; non-finite floats → null) and hands it
        to the sinks."""
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        clean.setdefault("time", round(time.time(), 3))
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        for sink in self.sinks:
            sink.log(clean)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def read_jsonl_lenient(path: Path) -> tuple[list[dict], int]:
    """(records, number of unreadable lines): lines that are not a JSON object (a torn last line of a killed
    run, a hand edit) are skipped and counted."""
    records, bad = [], 0
    for line in Path(path).read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(rec, dict):
            records.append(rec)
        else:
            bad += 1
    return records, bad


def _number(value) -> float | None:
    """A finite int or float as float; anything else (None, NaN, a bool, a string) as None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def scalars_of(record: dict) -> tuple[int | None, dict[str, float]]:
    """(step, {tag: value}) of one log record, tags as ``family/name`` (``family`` alone for lr): iteration
    records (losses, lr, τ1/τ2, speed, pseudo-label pixels), ``validation`` (mIoU of trained / held-out seen
    classes, hIoU, selection score), ``validation_reference`` (the 85 templates on the same images, step 0) and
    distill's ``done`` record (final evaluation per method: ``eval/<method>/miou_seen`` …)."""
    event, step = record.get("event"), record.get("iter")
    out: dict[str, float] = {}
    if event is None and step is not None:
        pairs = ((tag, record.get(key)) for key, tag in _ITER_TAGS.items())
    elif event in ("validation", "validation_reference"):
        family = VALIDATION if event == "validation" else REFERENCE
        pairs = ((f"{family}/{key}", record.get(key)) for key in VALIDATION_KEYS)
        step = step if event == "validation" else 0
    elif event == "done":  # distill: "<method> miou_seen": value
        pairs = ((f"{EVAL}/{key.rsplit(' ', 1)[0]}/{key.rsplit(' ', 1)[1]}", v) for key, v in record.items()
                 if " " in key and key.rsplit(" ", 1)[1] in EVAL_METRICS)
    else:
        return step, out
    for tag, value in pairs:
        if _number(value) is not None:
            out[tag] = _number(value)
    return step, out


class Progress:
    """tqdm bar over iterations showing loss terms and images/s; silent on non-main ranks."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "train"):
        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=not enabled,
                        dynamic_ncols=True, leave=True)
        self._t = time.perf_counter()
        self._images = 0

    def update(self, images: int, **terms: float) -> float:
        """Advance one iteration; returns images/s since the previous call."""
        now = time.perf_counter()
        ips = images / max(now - self._t, 1e-9)
        self._t = now
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in terms.items()} | {"img/s": f"{ips:.2f}"},
                             refresh=False)
        self.bar.update(1)
        return ips

    def close(self) -> None:
        self.bar.close()
