"""An EfficientNet trunk split into frozen leading stages and trained upper stages.

Why: the ImageNet Lite trunks' first stages (stem + ``blocks[:5]`` of Lite0) hold generic
low-level filters that transfer as they are, and at training resolution they are most of the
trunk's cost: the activations are largest there and their backward is twice their forward. A
frozen prefix (weights fixed, BatchNorm statistics fixed: eval mode) is a pure function of the
image row, so it runs without autograd, through :class:`~clipdistill.models.frozen_stages.FrozenStages`
(ONNX Runtime on CPU), and each row's output is memoised; only the upper stages train. The LiT
teacher (models/lit.py) and a student with ``student.frozen_stages`` (models/openclip_model.py)
both split this way. timm has no such split, hence this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from clipdistill.models.encoding_memo import EncodingMemo, module_key, tensor_key


def is_efficientnet(trunk: nn.Module) -> bool:
    """Whether ``trunk`` is timm's EfficientNet family (the Lite trunks): stem, ``blocks``,
    ``conv_head``/``bn2``, pooled head: the layout :func:`upper_features` continues."""
    from timm.models.efficientnet import EfficientNet

    return isinstance(trunk, EfficientNet)


def leading_stages(trunk: nn.Module, stages: int, owner: str) -> list[nn.Module]:
    """The stem and the first ``stages`` blocks of ``trunk`` in forward order ([] for 0);
    ``owner`` names the setting in the error for a trunk without that many stages."""
    if stages < 0:
        raise ValueError(f"{owner} must be >= 0, got {stages}")
    if stages == 0:
        return []
    blocks = getattr(trunk, "blocks", None)
    if blocks is None or stages > len(blocks):
        found = "no blocks" if blocks is None else f"{len(blocks)} stages"
        raise ValueError(f"{owner} {stages}: the image trunk {type(trunk).__name__} has {found}")
    stem = [m for name in ("conv_stem", "bn1") if (m := getattr(trunk, name, None)) is not None]
    return [*stem, *blocks[:stages]]


def upper_features(trunk: nn.Module, features: torch.Tensor, stages: int) -> torch.Tensor:
    """The rest of an EfficientNet's ``forward_features`` after its stem and first ``stages``
    blocks: the remaining blocks and the head convolution (before pooling)."""
    for block in trunk.blocks[stages:]:
        features = block(features)
    return trunk.bn2(trunk.conv_head(features))


class FrozenPrefix:
    """Runs a trunk's frozen leading stages fast and, on request, memoised per row.

    The runner (:class:`FrozenStages`) is rebuilt whenever the frozen weights or the device
    change (e.g. after a checkpoint load); the memo is keyed by the weights too, so two models
    with the same frozen stages (every student that starts from the teacher's image tower)
    share their rows when they are handed one memo. On CPU the ONNX Runtime graph gives each
    row bit-for-bit the same output whatever else is in its batch (tested), so a memoised row
    equals a fresh one exactly."""

    def __init__(self, modules: list[nn.Module], name: str) -> None:
        self.modules = modules
        self.name = name
        self._runner: tuple[str, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave the runner behind (an ONNX Runtime session is neither); the
        copy builds its own on first use."""
        return {**self.__dict__, "_runner": None}

    def release(self) -> None:
        """Drop the runner (its ONNX Runtime session and that session's memory arena, about
        0.3 GB at 224 px) until the next call builds it again: for a caller that will not run the
        frozen stages for a while (teacher training, once its frozen bank is built)."""
        self._runner = None

    def key(self) -> str:
        """The frozen weights' identity (a hash of their parameters and buffers)."""
        return module_key(self.name, self.modules)

    def run(self, pixels: torch.Tensor, key: str | None = None) -> torch.Tensor:
        """The frozen stages on model-normalised ``pixels`` (no memo), channels-last."""
        from clipdistill.models.frozen_stages import FrozenStages

        weights = key or self.key()
        runner_key = f"{weights}@{pixels.device}"
        if self._runner is None or self._runner[0] != runner_key:
            self._runner = (runner_key, FrozenStages(self.modules, pixels.device))
        return self._runner[1](pixels)

    def memoised(self, pixels: torch.Tensor, memo: EncodingMemo, row_keys: list[bytes] | None = None) -> torch.Tensor:
        """:meth:`run`, each row computed once per weights in ``memo``. ``row_keys``: the rows'
        :func:`tensor_key`, when the caller already hashed them."""
        return stack_rows(self.memoised_rows(pixels, memo, row_keys), pixels.device)

    def memoised_rows(
        self, pixels: torch.Tensor, memo: EncodingMemo, row_keys: list[bytes] | None = None
    ) -> list[torch.Tensor]:
        """The memo's own row tensors (on the CPU) for ``pixels``: a caller that keeps many rows
        (the teacher's frozen bank) holds them once, with the memo, instead of a stacked copy."""
        weights = self.key()
        keys = row_keys if row_keys is not None else [tensor_key(row) for row in pixels]
        forward = lambda missing: self.run(pixels[missing], weights)  # noqa: E731
        return memoised_rows(memo, weights, keys, forward)


def stack_rows(rows: list[torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """Per-row (C, h, w) feature maps as one batch, channels-last (the trunk's layout), on
    ``device`` (None: where the rows are)."""
    batch = torch.stack(rows)
    return (batch if device is None else batch.to(device)).contiguous(memory_format=torch.channels_last)


def memoised_rows(
    memo: EncodingMemo, tower: str, keys: list[bytes], forward: Callable[[list[int]], torch.Tensor]
) -> list[torch.Tensor]:
    """The rows whose keys are ``keys``, from ``memo``'s rows of ``tower``: the memo's own
    tensors, stored on the CPU; ``forward(missing)`` computes the rows at those positions as one
    batch. Shared by the frozen prefix and the LiT teacher's whole-trunk memo."""

    def compute(missing: list[int]) -> list[torch.Tensor]:
        return [row.to("cpu").clone() for row in forward(missing)]

    return memo.tower(tower).fetch(keys, compute)
