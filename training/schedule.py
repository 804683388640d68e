"""Learning-rate schedule with mmcv semantics: linear warmup on top of a poly / constant policy.

``lr_at(it)`` is a pure function of the (0-based) iteration, so the scheduler's state is its config
and resuming only needs the iteration.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LRSchedule:
    base_lr: float
    max_iters: int
    warmup_iters: int = 1000
    warmup_ratio: float = 1e-3
    policy: str = "poly"  # "poly" (mmseg default, power 0.9) or "constant"
    power: float = 0.9
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.policy not in ("poly", "constant"):
            raise ValueError(f"unknown lr policy {self.policy!r}")

    def regular_lr(self, it: int) -> float:
        if self.policy == "constant":
            return self.base_lr
        frac = 1.0 - min(it, self.max_iters) / self.max_iters
        return (self.base_lr - self.min_lr) * frac**self.power + self.min_lr

    def lr_at(self, it: int) -> float:
        lr = self.regular_lr(it)
        if it < self.warmup_iters:
            k = (1 - it / self.warmup_iters) * (1 - self.warmup_ratio)
            lr = lr * (1 - k)
        return lr

    def apply(self, optimizer, it: int) -> float:
        lr = self.lr_at(it)
        for g in optimizer.param_groups:
            g["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return asdict(self)
