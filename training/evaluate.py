"""Zero-shot evaluation: mIoU over seen / unseen / all classes and hIoU (paper Tables 1 and 3).

Whole-image, single-scale inference at MaskCLIP's sizes (keep-ratio resize to img_scale (2048, 512)
for VOC / COCO-Stuff, (520, 520) for Context), the vocabulary being *all* classes of the dataset
(seen + unseen, MaskCLIP's prompt names).  Logits are resized bilinearly to the label's original size
and the prediction is the argmax of the final masks (Eq. 8; Eq. 4 without GPR).

Every method (learned prompt checkpoints and handcrafted baselines) is scored on the same image
features, computed once per image.  Several ``--data`` entries give the cross-dataset grid of
Table 3 (prompts learned on one dataset, tested on another's classes)::

    python -m training.evaluate --data voc=data/VOCdevkit/VOC2012 \\
        --prompts voc=runs/voc/prompts.safetensors --baselines maskclip-85 --out results/voc

Your own data: ``--data folder=DIR`` (``training/datasets/folder.py``; ``--reduce-zero-label`` /
``--label-offset K`` for masks whose class ids start at K), the same tables as for VOC.

Writes ``<out>/results.md`` (summary, per-class IoU and cross-dataset tables) and
``<out>/results.json``.  Works under ``torchrun`` (images sharded, confusion matrices summed).
"""
from __future__ import annotations

if not __package__:  # run by path (python training/evaluate.py): import as the package would
    import _as_script; __package__ = _as_script.PACKAGE  # noqa: E702

import argparse
import contextlib
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mvpseg.builder import baseline_prompt_sets
from mvpseg.checkpoint import load_prompts
from mvpseg.clip_backbone import FrozenCLIP, load_clip
from mvpseg.dense import pamr
from mvpseg.gpr_shifts import shifted_features, with_shifted_gpr
from mvpseg.heads import apply_prompts
from mvpseg.prompts import PromptSet

from .checkpointing import atomic_write_text
from .cli import (add_clip_args, add_label_offset_args, add_runtime_args, amp_dtype, apply_runtime, clip_spec,
                  one_line_user_errors, parse_pairs, user_message)
from .data import EvalShard, eval_loader
from .datasets import DatasetError, build_dataset, get_profile
from .datasets.folder import compose_spec
from .gpr_metrics import GPRStats
from .distributed import DistContext, distributed_session, seed_everything
from .metrics import (ConfusionMatrix, SegScores, cross_table, dumps, per_class_table, summarize,
                      summary_table)
from .runlog import Progress

log = logging.getLogger("mvpseg.evaluate")
BASELINES = ("maskclip-85", "parts", "a-photo-of")


def build_methods(clip: FrozenCLIP, prompt_paths: dict[str, str], baselines) -> dict[str, tuple[PromptSet, float]]:
    """name → (prompt set, γ): learned checkpoints first (checked against ``clip``), then baselines."""
    methods: dict[str, tuple[PromptSet, float]] = {}
    for name, path in prompt_paths.items():
        p = load_prompts(path, clip, name=name)
        methods[name] = (p.eval(), float(p.meta.gamma))
    available = baseline_prompt_sets()
    for name in baselines:
        if name not in available:
            raise SystemExit(f"unknown baseline {name!r}; choose from {sorted(available)}")
        if name in methods:
            raise SystemExit(f"method name {name!r} used twice")
        methods[name] = (available[name].to(clip.device), 10.0)
    if not methods:
        raise SystemExit("nothing to evaluate: give --prompts and/or --baselines")
    return methods


