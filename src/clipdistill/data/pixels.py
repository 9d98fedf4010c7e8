"""Where a training step's pixels come from: decoded once into memory, or decoded per batch.

The trainer asks for the uint8 images of a list of row indices, step after step. Two sources
answer with the same tensor for the same rows:

- :class:`PreloadedPixels` decodes the whole split once (``data.preload: true``, the default).
  Right for small sets (emoji: a few MB): no Pillow work per step.
- :class:`DecodingPixels` decodes only the rows a step uses (``data.preload: false``), in
  ``data.workers`` DataLoader worker processes that decode the next batches while the model
  trains on this one. Memory then does not grow with the data set (COCO at 224 px would be
  17 GB of uint8 per process preloaded), and under torchrun each process decodes only its own
  share of each batch rather than the whole split.

Both decode through :func:`~clipdistill.data.images.decode_uint8`, so a run gives the same pixels,
losses and checkpoints either way; the plan of which rows make each step stays the trainer's
(seeded by (seed, epoch)), which is what keeps resume exact. We use torch's DataLoader with an
explicit batch list instead of webdataset's streaming order for that reason: a stream's order
is not a function of the step number, a plan is.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from clipdistill.data.images import decode_uint8, load_image_tensor


class _DecodedImage(Dataset):  # type: ignore[type-arg]
    """Row ``i`` of ``paths`` decoded to uint8 (3, size, size); runs inside DataLoader workers."""

    def __init__(self, paths: Sequence[str | Path], size: int) -> None:
        self.paths = [str(p) for p in paths]  # plain strings pickle cheaply into workers
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return decode_uint8(self.paths[index], self.size)


def _stack(images: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(images)


class PreloadedPixels:
    """Every image of a split, decoded once; :meth:`batches` indexes the tensor."""

    def __init__(self, paths: Sequence[str | Path], size: int, *, progress: bool = False) -> None:
        self.pixels = load_image_tensor(paths, size, progress=progress)

    def __len__(self) -> int:
        return len(self.pixels)

    def batches(self, indices: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
        for index in indices:
            yield self.pixels[index]


class DecodingPixels:
    """Decodes each requested batch from the image files (or tar members) when it is needed.

    ``workers`` > 0 decodes in that many DataLoader processes, ``prefetch`` batches ahead per
    worker; 0 decodes in the calling process (no prefetch, no extra memory)."""

    def __init__(self, paths: Sequence[str | Path], size: int, *, workers: int = 0, prefetch: int = 2) -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.images = _DecodedImage(paths, size)
        self.workers = workers
        self.prefetch = prefetch

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, indices: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
        if not indices:
            return
        loader = DataLoader(
            self.images,
            batch_sampler=[index.tolist() for index in indices],
            num_workers=self.workers,
            collate_fn=_stack,
            prefetch_factor=self.prefetch if self.workers else None,
            persistent_workers=False,
        )
        yield from loader


PixelSource = PreloadedPixels | DecodingPixels


def pixel_source(
    paths: Sequence[str | Path], size: int, *, preload: bool, workers: int = 0, progress: bool = False
) -> PixelSource:
    """The source ``data.preload`` / ``data.workers`` ask for."""
    if preload:
        return PreloadedPixels(paths, size, progress=progress)
    return DecodingPixels(paths, size, workers=workers)


def chunked(count: int, size: int) -> list[torch.Tensor]:
    """Row indices 0..count-1 in consecutive chunks of ``size`` (evaluation's batches)."""
    return [torch.arange(start, min(start + size, count)) for start in range(0, count, size)]
