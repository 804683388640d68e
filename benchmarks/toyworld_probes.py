"""Three diagnostics for the toy-world ablation: how far can *any* text side go with the toy CLIP?

(a) **Label-only oracle at the feature stride.** Knows the true class share of every ``stride``-px cell
    (what a perfectly calibrated head on the dense features could know at best), upsamples the shares
    bilinearly as evaluation does, takes the argmax. Its mIoU bounds what a calibrated per-cell
    predictor reaches at that resolution; the toy CLIP's features have stride 32.
(b) **Free per-class embeddings.** The most flexible text side there is: one free D-dim vector per
    *seen* class, initialised from the 85-template embeddings and trained with the paper's L_seg
    (pixel cross-entropy of Eq. 9, CLIP's τ = 100) on the dense features of the training images;
    unseen classes keep their handcrafted embeddings. If this does not beat the handcrafted baseline
    on the seen classes, no learned prompt (whose embeddings pass through the frozen text tower and
    share one context) can.

(c) **Class-agnostic corrections.** What a prompt shared by all classes could at best transfer: a shared
    bias ``normalize(t_c + b)`` or a shared linear map ``normalize(A t_c + b)`` on the template
    embeddings, learned with L_seg on the seen classes (with a learnable log temperature), then applied
    to *every* class, unseen included. If none of these lifts mIoU(U) above the templates, the features
    hold no class-agnostic correction that transfers to unseen names.

Both on the fixed validation set of ``benchmarks/toyworld_ablation.py`` (split ``val``, seed 0).

    python benchmarks/toyworld_probes.py --world sparse      # docs/toyworld.md
    python benchmarks/toyworld_probes.py --world crowded --lr 1e-3
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a plain script from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mvpseg.clip_backbone import ClipSpec, load_clip  # noqa: E402
from mvpseg.handcrafted import TemplatePrompts  # noqa: E402
from mvpseg.heads import segment  # noqa: E402
from mvpseg.losses import seg_loss  # noqa: E402
from mvpseg.prompts import TextViews  # noqa: E402
from training.metrics import ConfusionMatrix, summarize  # noqa: E402
from training.toyworld import CLASS_NAMES, IGNORE_INDEX, OBJECT_NAMES, SEEN, UNSEEN, ToyWorld  # noqa: E402

N_OBJ = len(OBJECT_NAMES)


def scores(mat: np.ndarray) -> dict[str, float]:
    s = summarize(mat, CLASS_NAMES, UNSEEN)
    iou = np.asarray(s.iou, dtype=float)
    return {"mIoU(U)": s.miou_unseen, "mIoU(S)": s.miou_seen, "mIoU": s.miou, "objects": float(np.nanmean(iou[1:1 + N_OBJ])),
            "stuff": float(np.nanmean(iou[1 + N_OBJ:])), "background": float(iou[0])}


def oracle(labels: torch.Tensor, stride: int) -> dict[str, float]:
    """(a): labels N×H×W (full label space) → scores of the argmax of bilinearly upsampled cell shares."""
    cm = ConfusionMatrix(len(CLASS_NAMES))
    for lb in labels:
        shares = F.avg_pool2d(F.one_hot(lb, len(CLASS_NAMES)).permute(2, 0, 1).float()[None], stride)
        cm.update(F.interpolate(shares, size=lb.shape, mode="bilinear", align_corners=False).argmax(1)[0], lb)
    return scores(cm.mat)


def evaluate(features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, tau: float) -> dict[str, float]:
    """Whole-image scores of one C×D embedding matrix (all classes) as a single-view head."""
    cm = ConfusionMatrix(len(CLASS_NAMES))
    views = TextViews(F.normalize(text, dim=-1)[None], None, ("free",), tuple(CLASS_NAMES))
    with torch.no_grad():
        for i in range(0, len(features), 25):
            out = segment(features[i:i + 25], views, tau, None)
            cm.update(out.log_final(tuple(labels.shape[-2:])).argmax(1), labels[i:i + 25])
    return scores(cm.mat)


def fit(params: list[torch.Tensor], lr: float, seen_text: Callable[[], torch.Tensor],
        tau: Callable[[], torch.Tensor | float], f_tr: torch.Tensor, l_tr: torch.Tensor,
        a: argparse.Namespace) -> list[float]:
    """Adam on ``params`` with L_seg over random batches of the training features (labels in the seen
    space); ``seen_text()`` gives the S×D seen-class embeddings, ``tau()`` the temperature. Returns the losses."""
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(a.seed)
    seen_names = tuple(CLASS_NAMES[i] for i in SEEN)
    losses = []
    for _ in range(a.iters):
        idx = torch.randint(0, len(f_tr), (a.batch,), generator=g)
        views = TextViews(F.normalize(seen_text(), dim=-1)[None], None, ("fit",), seen_names)
        loss = seg_loss(segment(f_tr[idx], views, tau(), None), l_tr[idx], IGNORE_INDEX)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def agnostic(kind: str, lr: float, e0: torch.Tensor, f_tr: torch.Tensor, l_tr: torch.Tensor, f_va: torch.Tensor,
             l_va: torch.Tensor, a: argparse.Namespace) -> dict[str, float]:
    """(c): learn one correction shared by all classes on the seen ones (e0: C×D templates), score all."""
    dim = e0.shape[1]
    weight = torch.eye(dim, device=e0.device, requires_grad="linear" in kind)
    bias = torch.zeros(dim, device=e0.device, requires_grad=True)
    log_tau = torch.tensor(float(np.log(100.0)), device=e0.device, requires_grad=True)
    fit([t for t in (weight, bias, log_tau) if t.requires_grad], lr, lambda: e0[SEEN] @ weight.T + bias,
        log_tau.exp, f_tr, l_tr, a)
    with torch.no_grad():
        return evaluate(f_va, l_va, e0 @ weight.T + bias, float(log_tau.exp()))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", default="sparse", help="a name in training.toyworld.WORLDS")
    p.add_argument("--zoom", type=int, default=1, help="pixel magnification of the world (WorldConfig.zoom)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--train-images", type=int, default=400)
    p.add_argument("--val-images", type=int, default=200)
    p.add_argument("--iters", type=int, default=400)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4, help="Adam lr of the free embeddings")
    p.add_argument("--agnostic-lr", type=float, nargs="+", default=[1e-3, 1e-2],
                   help="Adam lrs of the class-agnostic corrections (c)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model-config", default=str(REPO / "assets/toyclip/toyclip.json"))
    p.add_argument("--weights", default=str(REPO / "assets/toyclip/toyclip.safetensors"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    clip = load_clip(ClipSpec(Path(a.model_config).stem, pretrained=a.weights, model_config=a.model_config), device=a.device)

    def load(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        ds = ToyWorld(split, n, a.seed, config=a.world, zoom=a.zoom)  # train split: unseen pixels are IGNORE_INDEX
        images, labels = zip(*(ds[i] for i in range(n)))
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
        with torch.no_grad():
            f = torch.cat([clip.dense_features(clip.normalize(x[i:i + 32].to(a.device).float() / 255))
                           for i in range(0, n, 32)])
        return f, torch.from_numpy(np.stack(labels)).long().to(a.device)

    f_tr, l_tr = load("train", a.train_images)
    f_va, l_va = load("val", a.val_images)
    to_seen = torch.full((256,), IGNORE_INDEX, dtype=torch.long)
    to_seen[torch.tensor(SEEN)] = torch.arange(len(SEEN))
    l_tr = to_seen.to(a.device)[l_tr]

    rows = {f"oracle, {s} px cells": oracle(l_va, s) for s in (32, 16, 8)}
    base = TemplatePrompts.maskclip85()
    tau = base.tau1()
    with torch.no_grad():
        e0 = base.encode(clip, CLASS_NAMES).seg[0]  # C×D, one view: the template ensemble
    rows["85 handcrafted templates"] = evaluate(f_va, l_va, e0, tau)

    free = e0[SEEN].clone().requires_grad_(True)
    losses = fit([free], a.lr, lambda: free, lambda: tau, f_tr, l_tr, a)
    text = e0.clone()
    text[SEEN] = free.detach()
    rows[f"free seen-class embeddings (L_seg, Adam lr {a.lr:g}, {a.iters} it)"] = evaluate(f_va, l_va, text, tau)

    for kind in ("shared bias", "shared linear map + bias"):
        for lr in a.agnostic_lr:
            rows[f"{kind} (L_seg, Adam lr {lr:g}, {a.iters} it)"] = agnostic(kind, lr, e0, f_tr, l_tr, f_va, l_va, a)

    cols = list(next(iter(rows.values())))
    md = [f"world {a.world!r}, zoom {a.zoom}, {a.val_images} val images; L_seg of the free embeddings "
          f"{np.mean(losses[:20]):.2f} (first 20 it) → {np.mean(losses[-20:]):.2f} (last 20)", "",
          "| | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    md += [f"| {k} | " + " | ".join(f"{v[c]:.1f}" for c in cols) + " |" for k, v in rows.items()]
    md += ["", f"Wall time {time.perf_counter() - t0:.0f} s, {a.threads} threads."]
    print("\n".join(md))
    return {"rows": rows, "loss_first": float(np.mean(losses[:20])), "loss_last": float(np.mean(losses[-20:]))}


if __name__ == "__main__":
    main()