@torch.no_grad()
def evaluate_dataset(clip: FrozenCLIP, methods, dataset, transform, ctx: DistContext,
                     limit: int | None = None, num_workers: int = 0, amp=None,
                     progress: bool = True, use_pamr: bool = False,
                     per_image: dict[str, list] | None = None) -> dict[str, SegScores]:
    """Scores every method on ``dataset`` (full label space); returns name → SegScores. Dense features use
    the CLIP's settings (``--dense``/``--sliding``); ``use_pamr`` refines the logits at the label size with the
    image resized to it (SCLIP's evaluation) before the argmax. ``per_image`` (a dict, filled in): method →
    list of per-image C×C confusions (this process's images, in order), for bootstrap intervals."""
    vocab = tuple(dataset.prompt_names)
    texts = {name: ps.encode(clip, vocab).detach() for name, (ps, _) in methods.items()}
    cms = {name: ConfusionMatrix(len(vocab), dataset.ignore_index) for name in methods}
    unseen = tuple(dataset.unseen_indices)
    gprs = {name: GPRStats(len(vocab), unseen) for name, text in texts.items() if text.glob is not None}
    shard = EvalShard(dataset, transform, ctx.rank, ctx.world_size, limit)
    bar = Progress(len(shard), enabled=progress and ctx.is_main, desc=f"eval {dataset.name}")
    cast = (torch.autocast(ctx.device.type, dtype=amp) if amp is not None
            else contextlib.nullcontext())
    for image, label, _ in eval_loader(shard, num_workers):
        x = clip.normalize(image[None].to(ctx.device))
        with cast:
            feats = clip.dense_features(x)
        label = label.to(ctx.device)
        guide = F.interpolate(x.float(), size=tuple(label.shape), mode="bilinear", align_corners=False) \
            if use_pamr else None
        shifted = {}  # k → the k × k shifted copies' features, once per image (mvpseg.gpr_shifts)

        def features_for(k: int) -> list[torch.Tensor]:
            if k not in shifted:
                with cast:
                    shifted[k] = shifted_features(clip, x, k)
            return shifted[k]

        for name, text in texts.items():
            ps, gamma = methods[name]
            out = with_shifted_gpr(apply_prompts(feats.float(), text, ps, gamma), features_for, text.glob, ps, gamma)
            logits = out.log_final(tuple(label.shape))
            if guide is not None:
                logits = pamr(guide, logits)
            pred = logits.argmax(1)[0]
            one = ConfusionMatrix(len(vocab), dataset.ignore_index)  # this image's; the totals are their sum
            one.update(pred, label)
            cms[name].mat += one.mat
            if per_image is not None:
                per_image.setdefault(name, []).append(one.mat.numpy().astype(np.int32))
            if name in gprs:
                gprs[name].update(out.gpr_logits[0], label, dataset.ignore_index)
        bar.update(ctx.world_size)
    bar.close()
    names = tuple(dataset.class_names)
    scores = {}
    for name, cm in cms.items():
        cm.all_reduce()
        scores[name] = summarize(cm.mat.numpy(), names, unseen)
        if name in gprs:
            gprs[name].all_reduce()
            scores[name] = replace(scores[name], gpr=gprs[name].summary())
    return scores


def _fmt3(v: float) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def render_markdown(results: dict[str, dict[str, SegScores]], header: dict) -> str:
    lines = ["# Zero-shot segmentation results", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    for ds, scores in results.items():
        lines += ["", f"## {ds}", "", summary_table(list(scores.items())), "",
                  "<details><summary>per-class IoU (unseen classes marked *)</summary>", "",
                  per_class_table(list(scores.items())), "", "</details>"]
        gpr_rows = [(m, s.gpr) for m, s in scores.items() if s.gpr is not None]
        if gpr_rows:
            lines += ["", "GPR class scores, present vs absent per image (ROC-AUC; separation = mean g(present) − "
                      "mean g(absent)):", "", "| prompts | AUC seen | AUC unseen | sep. seen | sep. unseen |",
                      "| --- | --- | --- | --- | --- |"]
            lines += [f"| {m} | {_fmt3(g['seen']['auc'])} | {_fmt3(g['unseen']['auc'])} | "
                      f"{_fmt3(g['seen']['separation'])} | {_fmt3(g['unseen']['separation'])} |" for m, g in gpr_rows]
    if len(results) > 1:
        grid: dict[str, dict[str, float]] = {}
        for ds, scores in results.items():
            for method, s in scores.items():
                grid.setdefault(method, {})[ds] = s.miou_unseen
        lines += ["", "## Cross-dataset mIoU(U) (rows: prompts, columns: test set)", "",
                  cross_table(grid)]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", action="append", required=True, metavar="NAME=ROOT",
                   help="dataset to test on (voc | context | cocostuff | toyworld | folder); repeat for Table 3")
    p.add_argument("--split", default=None, help="default: each dataset's validation split (folder: also all)")
    add_label_offset_args(p)
    p.add_argument("--prompts", action="append", default=[], metavar="NAME=PATH",
                   help="learned prompt checkpoint (.safetensors + .json); repeatable")
    p.add_argument("--baselines", nargs="*", default=list(BASELINES),
                   help=f"handcrafted prompt sets (default: all of {', '.join(BASELINES)})")
    p.add_argument("--eval-scale", type=int, nargs=2, default=None, metavar=("LONG", "SHORT"),
                   help="override the dataset's keep-ratio img_scale")
    p.add_argument("--limit", type=int, default=None, help="first N images only (smoke tests)")
    p.add_argument("--seed", type=int, default=0, help="seed (only matters for random-weight CLIPs)")
    p.add_argument("--out", default=None, help="folder for results.md / results.json")
    p.add_argument("--save-confusions", action="store_true",
                   help="also write <out>/confusions-<dataset>.npz: per method, the per-image confusion matrices "
                        "N×C×C (for bootstrap intervals over images; one process)")
    p.add_argument("--pamr", action="store_true",
                   help="refine the logits with PAMR before the argmax (as SCLIP/NACLIP's --pamr on)")
    add_clip_args(p)
    add_runtime_args(p)
    one_line_user_errors()  # bad checkpoints / CLIP weights from the command line: one line, as in training
    return p


