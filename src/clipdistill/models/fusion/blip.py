"""BLIP image-text matching as a fusion backend (``blip-itm:ID``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipdistill.models.fusion.base import FusionBackend, FusionError, FusionStates, _prepare_pixels
from clipdistill.models.spec import ModelSpecError


class BlipItmBackend(FusionBackend):
    """``blip-itm:ID_OR_PATH`` through transformers' ``BlipForImageTextRetrieval``.

    States: the ViT's last hidden state (patch embeddings + [CLS]) and the caption's token ids.
    Pair head: BLIP's text encoder with cross-attention to the image embeddings and its ITM
    head, exactly ``BlipForImageTextRetrieval.forward(use_itm_head=True)`` split at the image
    embeddings. Dual stage: BLIP's ITC embeddings (``vision_proj``/``text_proj`` of the [CLS]
    states), as BLIP itself retrieves with ITC and re-ranks with ITM.

    Cost: a pair runs BLIP's whole text encoder (12 layers for blip-itm-base), so use it on a
    GPU and prefer MCAD's ``fusion_pairs: topk``; its image states are the ViT's full token
    sequence (577 × 768 floats, about 1.8 MB per image at 384 px), so a teacher cache holding
    them suits datasets of thousands of images, not millions."""

    kind = "blip-itm"

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        image_size: tuple[int, int],
        image_mean: Sequence[float],
        image_std: Sequence[float],
        max_length: int = 35,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.image_mean = tuple(float(x) for x in image_mean)
        self.image_std = tuple(float(x) for x in image_std)
        self.max_length = max_length
        self.global_dim = int(model.config.image_text_hidden_size)

    def image_states(self, unit_pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = _prepare_pixels(unit_pixels, self.image_size, self.image_mean, self.image_std)
        embeds = self.model.vision_model(pixel_values=pixels).last_hidden_state
        return embeds, F.normalize(self.model.vision_proj(embeds[:, 0, :]), dim=-1)

    def text_states(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        device = next(self.model.parameters()).device
        encoded = self.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        ids = encoded["input_ids"].to(device)
        mask = encoded["attention_mask"].to(device)
        hidden = self.model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return ids, mask.bool(), F.normalize(self.model.text_proj(hidden[:, 0, :]), dim=-1)

    def pair_forward(
        self, prepared: FusionStates, image_index: torch.Tensor, text_index: torch.Tensor, with_pooled: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # BLIP's logit needs its pooled feature: always given
        image = prepared.image[image_index]
        mask = prepared.text_mask[text_index]
        longest = max(1, int(mask.sum(dim=1).max()))
        hidden = self.model.text_encoder(
            input_ids=prepared.text[text_index][:, :longest],
            attention_mask=mask[:, :longest].long(),
            encoder_hidden_states=image,
            encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long, device=image.device),
        ).last_hidden_state[:, 0, :]
        logits = self.model.itm_head(hidden)
        return logits[:, 1] - logits[:, 0], hidden


def load_blip_itm(name: str) -> BlipItmBackend:
    """A BLIP ITM model, tokenizer and image preprocessing from a hub id or a local folder."""
    try:
        from transformers import AutoTokenizer, BlipForImageTextRetrieval, BlipImageProcessor
    except ImportError as error:  # pragma: no cover - transformers is a dependency
        raise FusionError(f"blip-itm:{name} needs transformers with BLIP ({error})") from error
    try:
        model = BlipForImageTextRetrieval.from_pretrained(name)
        tokenizer = AutoTokenizer.from_pretrained(name)
        processor = BlipImageProcessor.from_pretrained(name)
    except OSError as error:
        raise ModelSpecError(
            f"blip-itm:{name}: cannot load a BLIP ITM model, tokenizer and image processor ({error})"
        ) from error
    size = processor.size
    height, width = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
    return BlipItmBackend(model, tokenizer, (int(height), int(width)), processor.image_mean, processor.image_std)
