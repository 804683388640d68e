"""Command line: ``python -m mvpseg segment IMAGE --classes "cat, dog, sky" [--prompts CKPT] --out overlay.png``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from .builder import build_predictor
from .checkpoint import CheckpointError
from .clip_backbone import ClipSpec, ClipWeightsUnavailable, add_clip_args
from .image_io import ImageError, load_image
from .predictor import VocabularyError
from .visualize import legend_entries, overlay, palette


def _segment(args: argparse.Namespace) -> int:
    baselines = args.baseline is not None or args.prompts is None
    pred = build_predictor(ClipSpec.from_args(args), checkpoints={"learned": args.prompts} if args.prompts else None,
                           baselines=baselines, device=args.device, short_side=args.short_side)
    prompt_set = "learned" if args.prompts else (args.baseline or "maskclip-85")
    image = load_image(args.image)
    pred.set_image(image)
    result = pred.predict(args.classes, prompts=prompt_set)
    colors = palette(len(result.classes))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay(image, result.label_map, colors)).save(out)
    labels_path = out.with_name(out.stem + "_labels.png")
    dtype = np.uint8 if len(result.classes) < 256 else np.uint16
    Image.fromarray(result.label_map.astype(dtype)).save(labels_path)
    legend = {"classes": list(result.classes), "colors": dict(legend_entries(result.classes, colors)),
              "prompt_set": prompt_set, "label_map": labels_path.name,
              "gpr_scores": None if result.gpr_scores is None else
              {c: round(float(s), 4) for c, s in zip(result.classes, result.gpr_scores)},
              "pixel_share": {c: round(float((result.label_map == i).mean()), 4) for i, c in enumerate(result.classes)}}
    legend_path = out.with_suffix(".json")
    legend_path.write_text(json.dumps(legend, indent=2))
    print(f"wrote {out}, {labels_path} and {legend_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mvpseg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    seg = sub.add_parser("segment", help="segment one image into a vocabulary")
    seg.add_argument("image")
    seg.add_argument("--classes", required=True, help='comma-separated vocabulary, e.g. "cat, dog, sky"')
    seg.add_argument("--prompts", default=None, help="learned prompt checkpoint (.safetensors with its .json)")
    seg.add_argument("--baseline", default=None, choices=["maskclip-85", "parts", "a-photo-of"],
                     help="handcrafted prompt set to use instead of learned prompts (default without --prompts: maskclip-85)")
    seg.add_argument("--short-side", type=int, default=512)
    seg.add_argument("--out", default="overlay.png", help="overlay PNG; the label map and a legend JSON go beside it")
    add_clip_args(seg)
    seg.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto")
    args = parser.parse_args(argv)
    try:
        return _segment(args)
    except (ClipWeightsUnavailable, CheckpointError, ImageError, VocabularyError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
