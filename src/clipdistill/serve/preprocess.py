"""Torch-free image preprocessing for serving, matching what the index was embedded with.

Training and ``clipdistill embed`` decode an image with the one decoder
(:mod:`clipdistill.imaging`: EXIF orientation, 16-bit/float scaling, alpha composited on white)
resized bicubically to the model's input size, then subtract the mean and divide by the std.
This module does exactly that with Pillow and numpy, calling the same decoder, so a query
image and an indexed image go through the same pixels path without torch.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clipdistill import imaging

PREPROCESS_CONFIG = "preprocess_config.json"
ImageInput = Image.Image | bytes | str | Path


class ImageInputError(ValueError):
    """An image that cannot be decoded (not an image, truncated, unsupported format)."""


def to_rgb(image: Image.Image) -> Image.Image:
    """A decoded PIL image as RGB by the one decoder's rules (:func:`clipdistill.imaging.rgb_of`);
    a failure of the conversion (a malformed EXIF block, an unconvertible mode) is an
    :class:`ImageInputError`."""
    try:
        return imaging.rgb_of(image)
    except Exception as error:  # any failure here is the image's fault, see clipdistill.imaging
        raise ImageInputError(f"cannot decode image: {imaging.describe_error(error)}") from error


def open_image(image: ImageInput) -> Image.Image:
    """A PIL image, encoded bytes or a path, decoded to RGB."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    source: Any = io.BytesIO(image) if isinstance(image, bytes) else image
    if isinstance(image, str | Path) and not Path(image).exists():
        from clipdistill.data.members import read_member  # SHARD.tar/MEMBER: an image inside a webdataset shard

        member = read_member(image)
        source = source if member is None else io.BytesIO(member)
    name = "(uploaded bytes)" if isinstance(image, bytes) else str(image)
    try:
        return imaging.decode_rgb(source, name)
    except imaging.ImageDecodeError as error:
        raise ImageInputError(str(error)) from error


@dataclass(frozen=True)
class ImagePreprocessor:
    """Resize to (height, width) bicubic, scale to [0, 1], normalise per channel -> (3, H, W)."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_dir(cls, directory: str | Path) -> ImagePreprocessor:
        raw = json.loads((Path(directory) / PREPROCESS_CONFIG).read_text(encoding="utf-8"))
        return cls(size=tuple(raw["image_size"]), mean=tuple(raw["mean"]), std=tuple(raw["std"]))  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_size": list(self.size),
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": "bicubic (Pillow) to image_size",
            "transparency": "composited on white",
            "layout": "NCHW float32, (pixel / 255 - mean) / std",
        }

    def unit_pixels(self, image: ImageInput) -> np.ndarray:
        """(3, H, W) float32 in [0, 1]."""
        rgb = open_image(image)
        height, width = self.size
        if rgb.size != (width, height):
            rgb = rgb.resize((width, height), Image.Resampling.BICUBIC)
        return np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)

    def normalise(self, unit: np.ndarray) -> np.ndarray:
        mean = np.asarray(self.mean, dtype=np.float32).reshape(-1, 3, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(-1, 3, 1, 1)
        return ((unit - mean) / std).astype(np.float32)

    def __call__(self, images: Sequence[ImageInput]) -> np.ndarray:
        """(B, 3, H, W) model-normalised pixels."""
        if not images:
            return np.zeros((0, 3, *self.size), dtype=np.float32)
        return self.normalise(np.stack([self.unit_pixels(image) for image in images]))
