"""Argument groups shared by the training / evaluation / distillation scripts."""
from __future__ import annotations

import argparse

from mvpseg.clip_backbone import ClipSpec, add_clip_args  # noqa: F401  (re-exported for the scripts)

from .datasets import DatasetError
from .datasets.folder import compose_spec


def clip_spec(args: argparse.Namespace) -> ClipSpec:
    return ClipSpec.from_args(args)


class _FolderRootAction(argparse.Action):
    """``--data-root`` / ``--label-offset`` / ``--reduce-zero-label`` in any order: the label offset is folded
    into the data root (``DIR::label_offset=K``, ``training/datasets/folder.py``) so that it reaches the
    dataset through the run's recorded ``data_root`` like any other part of the data's identity."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if self.dest == "data_root":
            namespace.data_root_path = values
        else:
            namespace.label_offset = self.const if values in (None, []) else values
        if getattr(namespace, "data_root_path", None) is not None:
            namespace.data_root = compose_spec(namespace.data_root_path, getattr(namespace, "label_offset", None))


def label_offset(text: str) -> int:
    value = int(text)
    if not 0 <= value < 255:
        raise argparse.ArgumentTypeError(f"label offset must be 0..254, got {value}")
    return value


def add_label_offset_args(p: argparse.ArgumentParser, action: type[argparse.Action] | None = None) -> None:
    """mmseg's ``reduce_zero_label`` and its generalisation, for ``--dataset folder`` (folder.py)."""
    g = p.add_mutually_exclusive_group()
    extra = {"action": action} if action else {}
    g.add_argument("--label-offset", type=label_offset, default=None, metavar="K", **extra,
                   help="folder datasets: mask id of classes.txt's line i is i+K; ids below K are ignored")
    zero = {"action": action, "nargs": 0} if action else {"action": "store_const"}
    g.add_argument("--reduce-zero-label", dest="label_offset", const=1, **zero,
                   help="folder datasets: mask id 0 is ignored and classes start at 1 (ADE20K; = --label-offset 1)")


def add_data_args(p: argparse.ArgumentParser, out_help: str) -> None:
    """The training dataset and run folder, shared by the training scripts."""
    p.add_argument("--dataset", required=True, help="voc | context | cocostuff | toyworld | folder (your own data)")
    p.add_argument("--data-root", required=True, action=_FolderRootAction,
                   help="dataset folder (toyworld: a spec; folder: DIR with images/, masks/, classes.txt; "
                        "docs/datasets.md)")
    add_label_offset_args(p, _FolderRootAction)
    p.add_argument("--split", default=None, help="training split (default: the dataset's)")
    p.add_argument("--out", required=True, help=out_help)
    one_line_user_errors()


def user_message(exc: BaseException) -> str:
    """One line for a user error.  DataLoader workers re-raise with the worker's traceback inside the
    message; its last line is the error itself."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else type(exc).__name__
    return last.split(f"{type(exc).__name__}: ", 1)[-1].strip()


def user_error_types() -> tuple[type, ...]:
    """Errors that mean "your input is wrong" (each message names the file or setting), not a bug."""
    from mvpseg import CheckpointError, ClipWeightsError, ClipWeightsUnavailable, VocabularyError
    from mvpseg.dense_settings import DenseSettingsError

    from .checkpointing import ResumeError

    return (DatasetError, CheckpointError, ClipWeightsError, ClipWeightsUnavailable, VocabularyError, ResumeError,
            DenseSettingsError)


def one_line_user_errors() -> None:
    """Command-line runs report a user error (``user_error_types``: a bad dataset folder, checkpoint, CLIP
    weights file or resume state) as one ``error:`` line, not a traceback; ``--debug`` (or ``MVPSEG_DEBUG=1``)
    keeps the traceback. Installed by the scripts' parsers; other exceptions are untouched."""
    import os
    import sys

    previous = sys.excepthook
    if getattr(previous, "_mvpseg_dataset_errors", False):
        return

    def hook(kind, exc, tb):
        if issubclass(kind, user_error_types()) and not os.environ.get("MVPSEG_DEBUG"):
            print(f"error: {user_message(exc)}", file=sys.stderr)
        else:
            previous(kind, exc, tb)

    hook._mvpseg_dataset_errors = True
    sys.excepthook = hook


class _DebugAction(argparse.Action):
    """``--debug``: user errors keep their traceback (what ``MVPSEG_DEBUG=1`` does; the hook reads it)."""

    def __init__(self, option_strings, dest, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        import os

        os.environ["MVPSEG_DEBUG"] = "1"
        setattr(namespace, self.dest, True)


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("runtime")
    g.add_argument("--debug", action=_DebugAction,
                   help="show the full traceback of a user error (bad dataset, checkpoint, weights) too")
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


def command_line(module: str, argv=None) -> str:
    """The command that started this run (``python -m MODULE ARGS``, or ``torchrun --nproc_per_node N -m MODULE
    ARGS`` under torchrun), recorded in the log and the checkpoint so that a published model says how it was
    trained."""
    import os
    import shlex
    import sys

    world, local = os.environ.get("WORLD_SIZE", "1"), os.environ.get("LOCAL_WORLD_SIZE")
    launcher = ["python"]
    if world != "1":
        launcher = ["torchrun", "--nproc_per_node", local or world]
        if local and local != world:
            launcher += ["--nnodes", str(int(world) // max(int(local), 1))]
    return shlex.join([*launcher, "-m", module, *(sys.argv[1:] if argv is None else [str(a) for a in argv])])
