"""Which student and which schedule ``training.distill`` uses when the command line leaves them out (issue #24).

The real benchmarks keep MaskCLIP+'s settings (paper Sec. 4.3: "the same settings as MaskCLIP"): a dilated
ResNet-101 from ImageNet weights, DeepLab, 20k / 40k / 80k iterations of 16 images. Everything else — a folder of
your own images, the toy world — is sized here, because 20k iterations of 16 crops of 512 px are days on a CPU:

* **student**: the CLIP's own ResNet image tower, frozen and dilated to output stride 16, with MaskCLIP's
  projection plus a zero-initialised 3×3 context branch as head (``--backbone clip``,
  ``mvpseg.student.clip_trunk``: the student starts at its teacher); a ViT CLIP has no such tower and gets
  the dilated ResNet-101;
* **schedule**: ``EPOCHS`` passes over the training images at ``CPU_BATCH`` (CPU) or 16 (GPU) images a step,
  capped on a CPU so that the training steps take at most ``CPU_BUDGET_S`` at the step time measured on this
  machine before training (``measure_step``); MVP-SEG guides the first tenth (MaskCLIP+'s rule,
  ``pseudo_labels.default_switch_iter``).

Measured in docs/history/distill-study.md; what holds now in docs/distill.md. Every resolved value is written
to the run's log and config, so ``--resume`` continues the same schedule.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from mvpseg.clip_backbone import FrozenCLIP
from mvpseg.dense.resnet import is_modified_resnet
from mvpseg.student import CLIP_BACKBONE, MASKCLIP_HEAD

from .checkpointing import load_state
from .distributed import DistContext
from .pseudo_labels import default_switch_iter

# MaskCLIP+ zero-shot configs (paper Sec. 4.3: "the same settings as MaskCLIP").
BENCHMARK_DEFAULTS = {
    "voc20": dict(max_iters=20000, lr=0.01, weight_decay=5e-4, head="deeplabv2"),
    "context60": dict(max_iters=40000, lr=0.004, weight_decay=1e-4, head="deeplabv3plus"),
    "cocostuff171": dict(max_iters=80000, lr=0.01, weight_decay=5e-4, head="deeplabv2"),
}
EPOCHS = 30  # passes over the training images (docs/history/distill-study.md: 10 left fam-b's student +1.5)
CPU_BATCH = 8  # images a step on a CPU (the toy study's; 16 on a GPU, MaskCLIP+'s)
CPU_BUDGET_S = 20 * 60  # training steps on a CPU: with data, rendering and evaluation a run stays under 30 min
MIN_ITERS, MAX_ITERS = 100, 20000
CLIP_TOWER_LR = 0.2  # SGD lr of the CLIP-tower student (toy pilots: 0.01 barely moves it, 0.2–0.5 alike)
RESNET_LR = 0.01  # MaskCLIP+'s, for a torchvision ResNet student
CLIP_TOWER_STRIDE = 16  # dilating a CLIP tower to 8 hurt the weaker toy CLIPs (fam-b: 23.5 vs 29.1 untrained)
CLIP_TOWER_CONTEXT = 128  # hidden channels of the maskclip head's residual 3×3 context branch


@dataclass(frozen=True)
class SizedSchedule:
    """A schedule sized to the data and the device, and the one-line reason the log shows."""

    max_iters: int
    switch_iter: int
    global_batch: int
    reason: str


def size_schedule(n_images: int, device_type: str, step_seconds: float | None = None,
                  global_batch: int | None = None, epochs: float = EPOCHS,
                  cpu_budget_s: float = CPU_BUDGET_S) -> SizedSchedule:
    """``epochs`` passes over ``n_images`` at ``global_batch`` images a step (default: 8 on a CPU, 16 on a GPU),
    in [MIN_ITERS, MAX_ITERS]; on a CPU also at most ``cpu_budget_s / step_seconds`` steps."""
    if n_images < 1:
        raise ValueError("the training set is empty")
    batch = global_batch or (CPU_BATCH if device_type == "cpu" else 16)
    iters = min(MAX_ITERS, max(MIN_ITERS, math.ceil(epochs * n_images / batch)))
    why = f"{epochs:g} epochs of {n_images} images at {batch} a step"
    if device_type == "cpu" and step_seconds is not None and step_seconds > 0:
        cap = max(MIN_ITERS // 2, int(cpu_budget_s / step_seconds))
        if cap < iters:
            iters, why = cap, f"{why}, capped to {cpu_budget_s / 60:.0f} CPU-minutes at {step_seconds:.2f} s a step"
        else:
            why = f"{why}; ≈ {iters * step_seconds / 60:.1f} CPU-minutes at {step_seconds:.2f} s a step"
    return SizedSchedule(iters, default_switch_iter(iters), batch, why)


def measure_step(student: torch.nn.Module, class_emb: torch.Tensor, bg_index: int | None, batch: int,
                 crop: int, repeats: int = 2) -> float:
    """Seconds of one training step (forward, loss, backward) of a *copy* of ``student`` on ``batch`` random
    crops of ``crop`` px: the student, its optimiser state and the RNG streams of training are left alone."""
    probe = copy.deepcopy(student).train()
    device = next(probe.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.rand(batch, 3, crop, crop, generator=gen).to(device)
    target = torch.randint(0, class_emb.shape[0], (batch, crop, crop), generator=gen).to(device)
    times = []
    for _ in range(repeats + 1):  # the first step warms allocators and kernels up
        t0 = time.perf_counter()
        logits = F.interpolate(probe(probe.normalize(x), class_emb, bg_index), size=(crop, crop), mode="bilinear",
                               align_corners=False)
        F.cross_entropy(logits, target).backward()
        probe.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    del probe
    return min(times[1:])


def resolve_student(cfg, clip: FrozenCLIP):
    """Backbone, head and lr left open by the command line: the CLIP's own ResNet tower (a ViT CLIP: the dilated
    ResNet-101 of MaskCLIP+), MaskCLIP's projection as its head, and the lr of that kind of student."""
    resnet_tower = is_modified_resnet(clip.model.visual)
    if cfg.backbone == CLIP_BACKBONE and not resnet_tower:
        raise SystemExit(f"--backbone {CLIP_BACKBONE} needs a ResNet CLIP; this CLIP's image tower is a "
                         f"{type(clip.model.visual).__name__}: use --backbone resnet101 (or another ResNet)")
    tower_ok = resnet_tower and cfg.head in (None, MASKCLIP_HEAD)  # another head asked for: a torchvision ResNet
    backbone = cfg.backbone or (CLIP_BACKBONE if tower_ok else "resnet101")
    head = cfg.head or (MASKCLIP_HEAD if backbone == CLIP_BACKBONE else "deeplabv2")
    tower = backbone == CLIP_BACKBONE
    lr = cfg.lr if cfg.lr is not None else (CLIP_TOWER_LR if tower else RESNET_LR)
    stride = cfg.output_stride or (CLIP_TOWER_STRIDE if tower else 8)
    context = cfg.head_context if cfg.head_context is not None else (CLIP_TOWER_CONTEXT if tower else 0)
    return replace(cfg, backbone=backbone, head=head, lr=lr, output_stride=stride, head_context=context)


