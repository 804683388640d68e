"""Command line: ``python -m mvpseg COMMAND`` or, once installed (``pip install .``), ``mvpseg COMMAND``.

``segment INPUT… --classes "cat, dog, sky" [--prompts CKPT | --student CKPT]`` (CKPT: a file or
``hf-hub:ORG/REPO``). One image file: ``--out overlay.png`` writes ``overlay.png``, ``overlay_labels.png`` and
``overlay.json``. Folders, glob patterns or several files: ``--out DIR`` gets ``<stem>_overlay.png``,
``<stem>_labels.png`` and ``<stem>.json`` per image (``mvpseg/batch.py``), unreadable files are reported and
skipped, ``--summary`` writes the pixel share of every class over all images.

``push CKPT ORG/REPO [--eval results.json] [--dry-run DIR] [--private]``: publishes learned prompts or a student
on the Hugging Face Hub with a model card (``mvpseg/hub.py``); ``pull hf-hub:ORG/REPO [--kind student]``
downloads them (or takes them from the local cache) and prints the local path.

Exit status: 0, 1 when some images were skipped, 2 for an error that stops the command.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .batch import collect_inputs, segment_many, write_prediction, write_summary
from .builder import build_predictor, resolve_device
from .checkpoint import CheckpointError
from .clip_backbone import ClipSpec, ClipWeightsUnavailable, add_clip_args
from .hub import HubError, resolve_checkpoint
from .image_io import ImageError, load_image
from .predictor import VocabularyError, parse_vocabulary

SINGLE_OUT = "overlay.png"
BATCH_OUT = "segmented"


def _predictor(args: argparse.Namespace):
    """(predictor, prompt set name): the student, learned prompts, or a handcrafted set."""
    if args.student:
        from .student import StudentPredictor

        path = resolve_checkpoint(args.student, "student")
        override = {} if args.seen_penalty is None else {"seen_penalty": args.seen_penalty}
        pred = StudentPredictor.from_checkpoint(path, ClipSpec.from_args(args), resolve_device(args.device),
                                                short_side=args.short_side, pamr=args.pamr, **override)
        return pred, pred.name
    if args.seen_penalty is not None:
        raise SystemExit("--seen-penalty applies to --student only")
    baselines = args.baseline is not None or args.prompts is None
    learned = {"learned": resolve_checkpoint(args.prompts, "prompts")} if args.prompts else None
    pred = build_predictor(ClipSpec.from_args(args), checkpoints=learned,
                           baselines=baselines, device=args.device, short_side=args.short_side, pamr=args.pamr)
    return pred, "learned" if args.prompts else (args.baseline or "maskclip-85")


def _is_batch(args: argparse.Namespace) -> bool:
    return len(args.inputs) > 1 or not Path(args.inputs[0]).is_file() or args.summary is not None


def _segment(args: argparse.Namespace) -> int:
    vocabulary = parse_vocabulary(args.classes)  # before loading any model: a bad vocabulary fails at once
    if not _is_batch(args):
        image = load_image(args.inputs[0])
        pred, prompt_set = _predictor(args)
        pred.set_image(image)
        out = Path(args.out or SINGLE_OUT)
        labels, legend = out.with_name(out.stem + "_labels.png"), out.with_suffix(".json")
        write_prediction(image, pred.predict(vocabulary, prompts=prompt_set), out, labels, legend, prompt_set)
        print(f"wrote {out}, {labels} and {legend}")
        return 0
    paths, problems = collect_inputs(args.inputs)
    if not paths:
        raise FileNotFoundError("; ".join(problems) or "no input images")
    out_dir = Path(args.out or BATCH_OUT)
    if out_dir.suffix.lower() in (".png", ".jpg", ".jpeg"):
        raise ValueError(f"--out {out_dir} looks like an image file; with several inputs it must be a folder")
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    pred, prompt_set = _predictor(args)
    report = segment_many(pred, paths, vocabulary, prompt_set, out_dir, progress=not args.no_progress)
    print(f"segmented {len(report.written)} of {len(paths)} images into {out_dir}")
    for path, message in report.failed:
        print(f"skipped {path}: {message}", file=sys.stderr)
    if args.summary is not None:
        target = Path(args.summary) if args.summary else out_dir / "summary.json"
        stats = getattr(pred, "stats", {})
        write_summary(report, target, {"prompt_set": prompt_set, "vocabulary": list(vocabulary),
                                       "text_encodes": stats.get("text_encodes")})
        print(f"wrote {target}")
    return 1 if report.failed else 0


def _push(args: argparse.Namespace) -> int:
    from .hub import push

    result = push(args.checkpoint, args.repo_id, eval_json=args.eval, command=args.train_command,
                  dry_run_dir=args.dry_run, private=args.private, eval_method=args.eval_method)
    where = f"into {result.folder} (dry run, nothing uploaded)" if args.dry_run else f"to {result.url or args.repo_id}"
    print(f"{result.kind}: wrote {', '.join(result.files)} {where}")
    return 0


def _pull(args: argparse.Namespace) -> int:
    from .hub import download

    print(download(args.ref, args.kind))
    return 0


def _hub_parsers(sub) -> None:
    push = sub.add_parser("push", help="publish learned prompts or a student on the Hugging Face Hub with a model card")
    push.add_argument("checkpoint", help="NAME.safetensors (its NAME.json beside it): prompts or a student")
    push.add_argument("repo_id", metavar="ORG/REPO", help="the Hub model repo (created if needed)")
    push.add_argument("--eval", default=None, metavar="JSON",
                      help="training.evaluate's results.json (or distill's eval.json): metrics for the card")
    push.add_argument("--eval-method", default=None, metavar="NAME",
                      help="the row of --eval that is this checkpoint (needed when it holds several learned sets)")
    push.add_argument("--command", dest="train_command", default=None,
                      help="the training command for the card (default: the one the training script recorded)")
    push.add_argument("--dry-run", default=None, metavar="DIR", help="write the repo's files into DIR, upload nothing")
    push.add_argument("--private", action="store_true", help="create the repo private")
    pull = sub.add_parser("pull", help="download pushed prompts or a student (or take them from the local cache)")
    pull.add_argument("ref", metavar="hf-hub:ORG/REPO[/FILE.safetensors]")
    pull.add_argument("--kind", default="prompts", choices=["prompts", "student"],
                      help="which default file a reference without one names")


def main(argv: list[str] | None = None) -> int:
    """Runs a subcommand; returns the exit status (the ``mvpseg`` console command exits with it)."""
    parser = argparse.ArgumentParser(prog="mvpseg", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    seg = sub.add_parser("segment", help="segment images into a vocabulary")
    seg.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    seg.add_argument("--classes", required=True, help='comma-separated vocabulary, e.g. "cat, dog, sky"')
    which = seg.add_mutually_exclusive_group()
    which.add_argument("--prompts", default=None, help="learned prompt checkpoint (.safetensors with its .json)")
    which.add_argument("--baseline", default=None, choices=["maskclip-85", "parts", "a-photo-of"],
                       help="handcrafted prompt set to use instead of learned prompts "
                            "(default without --prompts: maskclip-85)")
    which.add_argument("--student", default=None, help="MVP-SEG+ student checkpoint (.safetensors with its .json)")
    seg.add_argument("--seen-penalty", type=float, default=None, metavar="P",
                     help="with --student: lower its seen training classes' logits by P (default: the calibrated "
                          "penalty stored in the student; 0: off)")
    seg.add_argument("--short-side", type=int, default=512)
    seg.add_argument("--out", default=None,
                     help=f"one image: the overlay PNG (default {SINGLE_OUT}; the label map and a legend JSON go "
                          f"beside it); several: a folder (default {BATCH_OUT})")
    seg.add_argument("--pamr", action="store_true",
                     help="refine the masks with PAMR (image-guided smoothing, as SCLIP/NACLIP; slower)")
    seg.add_argument("--summary", nargs="?", const="", default=None, metavar="PATH",
                     help="write the pixel share of every class over all images (default PATH: OUT/summary.json)")
    seg.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_clip_args(seg)
    seg.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto")
    seg.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    _hub_parsers(sub)
    args = parser.parse_args(argv)
    run = {"segment": _segment, "push": _push, "pull": _pull}[args.command]
    try:
        return run(args)
    except (ClipWeightsUnavailable, CheckpointError, HubError, ImageError, VocabularyError, FileNotFoundError,
            ValueError) as e:
        if getattr(args, "debug", False) or os.environ.get("MVPSEG_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
