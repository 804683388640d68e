"""Two analyses of GPR (issue #28, docs/history/gpr-study.md) on finished ``benchmarks/family_study.py`` runs.

``inference``: each run's ``gpr-last`` prompts with Eq. 8 applied as log m + α log g for α ∈ {0, ¼, ½, 1}
  (α = 0: the same views without GPR, α = 1: Eq. 8), on the run's 150 evaluation scenes and on its own 64
  validation scenes (held-out seen classes, as selection scores them): GPR's effect *within* one model, apart
  from how its views trained, and whether validation could choose α.
``splice``: GPR as an add-on to another run's views: the ``--views`` arm's fused masks (e.g. ``no-gpr``, Table 1
  row 4) refined by Eq. 8 with the ``--arm`` run's class scores g_c (Eq. 6 depends only on the global prompt and
  the image), against those views alone — row 5 − row 4 without the views' training changed by GPR.
``presence``: other presence scores than Eq. 6's g_c, read from the same frozen features with a run's prompts,
  ranked by the same unseen ROC-AUC: Eq. 6's pooling at other γ, of the mean view mask, of (view mean + global
  mask) / 2, of each view's mask and (residual sets) of the handcrafted prior's, the fused masks' maximum
  probability and pixel share, the cosine of CLIP's pooled image embedding to the global prompt, and the global
  prompt's mask on the image rescaled 2× and ½×.
``oracle``: a ceiling for the ranking. A presence probe of Eq. 6's form (one unit vector per class, a scale and a
  bias, γ = 10 soft-max pooling of the cosine map over the frozen dense features) trained with BCE on ``--ntrain``
  scenes *with the unseen classes' labels* — no text tower — and its ROC-AUC on the evaluation scenes. With
  ``--hidden H`` the probe is non-linear instead: a two-layer MLP (width H) on each unit-norm dense feature, one
  logit per class and patch, pooled by a soft-max of learned temperature — what the frozen features hold about
  presence beyond anything a text embedding (one direction per class) can read.
``adapter``: Eq. 6 with a run's global prompt on *adapted* features: a class-agnostic residual MLP φ on each
  dense feature, trained with BCE on the presence of the seen classes only (``--ntrain`` scenes), scored by the
  unseen ROC-AUC — whether GPR could read presence beyond Eq. 6's ceiling without the unseen labels — and by
  mIoU(U) of the run's views refined by Eq. 8 with that g, against the views alone and the run's own g.

    python benchmarks/gpr_analysis.py inference --out runs/gpr3 --clips fam-a fam-b fam-d
    python benchmarks/gpr_analysis.py splice --out runs/gpr4 --clips toyclip fam-a fam-b fam-d --eval-images 600
    python benchmarks/gpr_analysis.py presence --out runs/gpr5 --arm gpr-views --clips fam-d fam-b --seeds 9
    python benchmarks/gpr_analysis.py oracle --clips fam-a fam-b fam-d --ntrain 2000 [--hidden 256]
    python benchmarks/gpr_analysis.py adapter --out runs/gpr5 --clips toyclip fam-a fam-b fam-d --seeds 9
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import family_study as fs  # noqa: E402
import recipe_ablation as ra  # noqa: E402
from mvpseg.checkpoint import load_prompts  # noqa: E402
from mvpseg.gpr_adapter import GPRAdapter  # noqa: E402
from mvpseg.heads import apply_prompts, gpr_logits, view_masks  # noqa: E402
from mvpseg.prompts import prior_embedding  # noqa: E402
from training.data import EvalShard, eval_loader  # noqa: E402
from training.datasets import build_dataset, get_profile  # noqa: E402
from training.gpr_metrics import GPRStats  # noqa: E402
from training.metrics import ConfusionMatrix, summarize  # noqa: E402
from training.selection import ValidationSet, choose_holdout, summarise, validation_indices  # noqa: E402

ALPHAS = (0.0, 0.25, 0.5, 1.0)


def _eval_scenes(world: str, n: int, seed: int = 0):
    """(dataset, loader) of ``n`` scenes of ``world`` (val split, full label space) drawn with ``seed`` (0: the
    evaluation scenes)."""
    ds = build_dataset("toyworld", f"{ra.WORLDS[world]},seed={seed},length={n}", "val", label_space="full")
    return ds, eval_loader(EvalShard(ds, get_profile("toyworld").eval_transform(), 0, 1, n), 0)


def _predict(out, size, alpha: float, gpr_logits: torch.Tensor | None = None) -> torch.Tensor:
    """argmax of log m + α log g at ``size`` (Eq. 8 for α = 1): H×W. ``gpr_logits`` (1×C): another g's logits in
    place of the output's own."""
    lg = F.interpolate(out.fused_logits, size=size, mode="bilinear", align_corners=False).log_softmax(1)
    g = out.gpr_logits if gpr_logits is None else gpr_logits
    return (lg + alpha * F.logsigmoid(g)[:, :, None, None]).argmax(1)[0]