def resolve_schedule(cfg, n_images: int, ctx: DistContext, resume_path: Path | None, probe):
    """Iterations, teacher-guided iterations and batch left open by the command line: those of the checkpoint
    being resumed, else ``size_schedule`` (``probe(batch)``: seconds of one training step on this device)."""
    if None not in (cfg.max_iters, cfg.switch_iter, cfg.global_batch):
        return cfg, None
    if resume_path is not None:  # the schedule the run started with, whatever this machine measures now
        saved = load_state(resume_path)["config"]
        return replace(cfg, **{k: saved[k] if getattr(cfg, k) is None else getattr(cfg, k)
                               for k in ("max_iters", "switch_iter", "global_batch")}), "as the resumed run"
    step = None
    if cfg.max_iters is None and ctx.device.type == "cpu":
        step = probe(max(1, (cfg.global_batch or CPU_BATCH) // ctx.world_size))
    sized = size_schedule(n_images, ctx.device.type, step, cfg.global_batch)
    max_iters = cfg.max_iters if cfg.max_iters is not None else sized.max_iters
    switch = cfg.switch_iter if cfg.switch_iter is not None else default_switch_iter(max_iters)
    if not 0 <= switch <= max_iters:
        raise SystemExit(f"--switch-iter {switch} must lie in [0, the {max_iters} iterations sized for this run]")
    return replace(cfg, max_iters=max_iters, switch_iter=switch, global_batch=sized.global_batch), sized.reason
