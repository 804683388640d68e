"""Publishing mvpseg checkpoints on the Hugging Face Hub: the staged folder (checkpoint, its JSON, the model
card, the evaluation results) and its upload."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import FORMAT as PROMPTS_FORMAT, CheckpointError, read_sidecar, sidecar_paths
from .card import CardInfo, render_card
from .download import (_FORMATS, _REPO_ID, CARD_FILE, DEFAULT_FILES, EVAL_FILE, PROMPTS_FILE, STUDENT_FILE,
                       HubError)
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
    ``repo_id`` with a model card (``mvpseg/hub/card.py``): metadata from the checkpoint's JSON, metrics from a
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

