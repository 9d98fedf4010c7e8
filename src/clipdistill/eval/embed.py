"""Embed a dataset split with any DualEncoder, batched, without gradients."""

from __future__ import annotations

from typing import Any

import torch

from clipdistill.data.dataset import PairedDataset
from clipdistill.data.images import to_unit
from clipdistill.data.pixels import DecodingPixels, PixelSource, chunked
from clipdistill.models.base import DualEncoder

# Images decoded at once by embed_image_source (1024 x 3 x 224 x 224 bytes = 154 MB at most).
DECODE_CHUNK = 1024


@torch.inference_mode()
def embed_images(model: DualEncoder, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised image embeddings from a uint8 (N, 3, H, W) tensor."""
    device = next(model.parameters()).device
    chunks = [
        model.embed_images(to_unit(pixels[i : i + batch_size]).to(device)).float().cpu()
        for i in range(0, len(pixels), batch_size)
    ]
    return torch.cat(chunks) if chunks else torch.empty(0, model.embed_dim)


def progress_bar(total: int, desc: str, unit: str, enabled: bool) -> Any:
    """A tqdm bar on stderr (what ``train --progress`` shows), or ``None``."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False)


@torch.inference_mode()
def embed_texts(model: DualEncoder, texts: list[str], batch_size: int = 512, *, progress: bool = False) -> torch.Tensor:
    """L2-normalised text embeddings, in the order of ``texts``."""
    bar = progress_bar(len(texts), "embed captions", "caption", progress)
    chunks = []
    for i in range(0, len(texts), batch_size):
        chunks.append(model.embed_texts(texts[i : i + batch_size]).float().cpu())
        if bar is not None:
            bar.update(len(chunks[-1]))
    if bar is not None:
        bar.close()
    return torch.cat(chunks) if chunks else torch.empty(0, model.embed_dim)


def embed_split(
    model: DualEncoder,
    dataset: PairedDataset,
    *,
    image_size: int | None = None,
    pixels: torch.Tensor | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image_emb, text_emb) of a dataset; ``pixels`` reuses already-decoded images.

    Images are decoded at ``image_size`` (default: the model's own) and each model resizes
    them into its own input size, so teacher and student see the same source pixels. Without
    ``pixels`` they are decoded and embedded :data:`DECODE_CHUNK` at a time, so memory stays
    flat whatever the split's size (COCO's 123K images at 224 px are 18.5 GB decoded); the
    embeddings are the same as from the whole split decoded at once.
    """
    if model.training:
        raise RuntimeError("embed_split needs the model in eval mode (call model.eval())")
    texts = embed_texts(model, dataset.texts(), progress=progress)
    if pixels is not None:
        return embed_images(model, pixels), texts
    source = DecodingPixels(dataset.image_paths(), image_size or model.image_size[0])
    return embed_image_source(model, source, progress=progress), texts


def embed_image_source(model: DualEncoder, source: PixelSource, *, progress: bool = False) -> torch.Tensor:
    """L2-normalised embeddings of every image of a pixel source, taken :data:`DECODE_CHUNK` at a
    time (a multiple of :func:`embed_images`' batch, so the result equals embedding them all at once)."""
    chunks = chunked(len(source), DECODE_CHUNK)
    bar = progress_bar(len(source), "embed images", "img", progress)
    embedded = []
    for batch in source.batches(chunks):
        embedded.append(embed_images(model, batch))
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return torch.cat(embedded) if embedded else torch.empty(0, model.embed_dim)