def main(argv=None) -> dict:
    """Runs the evaluation; a bad dataset file or folder stops it with one line naming the path."""
    try:
        return _main(argv)
    except DatasetError as exc:
        raise SystemExit(f"error: {user_message(exc)}") from None


def _main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    apply_runtime(args)
    datasets = parse_pairs(args.data, "--data")
    prompt_paths = parse_pairs(args.prompts, "--prompts")
    if args.label_offset is not None and not any(get_profile(k).name == "folder" for k in datasets):
        raise SystemExit("--label-offset / --reduce-zero-label apply to folder datasets (--data folder=DIR) only")
    if args.save_confusions and not args.out:
        raise SystemExit("--save-confusions needs --out")
    with distributed_session(args.device) as ctx:
        if args.save_confusions and ctx.world_size > 1:
            raise SystemExit("--save-confusions runs in one process (its per-image matrices are not gathered)")
        seed_everything(args.seed)
        clip = load_clip(clip_spec(args), ctx.device)
        methods = build_methods(clip, prompt_paths, args.baselines)
        amp = amp_dtype(args.amp, ctx.device.type)
        results: dict[str, dict[str, SegScores]] = {}
        meta: dict[str, dict] = {}
        t0 = time.perf_counter()
        for key, root in datasets.items():
            prof = get_profile(key)
            if prof.name == "folder":
                root = compose_spec(root, args.label_offset)
            ds = build_dataset(key, root, args.split, label_space="full")
            tf = prof.eval_transform(**({"scale": tuple(args.eval_scale)} if args.eval_scale else {}))
            per_image = {} if args.save_confusions else None
            results[prof.name] = evaluate_dataset(clip, methods, ds, tf, ctx, args.limit,
                                                  args.num_workers, amp, not args.no_progress, args.pamr, per_image)
            if per_image is not None:
                out = Path(args.out) / f"confusions-{prof.name}.npz"
                out.parent.mkdir(parents=True, exist_ok=True)
                np.savez_compressed(out, **{k: np.stack(v) for k, v in per_image.items()})
            n = len(ds) if args.limit is None else min(args.limit, len(ds))
            unseen_names = {ds.prompt_names[i] for i in ds.unseen_indices}
            meta[prof.name] = {
                "root": str(root), "images": n, "skipped_missing": getattr(ds, "skipped", 0),
                "eval_scale": list(tf.scale) if tf.scale else "native", "classes": len(ds.class_names),
                "unseen": [ds.class_names[i] for i in ds.unseen_indices],
                # names of this dataset's unseen classes that a learned set saw in training
                # (expected only across datasets, Table 3; never for the dataset it learned on)
                "unseen_in_training_vocabulary": {
                    name: sorted(unseen_names & set(ps.meta.training_classes))
                    for name, (ps, _) in methods.items() if hasattr(ps, "meta")},
            }
        header = {"CLIP": clip.spec.describe(), "methods": ", ".join(methods),
                  "inference": ("whole image" if clip.sliding is None else
                                f"sliding window {clip.sliding.window}/{clip.sliding.stride}")
                               + ", single scale, keep-ratio img_scale per dataset" + (", PAMR" if args.pamr else ""),
                  "dense": clip.dense_mode,
                  "processes": ctx.world_size, "seconds": round(time.perf_counter() - t0, 1)}
        report = {"header": header, "datasets": meta,
                  "results": {ds: {m: s.as_dict() for m, s in sc.items()}
                              for ds, sc in results.items()}}
        if ctx.is_main:
            md = render_markdown(results, header)
            print(md)
            if args.out:
                out = Path(args.out)
                atomic_write_text(out / "results.md", md)
                atomic_write_text(out / "results.json", dumps(report))
                log.info("wrote %s/results.{md,json}", out)
        return report


if __name__ == "__main__":
    main()
