"""Gradio pieces the page builds on: an image input whose failures are messages, and the wrapper that turns
the library's input errors into ``gr.Error`` (with server paths cut out)."""
from __future__ import annotations

import functools
import logging
import re
from typing import Any, Callable

import gradio as gr
from PIL import Image, UnidentifiedImageError

import mvpseg

from .sources import MAX_PIXELS, DemoInputError

log = logging.getLogger("mvpseg.demo")
USER_ERRORS = (mvpseg.ImageError, mvpseg.VocabularyError, mvpseg.CheckpointError, DemoInputError)


class UnreadableImage(str):
    """What ``ValidatedImage`` hands on instead of a path when the upload cannot be used: the message itself.
    Raising in ``preprocess`` would fail the request before any handler runs — as a bare HTTP 400 at
    ``/queue/join`` once the event has a validator — so the validator shows it at the input and the handler
    raises it."""


class ValidatedImage(gr.Image):
    """``gr.Image`` whose preprocessing failures (not an image, decompression bomb, inline data: URL) become
    clear messages instead of a bare "Error". Rendered by the stock Image component in the browser."""

    is_template = True  # the frontend uses the parent's ("image") component

    def preprocess(self, payload: Any) -> Any:
        if isinstance(getattr(payload, "url", None), str) and payload.url.startswith("data:"):
            # Gradio would decode an inline base64 image here; uploads go through /upload (max_file_size) and
            # the page never sends data: URLs, so only a hand-made API call does: refuse it.
            return UnreadableImage("Inline data: URLs are not accepted: upload the image as a file.")
        try:
            return super().preprocess(payload)
        except Image.DecompressionBombError:
            return UnreadableImage(f"The image is far too large to process (the limit is {MAX_PIXELS / 1e6:.0f} "
                                   "megapixels). Downscale it and upload it again.")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            return UnreadableImage("The uploaded file is not an image that can be read (use PNG, JPEG, WebP, BMP, "
                                   "GIF or TIFF).")


_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~-])/(?:[^\s'\"`()<>,;]+/)+([^\s'\"`()<>,;]*)")


def redact_paths(message: str) -> str:
    """``message`` with every absolute path cut to its file name: where the server keeps uploads, temporary
    files and checkpoints is nobody's business (and says which user and folders it runs under)."""
    return _ABSOLUTE_PATH.sub(lambda m: m.group(1) or "…", message)


def user_errors(fn: Callable) -> Callable:
    """Turns the library's input errors into ``gr.Error`` (shown to the user); logs anything unexpected."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except USER_ERRORS as e:
            raise gr.Error(redact_paths(str(e))) from e
        except Exception as e:
            log.exception("request failed")
            raise gr.Error(f"Something went wrong on the server ({type(e).__name__}); it has been logged.") from e

    return wrapper
