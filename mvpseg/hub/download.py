"""Reading mvpseg checkpoints from the Hugging Face Hub: ``hf-hub:ORG/REPO[/file.safetensors]`` references,
offline rules (only the local cache when offline or unreachable), downloads of a checkpoint and its JSON."""
from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path

from ..checkpoint import FORMAT as PROMPTS_FORMAT, load_prompts, sidecar_paths
from ..prompts import LearnedPrompts

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


