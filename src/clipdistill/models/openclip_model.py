"""open_clip models (zoo names, ``hf-hub:``, ``local-dir:`` folders) as :class:`DualEncoder`.

Students are open_clip models too, so this one adapter serves both sides of distillation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from clipdistill.models.base import DualEncoder


def _as_pair(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    height, width = tuple(size)[-2:]
    return (int(height), int(width))


class OpenCLIPDualEncoder(DualEncoder):
    """Wraps an ``open_clip`` CLIP/CustomTextCLIP with its tokenizer and preprocessing config."""

    def __init__(self, model: nn.Module, tokenizer: Any, spec: str = "") -> None:
        super().__init__()
        import open_clip

        self.model = model
        self._tokenizer = tokenizer
        self.spec = spec
        preprocess = open_clip.get_model_preprocess_cfg(model)
        self.image_size = _as_pair(preprocess.get("size", 224))
        self.image_mean = tuple(float(v) for v in preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.image_std = tuple(float(v) for v in preprocess.get("std", open_clip.OPENAI_DATASET_STD))
        with torch.no_grad():
            probe = self._encode_text(self.tokenize(["a probe caption"]))
        self.embed_dim = int(probe.shape[-1])

    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels, normalize=False)

    def _encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=False)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self._tokenizer(list(texts)).long()

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    def is_image_parameter(self, name: str) -> bool:
        return name.startswith("model.visual.")

    @property
    def context_length(self) -> int:
        return int(getattr(self._tokenizer, "context_length", 77))


def load_openclip(model_name: str, pretrained: str | None, *, load_weights: bool, spec: str) -> OpenCLIPDualEncoder:
    """Build through open_clip's own factory so any open_clip checkpoint loads unchanged."""
    import open_clip

    model = open_clip.create_model(model_name, pretrained=pretrained, load_weights=load_weights)
    tokenizer = open_clip.get_tokenizer(model_name)
    return OpenCLIPDualEncoder(model, tokenizer, spec=spec)
