"""The GPR adapter φ: a class-agnostic residual 1×1 MLP on the dense features that only GPR (Eq. 6) reads.

Eq. 6 scores a class by one direction (the global prompt's embedding) against the frozen dense features. On one
toy CLIP that direction ranks the unseen classes' presence no better than ROC-AUC 0.875, while the same features
hold more (a non-linear probe reaches 0.90–0.93; docs/history/gpr-presence-ceiling.md). φ lets GPR read its
features through a small learned map, f → norm(f + W2 GELU(W1 f + b1) + b2), shared by every class: it never sees
a class name, so what it learns on the seen classes reaches an unseen name only through the features. The
segmentation views keep the frozen features (the same kind of adapter trained for them lost unseen classes).
W2 and b2 start at zero, so a new adapter is the identity and GPR starts as Eq. 6.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# the names of its tensors in a prompt checkpoint (mvpseg.checkpoint): "gpr_adapter.<name>"
ADAPTER_TENSORS = ("w1", "b1", "w2", "b2")


class GPRAdapter(nn.Module):
    """φ for dense features of width ``dim`` with a hidden layer of ``width``; ``seed`` fixes W1's and b1's
    initialisation (PyTorch's default for a 1×1 convolution, U(±1/√dim)) without touching the global random
    state, so enabling an adapter changes nothing else of a run (its segmentation views start and train
    exactly as without one)."""

    def __init__(self, dim: int, width: int, seed: int = 0) -> None:
        super().__init__()
        if dim < 1 or width < 1:
            raise ValueError(f"a GPR adapter needs dim >= 1 and width >= 1, got {dim}, {width}")
        gen = torch.Generator().manual_seed(int(seed))
        bound = 1.0 / math.sqrt(dim)
        self.w1 = nn.Parameter(torch.empty(width, dim).uniform_(-bound, bound, generator=gen))
        self.b1 = nn.Parameter(torch.empty(width).uniform_(-bound, bound, generator=gen))
        self.w2 = nn.Parameter(torch.zeros(dim, width))
        self.b2 = nn.Parameter(torch.zeros(dim))

    @property
    def dim(self) -> int:
        return self.w1.shape[1]

    @property
    def width(self) -> int:
        return self.w1.shape[0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Dense features B×D×h×w → adapted unit-norm features B×D×h×w."""
        f = F.normalize(features, dim=1)
        hidden = F.gelu(torch.einsum("bdhw,kd->bkhw", f, self.w1.to(f.dtype)) + self.b1.to(f.dtype)[:, None, None])
        delta = torch.einsum("bkhw,dk->bdhw", hidden, self.w2.to(f.dtype)) + self.b2.to(f.dtype)[:, None, None]
        return F.normalize(f + delta, dim=1)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """{"gpr_adapter.w1": width×D, ".b1": width, ".w2": D×width, ".b2": D}, float32 on the CPU."""
        return {f"gpr_adapter.{k}": getattr(self, k).detach().float().cpu().contiguous() for k in ADAPTER_TENSORS}

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, torch.Tensor]) -> "GPRAdapter":
        """Inverse of ``checkpoint_tensors`` (the ``gpr_adapter.*`` entries of a prompt checkpoint), strict:
        all four tensors, shapes consistent with one (D, width), finite; ValueError names the problem."""
        keys = {f"gpr_adapter.{k}" for k in ADAPTER_TENSORS}
        found = {k for k in tensors if k.startswith("gpr_adapter.")}
        if found != keys:
            raise ValueError(f"GPR adapter tensors {sorted(found)}, expected {sorted(keys)}")
        w1 = tensors["gpr_adapter.w1"]
        if w1.ndim != 2:
            raise ValueError(f"tensor 'gpr_adapter.w1' has shape {tuple(w1.shape)}, expected width×D")
        width, dim = w1.shape
        shapes = {"w1": (width, dim), "b1": (width,), "w2": (dim, width), "b2": (dim,)}
        for k, shape in shapes.items():
            t = tensors[f"gpr_adapter.{k}"]
            if tuple(t.shape) != shape:
                raise ValueError(f"tensor 'gpr_adapter.{k}' has shape {tuple(t.shape)}, expected {shape}")
            if not torch.isfinite(t).all():
                raise ValueError(f"tensor 'gpr_adapter.{k}' contains NaN or infinite values")
        adapter = cls(dim, width)
        adapter.load_state_dict({k: tensors[f"gpr_adapter.{k}"].float() for k in ADAPTER_TENSORS})
        return adapter
