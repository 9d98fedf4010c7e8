"""A transformers ``CLIPModel`` (``hf:openai/clip-vit-base-patch32`` or a saved folder) as a
:class:`DualEncoder`, for teachers that exist only in the Hugging Face format."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from clipdistill.models.base import DualEncoder


class HFCLIPDualEncoder(DualEncoder):
    """``CLIPModel`` + its tokenizer; mean/std/size from its image processor when saved."""

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any | None, spec: str = "") -> None:
        super().__init__()
        self.model = model
        self._tokenizer = tokenizer
        self.spec = spec
        vision = model.config.vision_config
        self.image_size = (int(vision.image_size), int(vision.image_size))
        mean = getattr(image_processor, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)
        std = getattr(image_processor, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)
        self.image_mean = tuple(float(v) for v in mean)
        self.image_std = tuple(float(v) for v in std)
        self.embed_dim = int(model.config.projection_dim)
        self.context_length = min(int(model.config.text_config.max_position_embeddings), 77)

    @staticmethod
    def _pooled(output: Any) -> torch.Tensor:
        # transformers 4.x returns the projected tensor; 5.x may return a model output object.
        if isinstance(output, torch.Tensor):
            return output
        return output.pooler_output

    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._pooled(self.model.get_image_features(pixel_values=pixels))

    def _encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        pad = self._tokenizer.pad_token_id
        mask = (tokens != pad).long() if pad is not None else torch.ones_like(tokens)
        return self._pooled(self.model.get_text_features(input_ids=tokens, attention_mask=mask))

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        encoded = self._tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt"
        )
        return encoded["input_ids"].long()

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    def is_image_parameter(self, name: str) -> bool:
        return name.startswith(("model.vision_model.", "model.visual_projection."))


def load_hf_clip(identifier: str, *, spec: str) -> HFCLIPDualEncoder:
    """Load a saved folder or a hub id. A hub id that is not cached while the hub is out of
    reach fails in seconds with the one-line error (models/hub.py says why), and a cached one
    then loads without a request."""
    from pathlib import Path

    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    from clipdistill.models.hub import cached_hub_file, cannot_fetch, hub_cache, hub_offline, hub_unreachable

    local = "hf:/path/to/folder (a folder written by CLIPModel.save_pretrained, with its tokenizer)"
    offline = False
    if not Path(identifier).is_dir():
        unreachable = hub_unreachable()
        if unreachable is not None:
            if not cached_hub_file(identifier, ["config.json"]):
                raise cannot_fetch(spec, f"model {identifier!r}", hub_cache(), unreachable, local)
            offline = True
    with hub_offline(offline):
        try:
            model = CLIPModel.from_pretrained(identifier)
            tokenizer = AutoTokenizer.from_pretrained(identifier)
        except OSError as error:  # transformers' way of saying "not cached and cannot be downloaded"
            if Path(identifier).is_dir():
                raise  # a local folder: its own error (a missing file in it) is the useful one
            raise cannot_fetch(spec, f"model {identifier!r}", hub_cache(), error, local) from None
        try:
            processor = AutoImageProcessor.from_pretrained(identifier)
        except (OSError, ValueError):
            processor = None  # a folder saved without a processor: CLIP's own defaults apply
    return HFCLIPDualEncoder(model, tokenizer, processor, spec=spec)
