"""One prompt-learning step, the warm start and the temperature calibration: the core that
``training.train_prompts`` (datasets, DDP, checkpoints) and the demo's Learn tab (a few cached images) share.

Distributed training plugs in through two callables, so this module needs no process group: ``reduce_grads``
averages the gradients of the trainable tensors over processes, and ``seg_weight(labels)`` turns a process's
per-pixel L_seg mean into its share of the global batch's mean.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Callable, Iterable, Sequence

import torch

from ..losses import anchor_loss, oc_loss
from ..model import MVPSeg
from ..prompts import LearnedPrompts, TextViews
from .recipe import LearnRecipe, build_optimizer

GradReducer = Callable[[list[torch.Tensor]], None]


def _no_reduce(params: list[torch.Tensor]) -> None:
    return None


class PromptLearner:
    """Learns ``model.prompts`` (a ``LearnedPrompts``) with ``recipe``: per step one text-tower pass for all
    (k+1)·C prompts of the vocabulary, Eq. 4–8 on the given image features, Eq. 10 + the anchor, one optimiser
    step. ``encoder`` (optional) encodes prompts faster than ``model.text_features`` (the shared-prefix
    encoder of training); ``scaler`` / ``amp`` are torch's GradScaler and an autocast context factory."""

    def __init__(self, model: MVPSeg, recipe: LearnRecipe, *, encoder=None, reduce_grads: GradReducer = _no_reduce,
                 seg_weight: Callable[[torch.Tensor], float] | None = None,
                 scaler: torch.amp.GradScaler | None = None, amp: Callable[[], contextlib.AbstractContextManager]
                 = contextlib.nullcontext) -> None:
        if not isinstance(model.prompts, LearnedPrompts):
            raise TypeError(f"only learned prompts can be learned, not {type(model.prompts).__name__}")
        self.model, self.recipe, self.encoder = model, recipe, encoder
        self.reduce_grads, self.seg_weight, self.amp = reduce_grads, seg_weight, amp
        self.scaler = scaler or torch.amp.GradScaler("cuda", enabled=False)
        self.params = model.trainable_parameters()
        self.opt = build_optimizer(recipe, self.params)
        self.weights = recipe.loss_weights(model.prompts.use_global)

    @property
    def prompts(self) -> LearnedPrompts:
        return self.model.prompts

    def text(self, vocab: Sequence[str]) -> TextViews:
        """K(+1)×C×D text embeddings of the vocabulary (gradients flow into the context vectors)."""
        return self.encoder.encode(self.prompts, tuple(vocab)) if self.encoder else self.model.text_features(vocab)

    def loss(self, outputs, labels: torch.Tensor, weights=None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Eq. 10 terms and their total, L_seg's pixel mean rescaled by ``seg_weight`` (a process's share of the
        global batch; the class mean is each process's, averaged over processes)."""
        weights = weights or self.weights
        losses = self.model.losses(outputs, labels, weights, self.recipe.cls_mode,
                                   seg_reduction=self.recipe.seg_reduction)
        scale = self.seg_weight(labels) if self.seg_weight and self.recipe.seg_reduction == "pixel" else 1.0
        return losses, losses["total"] + (scale - 1.0) * weights.seg * losses["seg"]

    def step(self, feats: torch.Tensor, labels: torch.Tensor, vocab: Sequence[str],
             prior: torch.Tensor | None = None, lr: float | None = None) -> dict[str, torch.Tensor]:
        """One optimiser step on dense features B×D×h×w (frozen image tower, computed by the caller, possibly
        cached) and labels B×H×W indexing ``vocab`` (255 = ignore). ``prior``: C×D handcrafted embeddings
        for the anchor (``recipe.lambda_prior``). Returns the detached loss terms {total, seg, cls, oc}."""
        if lr is not None:
            for group in self.opt.param_groups:
                group["lr"] = lr
        with self.amp():
            text = self.text(vocab)
            outputs = self.model.head(feats, text)
        losses, total = self.loss(outputs, labels)
        if prior is not None and self.recipe.lambda_prior > 0:
            total = total + self.recipe.lambda_prior * anchor_loss(text.seg, prior)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.reduce_grads(self.params)
        self.scaler.step(self.opt)
        self.scaler.update()
        return {k: v.detach() for k, v in losses.items()}

    def global_text(self, vocab: Sequence[str], seg: torch.Tensor) -> TextViews:
        """TextViews with the global prompt's embeddings (one text pass of its row alone; gradients flow into
        it) and ``seg`` (K×C×D, fixed) as the segmentation views."""
        names = tuple(vocab)
        plain = self.encoder.encode_plain(self.prompts, names, rows=slice(0, 1)) if self.encoder else None
        glob = self.prompts.encode_global(self.model.clip, names, plain)
        return TextViews(seg.detach(), glob, self.prompts.view_names, names)

    def step_global(self, feats: torch.Tensor, labels: torch.Tensor, vocab: Sequence[str], seg: torch.Tensor,
                    lr: float | None = None) -> dict[str, torch.Tensor]:
        """One optimiser step of GPR's branch alone — the global prompt, τ2, the GPR bias and adapter — with the
        segmentation views fixed at ``seg`` (K×C×D): what training does once the views' selection has stopped
        (``--gpr-select views``), at about a (k+1)-th of ``step``'s text cost. The global branch's gradients are
        those ``step`` would give: the views enter Eq. 10 only through L_seg's log-softmax of the fused logits
        and OCLoss, terms in which g does not occur (Eq. 8 adds log g_c to log m^f_c), so the loss here is
        λ_seg L_seg + λ_cls L_cls without OCLoss and the anchor. The views' own tensors (the rows 1.. of
        ``ctx``, log τ1), which share the optimiser, are put back after its step, so momentum and weight decay
        cannot move them. Arguments and return as ``step``."""
        if lr is not None:
            for group in self.opt.param_groups:
                group["lr"] = lr
        prompts = self.prompts
        views, log_tau1 = prompts.ctx.detach()[1:].clone(), prompts.log_tau1.detach().clone()
        weights = replace(self.weights, oc=0.0)
        with self.amp():
            outputs = self.model.head(feats, self.global_text(vocab, seg))
        losses, total = self.loss(outputs, labels, weights)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.reduce_grads(self.params)
        self.scaler.step(self.opt)
        self.scaler.update()
        with torch.no_grad():
            prompts.ctx[1:].copy_(views)
            prompts.log_tau1.copy_(log_tau1)
        return {k: v.detach() for k, v in losses.items()}

    def warm_start(self, vocab: Sequence[str], targets: torch.Tensor, steps: int | None = None
                   ) -> tuple[float, float]:
        """``fit_to_templates`` with the recipe's lr and OCLoss choice for ``steps`` (default: the recipe's
        ``init_fit``; a caller may run it in chunks); (mean cosine, L_OC)."""
        r = self.recipe
        return fit_to_templates(self.prompts, self.model.clip, self.encoder, tuple(vocab), targets,
                                r.init_fit if steps is None else steps, r.init_fit_lr,
                                r.lambda_oc if r.init_fit_oc else 0.0)

    def calibrate(self, vocab: Sequence[str], batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                  ) -> tuple[float, float | None]:
        """``calibrate_temperatures`` on (features, labels) batches with the recipe's steps and lr, on the
        training loss without the terms that do not depend on τ (OCLoss, the anchor)."""
        no_oc = replace(self.weights, oc=0.0)
        return calibrate_temperatures(self.model, self.encoder, tuple(vocab), batches,
                                      lambda out, y: self.loss(out, y, no_oc)[1], self.recipe.calib_steps,
                                      self.recipe.calib_lr, self.reduce_grads, self.amp)


def fit_to_templates(prompts: LearnedPrompts, clip, encoder, vocab: tuple[str, ...], targets: torch.Tensor,
                     steps: int, lr: float, oc_weight: float = 0.0) -> tuple[float, float]:
    """Text-only warm start: AdamW on mean_{views, classes} (1 − cos(e^i_c, t_c)) for every prompt (global one
    included), t = the C×D handcrafted embeddings, plus ``oc_weight`` · L_OC (Eq. 5, mean over pairs) of the
    segmentation prompts. Without that term the views converge to nearly the same context (|cos| ≈ 0.9
    between their mean tokens) and OCLoss pulls them apart in the first steps of learning. Returns the
    final (mean cosine, L_OC). Its own optimiser, so the training optimiser's state starts clean. It fits the
    *plain* embeddings of the context, also for a set in residual form (which is handcrafted at its start by
    construction): there the warm start chooses where the context's text features start from."""
    opt = torch.optim.AdamW([prompts.ctx], lr=lr, weight_decay=0.0)
    cos, oc = torch.zeros(()), oc_loss(prompts.seg_ctx.detach())
    for _ in range(steps):
        views = (encoder.encode_plain(prompts, vocab) if encoder
                 else prompts.encode_context(clip, vocab, prompts.ctx))  # P×C×D, global prompt included
        per_view = (views.float() * targets[None]).sum(-1).mean(-1)  # P
        cos = per_view.mean()
        oc = oc_loss(prompts.seg_ctx)
        opt.zero_grad(set_to_none=True)
        # every prompt's term weighs 1/k whether or not a global prompt is among them, so the segmentation
        # views' warm start is the same with and without GPR (Table 1 rows 4 and 5 then share their views)
        (1.0 - per_view.sum() / prompts.n_seg + oc_weight * oc).backward()
        opt.step()
    return float(cos.detach()), float(oc.detach())


def calibrate_temperatures(model: MVPSeg, encoder, vocab: tuple[str, ...],
                           batches: Iterable[tuple[torch.Tensor, torch.Tensor]], loss, steps: int, lr: float,
                           reduce_grads: GradReducer = _no_reduce,
                           amp=contextlib.nullcontext) -> tuple[float, float | None]:
    """Fits log τ1 and log τ2 alone (context frozen: the text embeddings are computed once) for ``steps`` Adam
    steps on ``batches`` of (dense features B×D×h×w, labels B×H×W). ``loss(outputs, labels)`` is the training
    loss without the terms that do not depend on τ (OCLoss, the anchor): λ_seg L_seg + λ_cls L_cls, reduced as
    the training loop reduces it (so W processes match one).

    Why: τ1 = 100/k and τ2 = 0.07 suit CLIP's logit scale, not every CLIP's dense features; a model that starts
    confidently wrong (L_seg ≈ 12 nats per pixel in the crowded toy world) is fastest improved by flattening
    its logits, and at the training lr the temperatures (≈ 0.2 % per step) lose that race to the context
    vectors, which then trade class discrimination for calibration. The argmax of the fused masks does not
    depend on τ1. Returns the calibrated (τ1, τ2 or None without a global prompt)."""
    prompts = model.prompts
    # the temperatures and, for calibrated GPR, its bias: everything that sets the sigmoid's and softmax's scale
    temps = [p for p in (prompts.log_tau1, prompts.log_tau2, getattr(prompts, "bias", None))
             if p is not None and p.requires_grad]
    opt = torch.optim.Adam(temps, lr=lr)
    with torch.no_grad(), amp():
        text = encoder.encode(prompts, vocab) if encoder else model.text_features(vocab)
    for step, (feats, labels) in enumerate(batches):
        if step >= steps:
            break
        with amp():
            out = model.head(feats, text)
        total = loss(out, labels)
        opt.zero_grad(set_to_none=True)
        total.backward()
        reduce_grads(temps)
        opt.step()
    tau2 = prompts.tau2()
    return float(prompts.tau1().detach()), None if tau2 is None else float(tau2.detach())
