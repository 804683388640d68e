"""Hugging Face Hub round trip for mvpseg checkpoints: ``push`` publishes learned prompts or an MVP-SEG+ student
with a model card; ``download`` / ``load_prompts_from_hub`` read them back (the demo's ``hf-hub:`` box, the
``--prompts`` / ``--student`` options of ``python -m mvpseg segment`` and ``build_predictor`` use them).

A pushed repo holds exactly the layout the reading side expects by default::

    prompts.safetensors + prompts.json      (learned prompts)   or   student.safetensors + student.json
    README.md                               model card (``mvpseg/hub_card.py``)
    eval.json                               the ``training.evaluate`` results the card's metrics come from

so ``hf-hub:ORG/REPO`` names the prompts and ``hf-hub:ORG/REPO/student.safetensors`` (or ``kind="student"``) the
student. ``huggingface_hub`` (installed with open_clip) is imported only when a function needs it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import FORMAT as PROMPTS_FORMAT, CheckpointError, load_prompts, read_sidecar, sidecar_paths
from .hub_card import CardInfo, render_card
from .prompts import LearnedPrompts

HUB_PREFIX = "hf-hub:"
PROMPTS_FILE = "prompts.safetensors"
STUDENT_FILE = "student.safetensors"
DEFAULT_FILES = {"prompts": PROMPTS_FILE, "student": STUDENT_FILE}
CARD_FILE = "README.md"
EVAL_FILE = "eval.json"
TIMEOUT_S = 5.0
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
# mvpseg.student.FORMAT, spelled out: the builder imports this module and the student module imports the builder
STUDENT_FORMAT = "mvpseg-student"
_FORMATS = {PROMPTS_FORMAT: "prompts", STUDENT_FORMAT: "student"}


class HubError(ValueError):
    """A Hub reference that cannot be used, or files that cannot be had; the message says why."""


# ----------------------------------------------------------------------------------------------------- reading
def is_hub_ref(text: object) -> bool:
    return isinstance(text, str) and text.strip().startswith(HUB_PREFIX)


def parse_hub_ref(ref: str, default_file: str = PROMPTS_FILE) -> tuple[str, str]:
    """'hf-hub:org/repo[/dir/file.safetensors]' or 'org/repo[/…]' → (repo id, file in the repo); HubError else."""
    text = ref.strip()
    if text.startswith(HUB_PREFIX):
        text = text[len(HUB_PREFIX):]
    parts = [p for p in text.strip("/").split("/") if p]
    if len(parts) < 2:
        raise HubError(f"'{ref.strip()}' is not a Hub reference: use hf-hub:ORG/REPO or "
                       "hf-hub:ORG/REPO/path/prompts.safetensors.")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or default_file
    if not _REPO_ID.match(repo) or ".." in filename or not filename.endswith(".safetensors"):
        raise HubError(f"'{ref.strip()}' is not a valid Hub reference (expected hf-hub:ORG/REPO, optionally "
                       "followed by the path of a .safetensors file in the repo).")
    return repo, filename


def sidecar_name(filename: str) -> str:
    """'dir/x.safetensors' → 'dir/x.json' (the metadata file beside it)."""
    return filename[: -len(".safetensors")] + ".json"


def hub_offline() -> bool:
    """Whether the Hub must not be contacted (``HF_HUB_OFFLINE`` set), read at call time."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")


