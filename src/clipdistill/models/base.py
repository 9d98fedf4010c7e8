"""The dual-encoder interface every teacher and student exposes.

Everything downstream (distillation methods, the teacher cache, evaluation, export) talks to
a :class:`DualEncoder`, never to open_clip, transformers or our LiT model directly. The data
pipeline hands out *unit pixels* (float in [0, 1], the dataset's own size) and raw caption
strings; each model re-normalises the pixels into its own mean/std and size and tokenises the
captions with its own tokenizer. That is what lets a student learn from a teacher with a
different preprocessing and vocabulary (open_clip's distillation assumes they are equal).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class TowerView(nn.Module):
    """One tower of a dual encoder as its own module: ``forward`` encodes and L2-normalises.

    It registers the tower's parameters (shared, not copied) so ``parameters()`` counts only
    that tower, while the parent model is held outside the module tree so it is neither
    counted twice nor exported twice. Export (ONNX) and efficiency counting both use it.
    """

    def __init__(self, parent: DualEncoder, which: str, params: dict[str, nn.Parameter]) -> None:
        super().__init__()
        if which not in ("image", "text"):
            raise ValueError(f"tower must be 'image' or 'text', got {which!r}")
        object.__setattr__(self, "_parent", parent)  # not a submodule on purpose
        self.which = which
        self.shared = nn.ParameterDict({name.replace(".", "__"): p for name, p in params.items()})

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        parent: DualEncoder = self._parent  # type: ignore[assignment]
        return parent.encode_image(inputs) if self.which == "image" else parent.encode_text(inputs)


class DualEncoder(nn.Module):
    """Abstract dual encoder: ``encode_image``, ``encode_text``, ``logit_scale``, ``tokenize``.

    Subclasses set ``image_size`` (H, W), ``image_mean``/``image_std`` (per channel) and
    ``embed_dim``, and implement :meth:`_encode_image`, :meth:`_encode_text` and
    :meth:`tokenize`. ``spec`` is the model spec string it was loaded from (for manifests).
    """

    image_size: tuple[int, int]
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    embed_dim: int
    spec: str = ""
    # Whether the image tower runs at any input size (a convolutional trunk ending in global
    # pooling): a ViT's position embeddings fix its size, so such a model keeps this False.
    resizable_image_input: bool = False

    # --- to implement -------------------------------------------------------------------
    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings from model-normalised pixels (B, 3, H, W)."""
        raise NotImplementedError

    def _encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Unnormalised text embeddings from token ids (B, L)."""
        raise NotImplementedError

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids (B, L) int64 with this model's own tokenizer and context length."""
        raise NotImplementedError

    @property
    def logit_scale(self) -> torch.Tensor:
        """Log of the contrastive temperature's inverse (CLIP convention: κ = exp(logit_scale))."""
        raise NotImplementedError

    # --- shared behaviour -----------------------------------------------------------------
    def at_image_size(self, size: int) -> DualEncoder:
        """This model, reading its images at ``size`` px from now on (returned for chaining).

        The cheapest alternative to distilling is the teacher itself at a smaller input, without
        retraining: the report's frontier measures it. Refused for a tower whose size is fixed."""
        if not self.resizable_image_input:
            raise ValueError(
                f"{type(self).__name__} ({self.spec or 'no spec'}) has a fixed input size "
                f"{self.image_size[0]}x{self.image_size[1]}; it cannot run at {size} px"
            )
        if size < 32:
            raise ValueError(f"image size must be >= 32 px, got {size}")
        self.image_size = (size, size)
        return self

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self._encode_image(pixels)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self._encode_text(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def prepare_pixels(self, unit_pixels: torch.Tensor) -> torch.Tensor:
        """Resize unit pixels (B, 3, h, w) in [0, 1] to this model's size and normalise them."""
        if tuple(unit_pixels.shape[-2:]) != tuple(self.image_size):
            unit_pixels = F.interpolate(
                unit_pixels, size=self.image_size, mode="bicubic", align_corners=False, antialias=True
            ).clamp_(0.0, 1.0)
        mean = torch.tensor(self.image_mean, dtype=unit_pixels.dtype, device=unit_pixels.device)
        std = torch.tensor(self.image_std, dtype=unit_pixels.dtype, device=unit_pixels.device)
        return (unit_pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)

    def embed_images(self, unit_pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings straight from unit pixels."""
        return self.encode_image(self.prepare_pixels(unit_pixels))

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised embeddings straight from caption strings."""
        device = next(self.parameters()).device
        return self.encode_text(self.tokenize(texts).to(device))

    def is_image_parameter(self, name: str) -> bool:
        """Whether the named parameter belongs to the image tower (else text, or shared)."""
        raise NotImplementedError

    def _tower_params(self, image: bool) -> dict[str, nn.Parameter]:
        return {
            name: param
            for name, param in self.named_parameters()
            if "logit_" not in name and self.is_image_parameter(name) == image
        }

    def image_tower(self) -> TowerView:
        """The image tower as a module: pixels (model-normalised) -> unit embeddings."""
        return TowerView(self, "image", self._tower_params(image=True))

    def text_tower(self) -> TowerView:
        """The text tower as a module: token ids -> unit embeddings."""
        return TowerView(self, "text", self._tower_params(image=False))


class FrozenTeacher(nn.Module):
    """Wraps a :class:`DualEncoder` so it stays frozen and in eval mode.

    ``train(True)`` on a parent module (a distillation method) must never switch the teacher's
    dropout or batch-norm into training mode, so :meth:`train` is pinned to eval here, and
    every call runs under ``torch.no_grad`` so no autograd graph is built for it.
    """

    def __init__(self, model: DualEncoder) -> None:
        super().__init__()
        self.model = model
        model.eval()
        model.requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        super().train(False)
        self.model.eval()
        return self

    @property
    def spec(self) -> str:
        return self.model.spec

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.detach()

    @torch.no_grad()
    def embed_images(self, unit_pixels: torch.Tensor) -> torch.Tensor:
        return self.model.embed_images(unit_pixels)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.model.embed_texts(texts)


def load_trained_weights(
    module: nn.Module, path: Path, frozen_prefix: str, error: type[Exception] = ValueError
) -> None:
    """Load a safetensors file that holds only ``module``'s trained parameters.

    Saved teachers leave out the frozen tower they wrap (MiniLM for the LiT teacher, the dual
    teacher for a fusion head), which comes from its own source; every other key must match
    exactly, else ``error`` names the file and the first missing or unexpected keys."""
    from safetensors.torch import load_file

    missing, unexpected = module.load_state_dict(load_file(str(path)), strict=False)
    missing = [key for key in missing if not key.startswith(frozen_prefix)]
    if missing or unexpected:
        raise error(f"{path}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
