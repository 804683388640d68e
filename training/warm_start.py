"""Where prompt learning starts: a text-only fit of the prompts to handcrafted embeddings, and a calibration
of the temperatures before the context is learned (docs/history/recipe-addenda.md, the third to sixth addenda)."""
from __future__ import annotations

import contextlib

import torch

from mvpseg.losses import oc_loss
from mvpseg.model import MVPSeg
from mvpseg.prompts import LearnedPrompts

from .distributed import DistContext, average_gradients

# Seed offset of the calibration's sample stream (train_prompts): its own draw for a fixed pool, so the
# learning stream is the same with or without calibration. Fixed: the measured runs used it.
CALIBRATION_SEED_OFFSET = 104729


def fit_to_templates(prompts: LearnedPrompts, clip, encoder, vocab: tuple[str, ...], targets: torch.Tensor,
                     steps: int, lr: float, oc_weight: float = 0.0) -> tuple[float, float]:
    """Text-only warm start: AdamW on mean_{views, classes} (1 − cos(e^i_c, t_c)) for every prompt (global one
    included), t = the handcrafted embeddings, plus ``oc_weight`` · L_OC (Eq. 5, mean over pairs) of the
    segmentation prompts. Without that term the views converge to nearly the same context (|cos| ≈ 0.9
    between their mean tokens) and OCLoss pulls them apart in the first steps of learning. Returns the
    final (mean cosine, L_OC). Its own optimiser, so the training optimiser's state starts clean."""
    opt = torch.optim.AdamW([prompts.ctx], lr=lr, weight_decay=0.0)
    cos, oc = torch.zeros(()), oc_loss(prompts.seg_ctx.detach())
    for _ in range(steps):
        text = encoder.encode(prompts, vocab) if encoder else prompts.encode(clip, vocab)
        views = text.seg if text.glob is None else torch.cat([text.glob[None], text.seg])
        cos = (views.float() * targets[None]).sum(-1).mean()
        oc = oc_loss(prompts.seg_ctx)
        opt.zero_grad(set_to_none=True)
        (1.0 - cos + oc_weight * oc).backward()
        opt.step()
    return float(cos.detach()), float(oc.detach())


def calibrate_temperatures(model: MVPSeg, encoder, vocab: tuple[str, ...], batches, prepare, loss,
                           steps: int, lr: float, ctx: DistContext,
                           amp=contextlib.nullcontext) -> tuple[float, float | None]:
    """Fits log τ1 and log τ2 alone (context frozen: the text embeddings are computed once) for ``steps`` Adam
    steps on ``batches`` (images, labels; ``prepare`` moves them to the device). ``loss(outputs, labels)`` is
    the training loss without the terms that do not depend on τ (OCLoss, the anchor): λ_seg L_seg +
    λ_cls L_cls, reduced as the training loop reduces it (so W processes match one).

    Why: τ1 = 100/k and τ2 = 0.07 suit CLIP's logit scale, not every CLIP's dense features; a model that starts
    confidently wrong (L_seg ≈ 12 nats per pixel in the crowded toy world) is fastest improved by flattening
    its logits, and at the training lr the temperatures (≈ 0.2 % per step) lose that race to the context
    vectors, which then trade class discrimination for calibration. The argmax of the fused masks does not
    depend on τ1. Returns the calibrated (τ1, τ2 or None without a global prompt)."""
    prompts = model.prompts
    temps = [p for p in (prompts.log_tau1, prompts.log_tau2) if p.requires_grad]
    opt = torch.optim.Adam(temps, lr=lr)
    with torch.no_grad(), amp():
        text = encoder.encode(prompts, vocab) if encoder else model.text_features(vocab)
    for step, (images, labels) in enumerate(batches):
        if step >= steps:
            break
        images, labels = prepare(images, labels)
        with amp():
            with torch.no_grad():
                feats = model.image_features(images)
            out = model.head(feats, text)
        total = loss(out, labels)
        opt.zero_grad(set_to_none=True)
        total.backward()
        average_gradients(temps, ctx)
        opt.step()
    tau2 = prompts.tau2()
    return float(prompts.tau1().detach()), None if tau2 is None else float(tau2.detach())