def hub_reachable(timeout: float = TIMEOUT_S) -> bool:
    """A quick TCP probe of huggingface.co (so that an unreachable Hub costs seconds, not a long retry loop)."""
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def download_pair(repo_id: str, filename: str = PROMPTS_FILE, *, local_files_only: bool | None = None,
                  timeout: float = TIMEOUT_S, cache_dir: str | os.PathLike | None = None, revision: str | None = None,
                  token: str | None = None) -> Path:
    """Downloads ``filename`` and its ``.json`` sidecar (or takes them from the local Hugging Face cache) and
    returns the local ``.safetensors`` path, the sidecar beside it. ``local_files_only=None``: the cache only
    when offline (``HF_HUB_OFFLINE``) or when the Hub does not answer within ``timeout``."""
    from huggingface_hub import hf_hub_download  # only the Hub functions need it

    sidecar = sidecar_name(filename)
    local_only = (hub_offline() or not hub_reachable(timeout)) if local_files_only is None else local_files_only
    kw = dict(etag_timeout=timeout, local_files_only=local_only, cache_dir=cache_dir, revision=revision, token=token)
    try:
        st = Path(hf_hub_download(repo_id, filename, **kw))
        js = Path(hf_hub_download(repo_id, sidecar, **kw))
    except Exception as e:  # hub errors come in many types (offline, 404, gated, timeouts): one message
        why = ("the Hugging Face Hub is not reachable from this machine and the files are not in its local "
               "cache" if local_only else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        raise HubError(f"Could not get {filename} and {sidecar} from {HUB_PREFIX}{repo_id}: {why}.") from e
    if js != sidecar_paths(st)[1]:  # a snapshot keeps the repo's layout; copy if a cache ever did not
        shutil.copyfile(js, sidecar_paths(st)[1])
    return st


def download(ref: str, kind: str = "prompts", **kw) -> Path:
    """``hf-hub:ORG/REPO[/file.safetensors]`` → the local ``.safetensors`` path (sidecar beside it); without a
    file, the one ``push`` writes for ``kind`` ("prompts" or "student"). ``kw``: ``download_pair``'s."""
    repo, filename = parse_hub_ref(ref, DEFAULT_FILES[kind])
    return download_pair(repo, filename, **kw)


def resolve_checkpoint(path: str | os.PathLike, kind: str = "prompts", **kw) -> str | os.PathLike:
    """A local checkpoint path as is; an ``hf-hub:`` reference downloaded (``download``)."""
    return download(str(path), kind, **kw) if is_hub_ref(path) else path


def load_prompts_from_hub(ref: str, clip=None, name: str | None = None, dense_mode: str | None = None,
                          check_dense: bool = True, **kw) -> LearnedPrompts:
    """``mvpseg.load_prompts`` of ``download(ref)``: the pushed prompts, checked against ``clip`` when given."""
    return load_prompts(download(ref, "prompts", **kw), clip, name=name, dense_mode=dense_mode,
                        check_dense=check_dense)


# ----------------------------------------------------------------------------------------------------- pushing
@dataclass(frozen=True)
class PushResult:
    """What was (or, in a dry run, would be) uploaded: the staged folder's files, and the commit's URL."""

    repo_id: str
    kind: str
    folder: Path | None
    files: tuple[str, ...]
    url: str | None = None


def checkpoint_kind(path: str | os.PathLike) -> tuple[str, dict]:
    """("prompts" | "student", the raw JSON metadata) of a checkpoint, by its sidecar's ``format``."""
    _, js = sidecar_paths(path)
    try:
        fmt = json.loads(js.read_text()).get("format") if js.is_file() else None
    except (ValueError, UnicodeDecodeError, AttributeError):
        fmt = None
    if fmt not in _FORMATS:
        read_sidecar(js, PROMPTS_FORMAT, "prompt")  # raises the usual message (missing, not JSON, wrong format)
    return _FORMATS[fmt], read_sidecar(js, fmt, _FORMATS[fmt])


def _check_tensors(st: Path, kind: str) -> None:
    """The .safetensors file exists and its header reads (the tensors are not loaded)."""
    from safetensors import SafetensorError, safe_open

    if not st.is_file():
        raise CheckpointError(f"{kind} tensors not found: {st}")
    try:
        with safe_open(str(st), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{st} is not a readable safetensors file: {e}") from None


def _read_eval(eval_json: str | os.PathLike | None) -> dict | None:
    if eval_json is None:
        return None
    p = Path(eval_json)
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise HubError(f"cannot read the evaluation results {p}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise HubError(f"{p} is not a training.evaluate results.json (nor a distill eval.json): no 'results'")
    return data


def stage(ckpt_path: str | os.PathLike, repo_id: str, folder: str | os.PathLike, *,
          eval_json: str | os.PathLike | None = None, command: str | None = None,
          eval_method: str | None = None) -> PushResult:
    """Writes the repo's files into ``folder``: the checkpoint pair under the default names, ``eval.json`` and the
    model card. Checks the checkpoint (format, tensors readable) before writing anything."""
    if not _REPO_ID.match(repo_id or ""):
        raise HubError(f"'{repo_id}' is not a Hub repo id (expected ORG/NAME)")
    st, js = sidecar_paths(ckpt_path)
    kind, meta = checkpoint_kind(st)
    _check_tensors(st, kind)
    results = _read_eval(eval_json)
    info = CardInfo.from_meta(kind, meta, repo_id, PROMPTS_FILE if kind == "prompts" else STUDENT_FILE,
                              command=command, results=results, eval_method=eval_method)
    card = render_card(info)  # before copying: a bad eval JSON or method fails without a half-written folder
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    target = out / DEFAULT_FILES[kind]
    shutil.copyfile(st, target)
    shutil.copyfile(js, sidecar_paths(target)[1])
    files = [target.name, sidecar_paths(target)[1].name]
    if results is not None:
        (out / EVAL_FILE).write_text(json.dumps(results, indent=1))
        files.append(EVAL_FILE)
    (out / CARD_FILE).write_text(card)
    return PushResult(repo_id, kind, out, tuple(files + [CARD_FILE]))


def push(ckpt_path: str | os.PathLike, repo_id: str, *, eval_json: str | os.PathLike | None = None,
         command: str | None = None, dry_run_dir: str | os.PathLike | None = None, token: str | None = None,
         private: bool = False, eval_method: str | None = None) -> PushResult:
    """Publishes learned prompts or a student checkpoint (``NAME.safetensors`` + ``NAME.json``) to the Hub repo
    ``repo_id`` with a model card (``mvpseg/hub_card.py``): metadata from the checkpoint's JSON, metrics from a
    ``training.evaluate`` JSON (``eval_json``; ``eval_method`` picks the row when it holds several learned sets),
    the training command recorded by the training script (``command`` overrides it). ``dry_run_dir``: only
    writes the repo's files there (no network). Otherwise creates the repo if needed and uploads one commit."""
    if dry_run_dir is not None:
        return stage(ckpt_path, repo_id, dry_run_dir, eval_json=eval_json, command=command, eval_method=eval_method)
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory(prefix="mvpseg_push_") as tmp:
        staged = stage(ckpt_path, repo_id, tmp, eval_json=eval_json, command=command, eval_method=eval_method)
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp, repo_type="model",
                                 commit_message=f"mvpseg push: {staged.kind} ({', '.join(staged.files)})")
    url = getattr(info, "commit_url", None) or (str(info) if info is not None else None)
    return PushResult(repo_id, staged.kind, None, staged.files, url)
