"""Load images as RGB PIL images, from files, PIL images or uint8 arrays, checking the pixel count first."""

from __future__ import annotations

import os
import re
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from omnilab.errors import MediaError

from . import limits
from .files import check_media, label_of, subject_of


def load_image(source: Any, *, name: str | None = None) -> Image.Image:
    """Load an image as an RGB `PIL.Image.Image`.

    `source` is a file path, a PIL image, or a uint8 array [H, W], [H, W, 1], [H, W, 3] or
    [H, W, 4]. The size is checked against `MAX_IMAGE_PIXELS` from the header, before decoding.
    EXIF rotation is applied, transparency is composited onto white, and of an animated image the
    first frame is kept. `name` is how error messages call the item (e.g. "image item 1").
    """
    subject = subject_of("image", source, name)
    if isinstance(source, Image.Image):
        _check_image_size(source.size, subject)
        with _image_errors(subject, "an image"):
            return _to_rgb(source)
    if isinstance(source, np.ndarray):
        return _image_from_array(source, subject)
    if not isinstance(source, (str, os.PathLike)):
        raise MediaError(
            f"{subject} has type {type(source).__name__}; pass a file path, a PIL image "
            "or a uint8 array [H, W, 3]"
        )
    path, fmt = check_media(source, label_of(source, name), "image")
    with _image_errors(subject, f"{fmt} data"), warnings.catch_warnings():
        # Pillow warns between its own limit and twice that; ours is lower and checked below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:  # reads the header only
            _check_image_size(image.size, subject)
            image.load()
            return _to_rgb(image)


@contextmanager
def _image_errors(subject: str, what: str) -> Iterator[None]:
    """Turn Pillow's errors while opening or decoding into MediaErrors."""
    try:
        yield
    except MediaError:
        raise
    except Image.DecompressionBombError as error:  # Pillow's own cap, hit while reading the header
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        raise _too_big(subject, int(pixels.group(1)) if pixels else None) from error
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as error:
        reason = "is truncated" if "truncated" in str(error) else f"cannot be decoded as {what} ({error})"
        raise MediaError(
            f"{subject} {reason}; it may be corrupt or cut short; re-export or re-copy it"
        ) from error


def _too_big(subject: str, pixels: int | None, size: tuple[int, int] | None = None) -> MediaError:
    shape = f"{size[0]}×{size[1]} = " if size else ""
    amount = f"{shape}{pixels / 1e6:.1f} megapixels" if pixels else "more pixels than Pillow allows"
    return MediaError(
        f"{subject} is {amount} (from its header); the limit is {limits.MAX_IMAGE_PIXELS / 1e6:.1f} megapixels; "
        "downscale it first"
    )


def _check_image_size(size: tuple[int, int], subject: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise MediaError(
            f"{subject} is {width}×{height}, which has no pixels; pass a picture that is not empty"
        )
    if width * height > limits.MAX_IMAGE_PIXELS:
        raise _too_big(subject, width * height, size)


def _to_rgb(image: Image.Image) -> Image.Image:
    """A new RGB image: EXIF rotation applied, transparency composited onto white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _image_from_array(array: np.ndarray, subject: str) -> Image.Image:
    if array.dtype != np.uint8:
        raise MediaError(
            f"{subject} has dtype {array.dtype}; pass uint8 values 0-255 "
            "(for floats in [0, 1]: (array * 255).round().astype(np.uint8))"
        )
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[2] not in (1, 3, 4):
        raise MediaError(
            f"{subject} has shape {array.shape}, channels first; pass [H, W, 3] (array.transpose(1, 2, 0))"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise MediaError(f"{subject} has shape {array.shape}; pass [H, W, 3], [H, W, 4] or [H, W]")
    _check_image_size((array.shape[1], array.shape[0]), subject)
    return _to_rgb(Image.fromarray(np.ascontiguousarray(array)))
