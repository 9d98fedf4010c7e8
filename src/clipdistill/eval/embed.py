"""Embed a dataset split with any DualEncoder, batched, without gradients."""

from __future__ import annotations

import torch

from clipdistill.data.dataset import PairedDataset
from clipdistill.data.images import load_image_tensor, to_unit
from clipdistill.models.base import DualEncoder


@torch.inference_mode()
def embed_images(model: DualEncoder, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised image embeddings from a uint8 (N, 3, H, W) tensor."""
    device = next(model.parameters()).device
    chunks = [
        model.embed_images(to_unit(pixels[i : i + batch_size]).to(device)).float().cpu()
        for i in range(0, len(pixels), batch_size)
    ]
    return torch.cat(chunks) if chunks else torch.empty(0, model.embed_dim)


@torch.inference_mode()
def embed_texts(model: DualEncoder, texts: list[str], batch_size: int = 512) -> torch.Tensor:
    """L2-normalised text embeddings, in the order of ``texts``."""
    chunks = [model.embed_texts(texts[i : i + batch_size]).float().cpu() for i in range(0, len(texts), batch_size)]
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
    them into its own input size, so teacher and student see the same source pixels.
    """
    if model.training:
        raise RuntimeError("embed_split needs the model in eval mode (call model.eval())")
    if pixels is None:
        size = image_size or model.image_size[0]
        pixels = load_image_tensor(dataset.image_paths(), size, progress=progress)
    return embed_images(model, pixels), embed_texts(model, dataset.texts())