def _arm_runs(a):
    """(CLIP name, CLIP, prompts path, layout, seed) of every finished ``a.arm`` run under ``a.out``."""
    for name in a.clips:
        clip = fs.load_family_clip(name)
        for run in sorted(Path(a.out, name).glob(f"*/seed*/{a.arm}/prompts.safetensors")):
            yield name, clip, run, run.parts[-4], int(run.parts[-3][4:])


def inference(a) -> list[dict]:
    results = []
    for name, clip, run, world, seed in _arm_runs(a):
        ps = load_prompts(str(run), clip, name=a.arm).eval()
        data = build_dataset("toyworld", f"{ra.WORLDS[world]},seed={seed}", None, label_space="seen",
                             train=True).unbounded()  # train_prompts' validation scenes and held-out classes
        val_idx, _ = validation_indices(data, a.val_images, seed, True)
        vs = ValidationSet.build(clip, data, val_idx, get_profile("toyworld").eval_transform(), torch.device("cpu"))
        vocab, holdout = tuple(data.prompt_names), choose_holdout(tuple(data.prompt_names), 0.25, seed)
        text, val = ps.encode(clip, vocab).detach(), {}
        for alpha in ALPHAS:
            cm = ConfusionMatrix(len(vocab))
            for feats, label in zip(vs.features, vs.labels):
                out = apply_prompts(feats, text, ps)
                cm.update(_predict(out, tuple(label.shape), alpha), label)
            val[alpha] = summarise(cm.mat.numpy(), holdout, "holdout")["score"]
        ds, loader = _eval_scenes(world, a.eval_images)
        text = ps.encode(clip, tuple(ds.prompt_names)).detach()
        cms = {alpha: ConfusionMatrix(len(ds.prompt_names), ds.ignore_index) for alpha in ALPHAS}
        with torch.no_grad():
            for image, label, _ in loader:
                out = apply_prompts(clip.dense_features(clip.normalize(image[None])).float(), text, ps)
                for alpha in ALPHAS:
                    cms[alpha].update(_predict(out, tuple(label.shape), alpha), label)
        test = {alpha: summarize(cm.mat.numpy(), tuple(ds.class_names), tuple(ds.unseen_indices)).miou_unseen
                for alpha, cm in cms.items()}
        chosen = max(ALPHAS, key=lambda x: (round(val[x], 6), x))
        results.append({"clip": name, "layout": world, "seed": seed, "val_held_out": val, "test_unseen": test,
                        "chosen_alpha": chosen})
        print(f"{name} {world} seed {seed}: mIoU(U) α=0 {test[0.0]:.1f} → α=1 {test[1.0]:.1f} "
              f"({test[1.0] - test[0.0]:+.1f}); validation picks α={chosen}", flush=True)
    Path(a.out, "gpr-inference.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def splice(a) -> list[dict]:
    results = []
    for name, clip, run, world, seed in _arm_runs(a):
        views_path = run.parents[1] / a.views / "prompts.safetensors"
        if not views_path.is_file():
            continue
        gpr_ps = load_prompts(str(run), clip, name=a.arm).eval()
        view_ps = load_prompts(str(views_path), clip, name=a.views).eval()
        ds, loader = _eval_scenes(world, a.eval_images)
        vocab = tuple(ds.prompt_names)
        gtext, vtext = gpr_ps.encode(clip, vocab).detach(), view_ps.encode(clip, vocab).detach()
        cms = {k: ConfusionMatrix(len(vocab), ds.ignore_index) for k in ("views", "spliced", "arm")}
        with torch.no_grad():
            for image, label, _ in loader:
                f = clip.dense_features(clip.normalize(image[None])).float()
                g = apply_prompts(f, gtext, gpr_ps)
                v = apply_prompts(f, vtext, view_ps)
                size = tuple(label.shape)
                lv = F.interpolate(v.fused_logits, size=size, mode="bilinear", align_corners=False).log_softmax(1)
                cms["views"].update(lv.argmax(1)[0], label)
                cms["spliced"].update((lv + F.logsigmoid(g.gpr_logits)[:, :, None, None]).argmax(1)[0], label)
                cms["arm"].update(_predict(g, size, 1.0), label)
        u = {k: summarize(cm.mat.numpy(), tuple(ds.class_names), tuple(ds.unseen_indices)).miou_unseen
             for k, cm in cms.items()}
        results.append({"clip": name, "layout": world, "seed": seed, "views": a.views, "gpr": a.arm, **u})
        print(f"{name} {world} seed {seed}: mIoU(U) {a.views} {u['views']:.1f} → + {a.arm}'s GPR "
              f"{u['spliced']:.1f} ({u['spliced'] - u['views']:+.1f}); {a.arm} itself {u['arm']:.1f}", flush=True)
    Path(a.out, f"gpr-splice-{a.views}.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def _pool(mask: torch.Tensor, gamma: float = 10.0) -> torch.Tensor:
    """Eq. 6's pooling (``mvpseg.heads.gpr_logits``) of C×h×w cosine masks without τ2 and β (they do not change a
    ranking): C."""
    return gpr_logits(mask[None], gamma, 1.0)[0]


def _presence_scores(clip, text, out, x: torch.Tensor, prior: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Every candidate presence score of one normalised image ``x`` (1×3×H×W; ``out``: its ``segment`` output;
    ``prior``: C×D embeddings of the handcrafted prior of a residual set, if any): name → C."""
    glob, views = out.global_mask[0], out.view_masks[0].mean(0)
    scores = {"g (Eq. 6, γ 10)": out.gpr_logits[0]}
    scores.update({f"Eq. 6 pooling, γ {g:g}": _pool(glob, g) for g in (3.0, 30.0, 1000.0)})
    scores["pooled mean view mask"] = _pool(views)
    scores.update({f"pooled view {i} mask": _pool(m) for i, m in enumerate(out.view_masks[0])})
    if prior is not None:  # what Eq. 6 reads with the handcrafted embedding in place of the global prompt's
        scores["pooled prior mask"] = _pool(view_masks(clip.dense_features(x).float(), prior[None].float())[0, 0])
    scores["pooled (view mean + global) / 2"] = _pool((views + glob) / 2)
    prob = out.fused_logits[0].softmax(0).flatten(1)
    scores["max fused probability"] = prob.max(-1).values
    scores["pixel share of the argmax"] = torch.bincount(prob.argmax(0), minlength=prob.shape[0]).float() / prob.shape[1]
    size = clip.model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    emb = clip.model.encode_image(F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False))
    scores["image embedding · global prompt"] = text.glob.float() @ F.normalize(emb.float(), dim=-1)[0]
    for s in (2.0, 0.5):
        f = clip.dense_features(F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)).float()
        scores[f"global mask at {s:g}×"] = _pool(view_masks(f, text.glob.unsqueeze(0))[0, 0])
    return scores


def presence(a) -> list[dict]:
    from sklearn.metrics import roc_auc_score

    results = []
    for name in a.clips:
        clip = fs.load_family_clip(name)
        for seed in a.seeds:
            run = Path(a.out, name, a.world, f"seed{seed}", a.arm, "prompts.safetensors")
            ps = load_prompts(str(run), clip, name=a.arm).eval()
            ds, loader = _eval_scenes(a.world, a.eval_images)
            vocab = tuple(ds.prompt_names)
            text, scores, present = ps.encode(clip, vocab).detach(), {}, []
            prior = prior_embedding(ps.prior.encode(clip, vocab)) if getattr(ps, "prior", None) is not None else None
            with torch.no_grad():
                for image, label, _ in loader:
                    x = clip.normalize(image[None])
                    out = apply_prompts(clip.dense_features(x).float(), text, ps)
                    for k, v in _presence_scores(clip, text, out, x, prior).items():
                        scores.setdefault(k, []).append(v)
                    lab = label.reshape(-1)
                    lab = lab[lab != ds.ignore_index].long()
                    present.append(torch.bincount(lab, minlength=len(vocab))[:len(vocab)] > 0)
            unseen = list(ds.unseen_indices)
            y = torch.stack(present)[:, unseen].flatten().numpy()
            auc = {k: float(roc_auc_score(y, torch.stack(v)[:, unseen].flatten().numpy())) for k, v in scores.items()}
            results.append({"clip": name, "layout": a.world, "seed": seed, "arm": a.arm, "auc_unseen": auc})
            print(f"{name} {a.world} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in auc.items()), flush=True)
    Path(a.out, f"gpr-presence-{a.arm}.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def probe(dim: int, n_classes: int, hidden: int):
    """(logits, parameters) of a presence probe over frozen dense features B×D×N (or B×D×h×w) → B×C (``oracle``).

    hidden = 0: Eq. 6's form with a free unit vector per class in place of the global prompt's embedding — the
    cosine map pooled by a γ = 10 soft-max, times a learned scale, minus a per-class bias. hidden > 0: a two-layer
    MLP on each unit-norm feature gives C logits per patch, pooled by a soft-max of learned temperature."""
    if hidden == 0:
        w = torch.nn.Parameter(torch.randn(n_classes, dim) * 0.01)
        bias, log_scale = torch.nn.Parameter(torch.zeros(n_classes)), torch.nn.Parameter(torch.tensor(3.0))

        def linear(x: torch.Tensor) -> torch.Tensor:
            cos = torch.einsum("cd,bdn->bcn", F.normalize(w, dim=-1), x.flatten(2))
            return gpr_logits(cos, 10.0, (-log_scale).exp(), bias)

        return linear, [w, bias, log_scale]
    net = torch.nn.Sequential(torch.nn.Conv1d(dim, hidden, 1), torch.nn.GELU(), torch.nn.Conv1d(hidden, hidden, 1),
                              torch.nn.GELU(), torch.nn.Conv1d(hidden, n_classes, 1))
    log_gamma = torch.nn.Parameter(torch.tensor(1.0))

    def mlp(x: torch.Tensor) -> torch.Tensor:
        z = net(F.normalize(x.flatten(2), dim=1))  # B×C×N logits per patch
        return (z * (log_gamma.exp() * z).softmax(-1)).sum(-1)

    return mlp, [*net.parameters(), log_gamma]


def _presence_data(clip, world: str, seed: int, n: int, keep_labels: bool = False):
    """(dense features n×D×h×w, presence n×C of every class, the label maps if ``keep_labels`` else None,
    dataset) of ``_eval_scenes(world, n, seed)``."""
    ds, loader = _eval_scenes(world, n, seed)
    xs, ys, labels = [], [], []
    with torch.no_grad():
        for image, label, _ in loader:
            xs.append(clip.dense_features(clip.normalize(image[None])).float()[0])  # D×h×w
            if keep_labels:
                labels.append(label)
            lab = label.reshape(-1)
            lab = lab[lab != ds.ignore_index].long()
            ys.append((torch.bincount(lab, minlength=len(ds.prompt_names))[:len(ds.prompt_names)] > 0).float())
    return torch.stack(xs), torch.stack(ys), labels if keep_labels else None, ds


def _fit(logits, params, x: torch.Tensor, y: torch.Tensor, columns, steps: int, full_batch: bool) -> None:
    """BCE of ``logits(x)`` against presence ``y`` on the class ``columns`` only; Adam, full batch or minibatches
    of 256 scenes."""
    opt = torch.optim.Adam(params, lr=0.01 if full_batch else 0.003)
    for _ in range(steps):
        idx = slice(None) if full_batch else torch.randint(0, len(x), (256,))
        loss = F.binary_cross_entropy_with_logits(logits(x[idx])[:, columns], y[idx][:, columns])
        opt.zero_grad()
        loss.backward()
        opt.step()


def _ranking(logits, x: torch.Tensor, y: torch.Tensor, ds) -> dict:
    """GPRStats summary (ROC-AUC of seen and unseen classes) of presence logits on scenes x with presence y."""
    stats = GPRStats(y.shape[1], tuple(ds.unseen_indices))
    with torch.no_grad():
        pred = logits(x)
    for p, yy in zip(pred, y):  # one image at a time: labels as a 1×C "image" of present classes
        stats.update(p, torch.nonzero(yy).flatten().reshape(1, -1) if yy.any() else torch.full((1, 1), 255))
    return stats.summary()


def oracle(a) -> list[dict]:
    results = []
    for name in a.clips:
        clip = fs.load_family_clip(name)
        torch.manual_seed(0)  # the probe's initialisation
        x_tr, y_tr, _, _ = _presence_data(clip, a.world, 7, a.ntrain)  # another seed's scenes, never the evaluation's
        x_te, y_te, _, ds = _presence_data(clip, a.world, 0, a.eval_images)
        logits, params = probe(x_tr.shape[1], y_tr.shape[1], a.hidden)
        # the linear probe trains full-batch (as first measured), the MLP on minibatches; every class's labels
        _fit(logits, params, x_tr, y_tr, slice(None), a.steps, full_batch=a.hidden == 0)
        summary = _ranking(logits, x_te, y_te, ds)
        results.append({"clip": name, "layout": a.world, "train_scenes": a.ntrain, "hidden": a.hidden,
                        "auc_seen": summary["seen"]["auc"], "auc_unseen": summary["unseen"]["auc"]})
        kind = "Eq. 6's form" if a.hidden == 0 else f"MLP {a.hidden}"
        print(f"{name} {a.world}: oracle probe ({kind}) AUC seen {summary['seen']['auc']:.3f}, unseen "
              f"{summary['unseen']['auc']:.3f} ({a.ntrain} training scenes with unseen labels)", flush=True)
    return results


def adapter_probe(text: torch.Tensor, hidden: int):
    """(logits, parameters) of Eq. 6 on adapted features: B×D×N (or B×D×h×w) → B×C, with ``text`` (C×D, a run's
    global-prompt embeddings) fixed. Each dense feature goes through the library's GPR adapter φ
    (``mvpseg.gpr_adapter.GPRAdapter``, width ``hidden``, the identity at the start: training starts at Eq. 6);
    γ = 10 pooling, learned scale and bias. φ sees no class: an unseen name gains only through the shared
    features. hidden = 0: Eq. 6 recalibrated. (The figures of docs/history/gpr-presence-ceiling.md came from an
    inline copy of φ before 2026-12-07's mend, with another draw of W1.)"""
    text = text.detach().float()
    net = GPRAdapter(text.shape[1], hidden) if hidden else None
    log_scale, bias = torch.nn.Parameter(torch.tensor(3.0)), torch.nn.Parameter(torch.tensor(0.0))

    def logits(x: torch.Tensor) -> torch.Tensor:
        f = x.flatten(2)[..., None]  # B×D×N×1: φ acts on each position
        f = F.normalize(f, dim=1) if net is None else net(f)
        return gpr_logits(torch.einsum("cd,bdn->bcn", text, f[..., 0]), 10.0, (-log_scale).exp(), bias)

    return logits, [log_scale, bias, *([] if net is None else net.parameters())]


def adapter(a) -> list[dict]:
    """A class-agnostic feature adapter for GPR trained on the seen classes only (exploratory, issue #28)."""
    results = []
    for name in a.clips:
        clip = fs.load_family_clip(name)
        x_tr, y_tr, _, _ = _presence_data(clip, a.world, 7, a.ntrain)  # presence of every class; only seen ones used
        # the evaluation scenes' features, presence and label maps, once for every run of this CLIP
        x_te, y_te, labels, ds = _presence_data(clip, a.world, 0, a.eval_images, keep_labels=True)
        seen = [c for c in range(len(ds.prompt_names)) if c not in set(ds.unseen_indices)]
        for seed in a.seeds:
            run = Path(a.out, name, a.world, f"seed{seed}", a.arm, "prompts.safetensors")
            ps = load_prompts(str(run), clip, name=a.arm).eval()
            with torch.no_grad():
                text = ps.encode(clip, tuple(ds.prompt_names)).detach()
                outs = [apply_prompts(x_te[i:i + 1], text, ps) for i in range(len(x_te))]

            def scores(alpha: float, g=None) -> dict[str, float]:
                """mIoU(U), mIoU(S), hIoU of the run's views under Eq. 8 with α and g (None: the run's own)."""
                cm = ConfusionMatrix(len(ds.prompt_names), ds.ignore_index)
                with torch.no_grad():
                    for i, (out, label) in enumerate(zip(outs, labels)):
                        cm.update(_predict(out, tuple(label.shape), alpha, None if g is None else g(x_te[i:i + 1])),
                                  label)
                r = summarize(cm.mat.numpy(), tuple(ds.class_names), tuple(ds.unseen_indices))
                return {"miou_unseen": r.miou_unseen, "miou_seen": r.miou_seen, "hiou": r.hiou}

            views, own = scores(0.0), scores(1.0)  # Table 1 row 4 and the run's row 5
            for hidden in a.hidden:
                torch.manual_seed(0)  # φ's initialisation and the minibatches
                logits, params = adapter_probe(text.glob, hidden)
                _fit(logits, params, x_tr, y_tr, seen, a.steps, full_batch=False)
                summary = _ranking(logits, x_te, y_te, ds)
                adapted = scores(1.0, logits)
                results.append({"clip": name, "layout": a.world, "seed": seed, "arm": a.arm, "hidden": hidden,
                                "train_scenes": a.ntrain, "auc_seen": summary["seen"]["auc"],
                                "auc_unseen": summary["unseen"]["auc"], "views": views, "run": own,
                                "adapted": adapted})
                print(f"{name} {a.world} seed {seed}: GPR on adapted features (φ width {hidden}, trained on seen "
                      f"classes of {a.ntrain} scenes) AUC seen {summary['seen']['auc']:.3f}, unseen "
                      f"{summary['unseen']['auc']:.3f}; mIoU(U) / hIoU: views " + ", the run's g ".join(
                          f"{r['miou_unseen']:.1f} / {r['hiou']:.1f}" for r in (views, own)) +
                      f", this g {adapted['miou_unseen']:.1f} / {adapted['hiou']:.1f}", flush=True)
    Path(a.out, f"gpr-adapter-{a.arm}-{a.ntrain}-h{'-'.join(map(str, a.hidden))}.json").write_text(
        json.dumps(results, indent=1) + "\n")
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("inference")
    i.add_argument("--out", default="runs/gpr3")
    i.add_argument("--arm", default="gpr-last")
    i.add_argument("--val-images", type=int, default=64)
    s = sub.add_parser("splice")
    s.add_argument("--out", default="runs/gpr4")
    s.add_argument("--arm", default="gpr-last", help="the run whose global prompt gives g_c")
    s.add_argument("--views", default="no-gpr", help="the run whose segmentation views give the masks")
    r = sub.add_parser("presence")
    r.add_argument("--out", default="runs/gpr5")
    r.add_argument("--arm", default="gpr-views")
    r.add_argument("--world", default="voc", choices=list(ra.WORLDS))
    r.add_argument("--seeds", nargs="+", type=int, default=[9])
    o = sub.add_parser("oracle")
    o.add_argument("--hidden", type=int, default=0, help="0: Eq. 6's form; H > 0: a two-layer MLP of width H")
    d = sub.add_parser("adapter")
    d.add_argument("--out", default="runs/gpr5")
    d.add_argument("--arm", default="gpr-views", help="the runs whose global prompt gives the class directions")
    d.add_argument("--seeds", nargs="+", type=int, default=[9])
    d.add_argument("--hidden", nargs="+", type=int, default=[0, 128], help="widths of φ (0: no φ)")
    for q in (o, d):
        q.add_argument("--world", default="voc", choices=list(ra.WORLDS))
        q.add_argument("--ntrain", type=int, default=2000)
        q.add_argument("--steps", type=int, default=1500)
    for q in (i, s, r, o, d):
        q.add_argument("--clips", nargs="+", default=["fam-a", "fam-b", "fam-d"])
        q.add_argument("--eval-images", type=int, default=150)
        q.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    return {"inference": inference, "splice": splice, "presence": presence, "oracle": oracle,
            "adapter": adapter}[a.cmd](a)


if __name__ == "__main__":
    main()
