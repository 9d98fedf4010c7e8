"""Decode a dataset's images once into one uint8 tensor kept in memory.

Small datasets (emoji: ~3,600 images of 64x64) fit in a few MB, and decoding PNGs every step
would make training bound by Pillow rather than by the model. Transparent images are put on
white (emoji glyphs are RGBA), greyscale/CMYK/palette images are converted to RGB.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from clipdistill.data.dataset import DatasetError


def decode_rgb(source: Any, name: str) -> Image.Image:
    """Decode a file path or file object as RGB (alpha composited on white); errors name ``name``."""
    try:
        with Image.open(source) as image:
            image.load()
            if image.mode in ("RGBA", "LA", "P", "PA"):
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                rgb = Image.alpha_composite(background, rgba).convert("RGB")
            else:
                rgb = image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DatasetError(f"cannot decode image {name}: {error}") from error
    return rgb


def open_rgb(path: str | Path, size: int | tuple[int, int] | None = None) -> Image.Image:
    """Open an image as RGB (alpha composited on white), optionally resized (bicubic). A path
    ``SHARD.tar/MEMBER`` (webdataset reader) is read from inside the tar."""
    source: Any = path
    if not Path(path).exists():
        from clipdistill.data.wds import read_member

        data = read_member(path)
        if data is not None:
            source = io.BytesIO(data)
    rgb = decode_rgb(source, str(path))
    if size is not None:
        target = (size, size) if isinstance(size, int) else (size[1], size[0])
        if rgb.size != target:
            rgb = rgb.resize(target, Image.Resampling.BICUBIC)
    return rgb


def load_image_tensor(paths: Sequence[str | Path], size: int, progress: bool = False) -> torch.Tensor:
    """All images as one (N, 3, size, size) uint8 tensor, in the order of ``paths``."""
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    iterator: Sequence[str | Path] = paths
    if progress:
        from tqdm import tqdm

        iterator = tqdm(paths, desc="decode images", unit="img", leave=False)
    for index, path in enumerate(iterator):
        array = np.array(open_rgb(path, size), dtype=np.uint8)  # a writable copy for torch
        out[index] = torch.from_numpy(array).permute(2, 0, 1)
    return out


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [0, 1] (the 'unit pixels' every model prepares itself)."""
    return pixels.float().div_(255.0)
