"""User inputs of the demo: the image (validated, downscaled to a display size) and learned prompts given as
an upload or a Hugging Face Hub repo. Every failure is a ``DemoInputError`` / ``mvpseg`` error whose message
is shown to the user as is.
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

import mvpseg
from mvpseg import hub

from .models import describe_prompts, offline

# Decoded pixels accepted at all (checked on the file header, before decoding). Far above any photo, far
# below what would exhaust memory.
MAX_PIXELS = 40_000_000
# Larger images are downscaled first: nothing the page shows needs more, and the per-class full-size maps
# (label map, overlays) stay cheap. The CLIP tower sees at most the predictor's work size anyway.
DISPLAY_MAX_SIDE = 1024
HUB_TIMEOUT_S = hub.TIMEOUT_S
DEFAULT_HUB_FILE = hub.PROMPTS_FILE  # what `mvpseg push` writes


class DemoInputError(ValueError):
    """An input the demo cannot use; the message says what to do instead."""


@dataclass(frozen=True)
class DemoImage:
    """The image as the demo uses it: RGB uint8 at display size, a content key, and what was done to it."""

    rgb: np.ndarray
    key: str
    original_size: tuple[int, int]  # (W, H) as uploaded
    note: str | None


NO_IMAGE = "No image: upload one (or click an example) first."


def fit_long_side(size: tuple[int, int], max_side: int) -> tuple[int, int] | None:
    """(W, H) → the (w, h) with the long side at ``max_side`` and the aspect kept, or None when it fits."""
    w, h = size
    if max(w, h) <= max_side:
        return None
    scale = max_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def load_demo_image(src: mvpseg.image_io.ImageLike | None) -> DemoImage:
    """Loads and validates an uploaded image; downscales it so that its long side is ≤ DISPLAY_MAX_SIDE."""
    if src is None:
        raise DemoInputError(NO_IMAGE)
    loaded = mvpseg.image_io.read_image(src, max_pixels=MAX_PIXELS)
    rgb = loaded.rgb
    h, w = rgb.shape[:2]
    note = loaded.note
    size = fit_long_side((w, h), DISPLAY_MAX_SIDE)
    if size is not None:
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)  # area averaging: no aliasing
        note = " ".join(filter(None, [note, f"The image was downscaled from {w}×{h} to {size[0]}×{size[1]} pixels."]))
    digest = hashlib.sha1(np.ascontiguousarray(rgb).tobytes())
    digest.update(str(rgb.shape).encode())
    return DemoImage(np.ascontiguousarray(rgb), digest.hexdigest(), (w, h), note)


@dataclass(frozen=True)
class PromptSource:
    """Learned prompts from outside the app. ``key`` identifies the content (re-registering is skipped)."""

    key: str
    prompts: mvpseg.LearnedPrompts
    origin: str

    @property
    def description(self) -> str:
        return describe_prompts(self.prompts)


def _digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha1()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _load_pair(safetensors: Path, sidecar: Path, clip: mvpseg.FrozenCLIP, name: str, origin: str) -> PromptSource:
    """Copies the pair under one stem (load_prompts finds the .json beside the .safetensors) and loads it."""
    with tempfile.TemporaryDirectory(prefix="mvpseg_prompts_") as tmp:
        st, js = Path(tmp) / "prompts.safetensors", Path(tmp) / "prompts.json"
        shutil.copyfile(safetensors, st)
        shutil.copyfile(sidecar, js)
        # CheckpointError when it does not fit this CLIP; its dense mode is checked per request against the
        # page's selection (SegmentService), not against the mode the app started with
        prompts = mvpseg.load_prompts(st, clip, name=name, check_dense=False)
        return PromptSource(_digest([st, js]), prompts, origin)


def prompts_from_upload(files: Sequence[str] | str | None, clip: mvpseg.FrozenCLIP) -> PromptSource:
    """An uploaded checkpoint: exactly one ``.safetensors`` and its ``.json`` metadata."""
    if files is None or (not isinstance(files, str) and len(files) == 0):
        raise DemoInputError("'Uploaded checkpoint' is selected but nothing is uploaded: upload the checkpoint's "
                             ".safetensors file together with its .json metadata.")
    paths = [Path(files)] if isinstance(files, str) else [Path(f) for f in files]
    st = [p for p in paths if p.suffix.lower() == ".safetensors"]
    js = [p for p in paths if p.suffix.lower() == ".json"]
    if len(st) != 1 or len(js) != 1 or len(paths) != 2:
        names = ", ".join(p.name for p in paths)
        raise DemoInputError(f"Upload exactly two files: NAME.safetensors and its NAME.json metadata, as written "
                             f"by mvpseg.save_prompts (got: {names}).")
    return _load_pair(st[0], js[0], clip, "uploaded", f"upload {st[0].name}")


def parse_hub_ref(ref: str) -> tuple[str, str]:
    """'hf-hub:org/repo[/dir/file.safetensors]' or 'org/repo' → (repo id, file name in the repo)."""
    try:
        return hub.parse_hub_ref(ref, DEFAULT_HUB_FILE)
    except hub.HubError as e:
        raise DemoInputError(str(e)) from None


def prompts_from_hub(ref: str, clip: mvpseg.FrozenCLIP, timeout: float = HUB_TIMEOUT_S) -> PromptSource:
    """Downloads (or takes from the local Hub cache) ``file.safetensors`` and ``file.json`` of a Hub repo."""
    repo, filename = parse_hub_ref(ref)
    # Offline (or unreachable): only the local cache may answer, and it does so at once.
    local_only = offline() or not hub.hub_reachable(timeout)
    try:
        st = hub.download_pair(repo, filename, local_files_only=local_only, timeout=timeout)
    except hub.HubError as e:
        raise DemoInputError(f"{e} Download the two files elsewhere and upload them under 'Your own learned "
                             "prompts' instead.") from e
    return _load_pair(st, st.with_suffix(".json"), clip, "hub", f"hf-hub:{repo}/{filename}")
