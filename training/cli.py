"""Argument groups shared by the training / evaluation / distillation scripts."""
from __future__ import annotations

import argparse

from mvpseg.clip_backbone import ClipSpec, add_clip_args  # noqa: F401  (re-exported for the scripts)


def clip_spec(args: argparse.Namespace) -> ClipSpec:
    return ClipSpec.from_args(args)


def add_data_args(p: argparse.ArgumentParser, out_help: str) -> None:
    """The training dataset and run folder, shared by the training scripts."""
    p.add_argument("--dataset", required=True, help="voc | context | cocostuff | toyworld")
    p.add_argument("--data-root", required=True, help="dataset folder (toyworld: a spec, docs/training.md)")
    p.add_argument("--split", default=None, help="training split (default: the dataset's)")
    p.add_argument("--out", required=True, help=out_help)


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda (torchrun: one GPU per process)")
    g.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per process")
    g.add_argument("--amp", default="auto", choices=["auto", "off", "fp16", "bf16"],
                   help="mixed precision on CUDA (auto: fp16 on CUDA, off on CPU)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--cpu-threads", type=int, default=None,
                   help="torch intra-op threads per process (CPU runs; default: torch's choice)")


def apply_runtime(args: argparse.Namespace) -> None:
    import torch

    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)


def amp_dtype(choice: str, device_type: str):
    import torch

    if device_type != "cuda" or choice == "off":
        return None
    return torch.bfloat16 if choice == "bf16" else torch.float16


def parse_pairs(items, what: str) -> dict[str, str]:
    """['a=x', 'y'] → {'a': 'x', 'y': 'y'}; for NAME=PATH options."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep:
            name, value = item, item
        if not name or not value:
            raise SystemExit(f"bad {what} {item!r}; expected NAME=VALUE")
        if name in out:
            raise SystemExit(f"{what} {name!r} given twice")
        out[name] = value
    return out
