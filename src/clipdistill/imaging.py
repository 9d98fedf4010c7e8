"""The one image decoder: training, the teacher cache, ``clipdistill embed`` and the service.

A model sees the pixels this module gives it, so training and serving must agree on them
bit for bit: if the service decoded a 16-bit PNG differently from training (Pillow's plain
``convert`` clips 16-bit values to white), a query would be embedded from pixels the student
never saw. Hence one function, torch-free (the service imports it without torch), with these rules:

- EXIF orientation is applied (``ImageOps.exif_transpose``): a phone photo stored sideways
  with an orientation tag is seen upright, as every viewer shows it.
- 16-bit integer images (``I;16*``, ``I``) are scaled by value range (``v / 65535``), float
  images (``F``) from [0, 1] when their maximum is <= 1, else from [0, 255]; NaN reads as 0 and
  values out of range are clipped.
- Transparency (an alpha band, or a palette/colour ``transparency`` entry) is composited on white
  (emoji glyphs are RGBA); every other mode (CMYK, YCbCr, LAB, palette, 1-bit, ...) goes
  through Pillow's own conversion to RGB.

:func:`decode_rgb` catches every exception raised while decoding: Pillow's plugins raise more
than ``OSError`` on malformed files (fuzzing found ``TypeError`` from TIFF/IM and
``NotImplementedError`` from DDS), and a bad file must be an error naming it, never a crash.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageOps

__all__ = ["ImageDecodeError", "decode_rgb", "describe_error", "rgb_of"]

_ALPHA_MODES = frozenset({"RGBA", "LA", "La", "RGBa", "P", "PA"})


class ImageDecodeError(ValueError):
    """An image that cannot be decoded; the message names it and says why."""


def describe_error(error: BaseException) -> str:
    """``message (Type)``: a message alone ("unpack_from requires ...") does not say what broke."""
    text = str(error).strip()
    return f"{text} ({type(error).__name__})" if text else type(error).__name__


def _scale_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and float single-band images to 8 bits by value range, not by clipping."""
    array = np.asarray(image, dtype=np.float64)
    top = 65535.0  # 16/32-bit integer modes
    if image.mode == "F":
        finite = array[np.isfinite(array)]
        top = 1.0 if finite.size == 0 or float(finite.max()) <= 1.0 else 255.0
    scaled = np.nan_to_num(array, nan=0.0, posinf=top, neginf=0.0) / top * 255.0 + 0.5
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), "L")


def rgb_of(image: Image.Image) -> Image.Image:
    """A decoded (loaded) PIL image as upright 8-bit RGB, by the rules in the module docstring."""
    image = ImageOps.exif_transpose(image)  # a copy; the same pixels when there is no orientation tag
    mode = image.mode
    if mode == "I" or mode == "F" or mode.startswith("I;"):
        return _scale_to_8bit(image).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_rgb(source: Any, name: str) -> Image.Image:
    """Decode a path or binary file object to RGB (:func:`rgb_of`); any failure is an
    :class:`ImageDecodeError` naming ``name`` with the exception's type and message.

    Pillow's decompression-bomb limit applies (``Image.MAX_IMAGE_PIXELS``); callers that want
    a lower pixel cap check ``Image.open(...).size`` before calling this."""
    try:
        with Image.open(source) as image:
            image.load()
            return rgb_of(image)
    except Exception as error:  # any decoder failure is this file's problem (see module doc)
        raise ImageDecodeError(f"cannot decode image {name}: {describe_error(error)}") from error
