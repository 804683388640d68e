"""JSONL run log and a progress bar (main process only)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from tqdm import tqdm


class JsonlLogger:
    """Appends one JSON object per line; on resume drops records of iterations after ``resume_iter``
    (they belong to the interrupted run and are about to be recomputed)."""

    def __init__(self, path: Path | None, enabled: bool = True, resume_iter: int | None = None):
        self.path = Path(path) if path else None
        self.enabled = enabled and self.path is not None
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
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


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
