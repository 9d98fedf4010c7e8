"""Decode a dataset's images once into one uint8 tensor kept in memory.

Small datasets (emoji: ~3,600 images of 64x64) fit in a few MB, and decoding PNGs every step
would make training bound by Pillow rather than by the model. Pixels come from the one decoder
the service uses too (:mod:`clipdistill.imaging`: EXIF orientation applied, transparency on
white, 16-bit or float images scaled to 8 bits, every other mode converted to RGB).

:func:`image_problem` is the up-front check ``load_dataset`` runs on every file, so a file that
will not decode is found before any work, not mid-epoch.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from clipdistill import imaging
from clipdistill.data.errors import DatasetError

MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # Pillow's decompression-bomb limit (~9.5K x 9.5K)


def image_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be used as an image (missing, empty, not an image, truncated, a
    decompression bomb), or ``None`` when it decodes. Any exception while decoding is a
    problem named with its type and message, never a crash of the check. JPEGs decode at 1/8
    scale: every byte of the entropy-coded data is still read, so truncation is caught, at a
    fraction of the cost."""
    path = Path(path)
    source: Any = path
    try:
        size = path.stat().st_size
    except (FileNotFoundError, NotADirectoryError) as error:
        from clipdistill.data.members import read_member

        member = read_member(path)  # SHARD.tar/MEMBER (webdataset reader): check the member's bytes
        if member is None:
            return "file does not exist" if isinstance(error, FileNotFoundError) else "cannot be read: not a directory"
        source, size = io.BytesIO(member), len(member)
    except OSError as error:
        return f"cannot be read: {error.strerror or error}"
    if source is path and not path.is_file():
        return "is not a file"
    if size == 0:
        return "is an empty (zero-byte) file"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                width, height = image.size
                if width * height > MAX_PIXELS:
                    return f"is {width}x{height} pixels, over the {MAX_PIXELS:,}-pixel limit (decompression bomb?)"
                if image.format == "JPEG":
                    image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                image.load()
                imaging.rgb_of(image)  # the conversion training will do (EXIF, mode) must work too
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        return f"is too large to decode safely: {error}"
    except Exception as error:  # Pillow's plugins raise far more than OSError on bad bytes
        return f"cannot be decoded: {imaging.describe_error(error)}"
    return None


def decode_rgb(source: Any, name: str) -> Image.Image:
    """Decode a file path or file object as RGB with the one decoder (:func:`clipdistill.imaging.decode_rgb`:
    EXIF orientation applied, 16-bit/float scaled, alpha on white); errors name ``name``."""
    try:
        return imaging.decode_rgb(source, name)
    except imaging.ImageDecodeError as error:
        raise DatasetError(str(error)) from error


def open_rgb(path: str | Path, size: int | tuple[int, int] | None = None) -> Image.Image:
    """Open an image as RGB (alpha composited on white), optionally resized (bicubic). A path
    ``SHARD.tar/MEMBER`` (webdataset reader) is read from inside the tar."""
    source: Any = path
    if not Path(path).exists():
        from clipdistill.data.members import read_member

        data = read_member(path)
        if data is not None:
            source = io.BytesIO(data)
    rgb = decode_rgb(source, str(path))
    if size is not None:
        target = (size, size) if isinstance(size, int) else (size[1], size[0])
        if rgb.size != target:
            rgb = rgb.resize(target, Image.Resampling.BICUBIC)
    return rgb


def decode_uint8(path: str | Path, size: int) -> torch.Tensor:
    """One image as a uint8 (3, size, size) tensor: the one decoding every pixel source uses,
    so images decoded one batch at a time equal those of a whole split decoded at once."""
    array = np.array(open_rgb(path, size), dtype=np.uint8)  # a writable copy for torch
    return torch.from_numpy(array).permute(2, 0, 1)


def load_image_tensor(paths: Sequence[str | Path], size: int, progress: bool = False) -> torch.Tensor:
    """All images as one (N, 3, size, size) uint8 tensor, in the order of ``paths``."""
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    iterator: Sequence[str | Path] = paths
    if progress:
        from tqdm import tqdm

        iterator = tqdm(paths, desc="decode images", unit="img", leave=False)
    for index, path in enumerate(iterator):
        out[index] = decode_uint8(path, size)
    return out


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [0, 1] (the 'unit pixels' every model prepares itself)."""
    return pixels.float().div_(255.0)
