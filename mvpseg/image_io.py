"""Image loading and validation: every input becomes an RGB uint8 H×W×3 array, or a clear ImageError."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

ImageLike = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]

MAX_PIXELS = 64_000_000  # decoded pixels; bigger files are refused before decoding (decompression bombs)
MAX_ASPECT = 20.0


class ImageError(ValueError):
    """The input is not a usable image; the message says why."""


def _check_size(w: int, h: int, max_pixels: int) -> None:
    if w < 1 or h < 1:
        raise ImageError(f"image has no pixels ({w}×{h})")
    if w * h > max_pixels:
        raise ImageError(f"image is {w}×{h} = {w * h / 1e6:.0f} MP; the limit is {max_pixels / 1e6:.0f} MP. "
                         "Downscale it first.")
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise ImageError(f"image aspect ratio {max(w, h) / min(w, h):.0f}:1 is too extreme (limit {MAX_ASPECT:.0f}:1)")


def _to_uint8(f: np.ndarray, is_float: bool) -> np.ndarray:
    """High-bit-depth or float pixel values → uint8, one rule for files and arrays: floats in [0, 1] scale by
    255, values above 255 are 16-bit (65535 → 255, i.e. ÷ 257). A fixed scale, never the image's own maximum,
    so a dark 16-bit image stays dark and two routes to the same pixels agree."""
    if f.size and is_float and f.max() <= 1.0:
        f = f * 255.0
    elif f.size and f.max() > 255.0:
        f = f / 257.0
    return np.clip(f.round(), 0, 255).astype(np.uint8)


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any PIL mode → RGB uint8. Transparent pixels are composited over white, high-bit-depth gray rescaled."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = _to_uint8(np.asarray(im, dtype=np.float64), is_float=im.mode == "F")
        return np.repeat(a[:, :, None], 3, axis=2)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def _from_array(a: np.ndarray, max_pixels: int) -> np.ndarray:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ImageError(f"array of shape {a.shape} is not an image (expected H×W, H×W×3 or H×W×4)")
    _check_size(a.shape[1], a.shape[0], max_pixels)
    if a.dtype != np.uint8:
        if a.dtype == bool or not np.issubdtype(a.dtype, np.number) or not np.isfinite(a).all():
            raise ImageError(f"image array has dtype {a.dtype} or non-finite values")
        a = _to_uint8(a.astype(np.float64), is_float=np.issubdtype(a.dtype, np.floating))
    if a.ndim == 2:
        return np.repeat(a[:, :, None], 3, axis=2)
    if a.shape[2] == 4:
        alpha = a[:, :, 3:4].astype(np.float32) / 255.0
        return (a[:, :, :3] * alpha + 255.0 * (1 - alpha)).round().astype(np.uint8)
    return np.ascontiguousarray(a)


@dataclass(frozen=True)
class LoadedImage:
    """An image as read: RGB uint8 H×W×3, and whether the file held more frames than the one used."""

    rgb: np.ndarray
    animated: bool = False

    @property
    def note(self) -> str | None:
        """What the user should know about how the file was read (None when nothing)."""
        if self.animated:
            return "The file is animated; only its first frame is segmented."
        return None


def read_image(src: ImageLike, max_pixels: int = MAX_PIXELS) -> LoadedImage:
    """Path, bytes, PIL image or array → LoadedImage (RGB uint8, EXIF orientation applied).

    Animated GIF / WebP / APNG files give their first frame with ``animated=True`` (cheap to tell: Pillow
    looks for a second frame only, it never counts or decodes them all). Raises ImageError for missing,
    corrupt, empty, absurdly large or absurdly elongated images.
    """
    if isinstance(src, np.ndarray):
        return LoadedImage(_from_array(src, max_pixels))
    if isinstance(src, Image.Image):
        _check_size(*src.size, max_pixels)
        return LoadedImage(_to_rgb(ImageOps.exif_transpose(src)), bool(getattr(src, "is_animated", False)))
    if isinstance(src, (bytes, bytearray)):
        fp, label = io.BytesIO(src), "uploaded data"
    elif isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_file():
            raise ImageError(f"image file not found: {path}")
        fp, label = open(path, "rb"), str(path)
    else:
        raise ImageError(f"cannot read an image from {type(src).__name__}")
    try:
        with fp:
            with Image.open(fp) as im:
                _check_size(*im.size, max_pixels)  # header only: nothing decoded yet
                animated = bool(getattr(im, "is_animated", False))
                if animated:
                    im.seek(0)  # is_animated may have moved to frame 1 to look for it
                im.load()
                return LoadedImage(_to_rgb(ImageOps.exif_transpose(im)), animated)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # Pillow refuses such headers before we see the size
        raise ImageError(f"{label} declares far more pixels than can be decoded safely (a decompression bomb?); "
                         f"the limit is {max_pixels / 1e6:.0f} MP") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{label} is not a readable image ({e.__class__.__name__})") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{label} is corrupt or truncated: {e}") from e


def load_image(src: ImageLike, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Path, bytes, PIL image or array → RGB uint8 array H×W×3 (EXIF orientation applied; the first frame of
    an animated file — ``read_image`` also says whether there were more).

    Raises ImageError for missing, corrupt, empty, absurdly large or absurdly elongated images.
    """
    return read_image(src, max_pixels).rgb


def resize_short_side(w: int, h: int, short_side: int, max_long_side: int) -> tuple[int, int]:
    """Target (w, h): short side = ``short_side`` unless that makes the long side exceed ``max_long_side``."""
    scale = min(short_side / min(w, h), max_long_side / max(w, h))
    return max(1, round(w * scale)), max(1, round(h * scale))


def prepare_image(image: ImageLike, short_side: int, max_long_side: int, device: torch.device | str
                  ) -> tuple[np.ndarray, torch.Tensor, tuple[int, int]]:
    """Loads an image and resizes it for a network: returns (RGB uint8 H×W×3, 1×3×h×w float in [0, 1] on
    ``device``, (h, w)) with the short side at ``short_side`` unless the long side would pass ``max_long_side``."""
    rgb = load_image(image)
    h, w = rgb.shape[:2]
    tw, th = resize_short_side(w, h, short_side, max_long_side)
    x = torch.from_numpy(rgb).to(device).permute(2, 0, 1)[None].float() / 255.0
    if (th, tw) != (h, w):
        # antialias: downscaling a big photo without it aliases fine textures into the features
        x = F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    return rgb, x, (th, tw)
