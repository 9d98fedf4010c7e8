"""The fusion-teacher interface: per-item states, the backend contract, pair scoring, the frozen wrapper.

See :mod:`clipdistill.models.fusion` for how a backend splits its work into per-item states
(cacheable) and a pair head (run per pair on the states).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipdistill.models.encoding_memo import EncodingMemo, module_key, tensor_key, usable_memo

#: Pairs scored per forward of the pair head: bounds the (pairs × tokens × width) scratch.
PAIR_CHUNK = 4096
#: A pair set covering at least this share of all images × captions is scored as a full grid
#: (broadcast, no per-pair gathers) and read off it: cheaper than gathering each pair's tokens.
DENSE_FRACTION = 0.25


class FusionError(ValueError):
    """A fusion teacher that cannot be built, loaded or used as asked."""


# --- per-item states ---------------------------------------------------------------------------
@dataclass
class FusionStates:
    """Per-item inputs of a fusion teacher's pair head for a set of images and captions.

    ``image`` (B_i, N, ...) and ``text`` (B_t, L, ...) are the backend's token states (float
    features, or token ids for BLIP), ``text_mask`` (B_t, L) marks real caption tokens (text is
    padded with zeros to the longest caption of the set), ``*_global`` are unit embeddings of the
    backend's dual stage. Nothing here depends on how images and captions are paired."""

    image: torch.Tensor
    image_global: torch.Tensor
    text: torch.Tensor
    text_mask: torch.Tensor
    text_global: torch.Tensor

    @property
    def n_images(self) -> int:
        return int(self.image.shape[0])

    @property
    def n_texts(self) -> int:
        return int(self.text.shape[0])

    def to(self, device: str | torch.device) -> FusionStates:
        return FusionStates(*(getattr(self, f.name).to(device) for f in fields(self)))


def pad_texts(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length caption states (L_j, ...) into (B, L_max, ...) zero-padded + mask."""
    if not rows:
        raise ValueError("no caption states to pad")
    longest = max(int(row.shape[0]) for row in rows)
    out = rows[0].new_zeros((len(rows), longest, *rows[0].shape[1:]))
    mask = torch.zeros((len(rows), longest), dtype=torch.bool, device=rows[0].device)
    for index, row in enumerate(rows):
        out[index, : row.shape[0]] = row
        mask[index, : row.shape[0]] = True
    return out, mask


def unpad_texts(text: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Inverse of :func:`pad_texts`: each caption's real token states (masks are prefixes)."""
    lengths = mask.sum(dim=1).tolist()
    return [text[index, : int(length)] for index, length in enumerate(lengths)]


def _prepare_pixels(
    unit_pixels: torch.Tensor, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Resize unit pixels to ``size`` and normalise (the same recipe as ``DualEncoder.prepare_pixels``)."""
    if tuple(unit_pixels.shape[-2:]) != tuple(size):
        unit_pixels = F.interpolate(unit_pixels, size=size, mode="bicubic", align_corners=False, antialias=True)
        unit_pixels = unit_pixels.clamp(0.0, 1.0)
    mean_t = torch.tensor(mean, dtype=unit_pixels.dtype, device=unit_pixels.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=unit_pixels.dtype, device=unit_pixels.device).view(1, 3, 1, 1)
    return (unit_pixels - mean_t) / std_t


# --- the backend interface ---------------------------------------------------------------------
class FusionBackend(nn.Module):
    """What a fusion backend implements. ``pooled_dim`` is the dim of its heads into a dual
    teacher's space (``None``: it has none); ``dual_spec`` names that teacher."""

    kind: str = ""
    global_dim: int
    pooled_dim: int | None = None
    dual_spec: str | None = None
    dual_fingerprint: str | None = None

    def image_states(self, unit_pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens (B, N, ...), unit global embedding (B, G))`` from unit pixels."""
        raise NotImplementedError

    def text_states(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(tokens (B, L, ...), mask (B, L) bool, unit global embedding (B, G))``."""
        raise NotImplementedError

    def prepare_pairs(self, states: FusionStates, with_pooled: bool = True) -> Any:
        """Per-item work of the pair head, done once for all pairs of a call (``with_pooled``:
        whether the pairs' pooled features will be asked for, as in :meth:`pair_forward`)."""
        return states

    def pair_forward(
        self, prepared: Any, image_index: torch.Tensor, text_index: torch.Tensor, with_pooled: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(match logits (P,), pooled pair features (P, d))`` for pairs (image_index[p], text_index[p]).
        With ``with_pooled=False`` a backend may skip the pooled features (and give ``None``)."""
        raise NotImplementedError

    def dual_heads(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(g(f), h(f))``: pooled pair features mapped into the dual teacher's space."""
        raise FusionError(f"the {self.kind} fusion teacher has no heads into a dual teacher's space")

    #: Whether :meth:`pair_heads` gives g from the image alone and h from the caption alone:
    #: MCAD's targets for a student's image and text towers, which each see one side only.
    own_side_heads: bool = False
    #: What the heads g, h read (``FusionConfig.heads_input``); ``None``: no such option.
    heads_input: str | None = None

    def untrained(self) -> str | None:
        """Why the pair head counts as untrained (``None``: trained). A backend that loads
        published weights (``blip-itm``) is trained."""
        return None

    def heads_untrained(self) -> str | None:
        """Why the heads g, h into the dual space count as untrained (``None``: trained or none)."""
        return None

    def pair_heads(
        self, states: FusionStates, image_index: torch.Tensor, text_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(g, h)`` in the dual teacher's space for the listed pairs."""
        raise FusionError(f"the {self.kind} fusion teacher has no heads into a dual teacher's space")


def score_pairs(
    backend: FusionBackend,
    states: FusionStates,
    image_index: torch.Tensor,
    text_index: torch.Tensor,
    *,
    pooled: bool = False,
    chunk: int = PAIR_CHUNK,
    memo: EncodingMemo | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Match logits (and pooled features) for the given pairs, in chunks of ``chunk`` pairs.
    Gradients flow when called outside ``no_grad`` (fusion training uses it that way). ``memo``:
    where whole no-grad logits grids are kept (:func:`_score_dense`)."""
    if image_index.shape != text_index.shape or image_index.dim() != 1:
        raise ValueError(
            f"pair indices must be two 1-D tensors of one length, got {tuple(image_index.shape)}, "
            f"{tuple(text_index.shape)}"
        )
    n_pairs = int(image_index.numel())
    if hasattr(backend, "pair_grid") and n_pairs >= DENSE_FRACTION * states.n_images * states.n_texts > 0:
        return _score_dense(backend, states, image_index, text_index, pooled, chunk, memo)
    prepared = backend.prepare_pairs(states, with_pooled=pooled)
    logits, features = [], []
    for start in range(0, n_pairs, chunk):
        part = slice(start, start + chunk)
        logit, feature = backend.pair_forward(prepared, image_index[part], text_index[part], with_pooled=pooled)
        logits.append(logit)
        if pooled:
            features.append(feature)
    if not logits:
        empty = states.image_global.new_zeros(0)
        return empty, (states.image_global.new_zeros(0, 0) if pooled else None)
    return torch.cat(logits), (torch.cat(features) if pooled else None)


def _score_dense(
    backend: Any,
    states: FusionStates,
    image_index: torch.Tensor,
    text_index: torch.Tensor,
    pooled: bool,
    chunk: int,
    memo: EncodingMemo | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Score the whole images × captions grid (in blocks of images of about ``chunk`` pairs)
    and read the requested pairs off it.

    Without gradients and pooled features, and given a ``memo``, the logits grid is kept per
    (backend weights, states) content: MCAD scores every pair of a batch and DCD most of them,
    and the ``distill`` job trains the two on the very same batches and hands their fusion
    teachers one memo, so the second finds each grid computed (docs/results.md, "Where the demo's
    time goes"). A kept grid is the one a fresh pass over the same states gives, bit for bit
    (same inputs, same shapes, same code), so training is unchanged."""
    memo = usable_memo(memo)
    if pooled or torch.is_grad_enabled() or memo is None:
        logits, features = _dense_grid(backend, states, pooled, chunk)
        return logits[image_index, text_index], (features[image_index, text_index] if pooled else None)
    key = _grid_key(backend, states)
    grids = memo.tower("fusion-grids", max_bytes=GRID_MEMO_BYTES)
    (grid,) = grids.fetch([key], lambda _: [_dense_grid(backend, states, False, chunk)[0]])
    return grid.to(states.image_global.device)[image_index, text_index], None


#: The logits grids :func:`_score_dense` keeps (a 128 x 128 batch grid is 64 KB).
GRID_MEMO_BYTES = 256 << 20


def _dense_grid(
    backend: Any, states: FusionStates, pooled: bool, chunk: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    # here, not before the memo: a memoised grid needs none
    prepared = backend.prepare_pairs(states, with_pooled=pooled)
    rows = max(1, chunk // max(1, states.n_texts))
    logit_blocks, feature_blocks = [], []
    for start in range(0, states.n_images, rows):
        logit, feature = backend.pair_grid(prepared, slice(start, start + rows), with_pooled=pooled)
        logit_blocks.append(logit)
        if pooled:
            feature_blocks.append(feature)
    return torch.cat(logit_blocks), (torch.cat(feature_blocks) if pooled else None)


def _grid_key(backend: nn.Module, states: FusionStates) -> bytes:
    """Content key of one batch's grid: the backend's weights and every state tensor."""
    digest = hashlib.blake2b(module_key("fusion-grid", [backend]).encode(), digest_size=20)
    for field in fields(states):
        digest.update(tensor_key(getattr(states, field.name)))
    return digest.digest()


class FusionTeacher(nn.Module):
    """A frozen fusion backend: eval mode pinned, no gradients, no autograd graph.

    ``score_matrix`` scores every image against every caption of a :class:`FusionStates`;
    ``pair_logits`` only the listed pairs (what MCAD's top-k and DCD's candidates need)."""

    #: Where whole no-grad logits grids are kept (:func:`_score_dense`), shared with other
    #: fusion teachers of a run that score the same batches.
    encoding_memo: EncodingMemo | None = None

    def __init__(self, backend: FusionBackend, spec: str) -> None:
        super().__init__()
        self.backend = backend
        self.spec = spec
        backend.eval()
        backend.requires_grad_(False)

    def train(self, mode: bool = True) -> FusionTeacher:
        super().train(False)
        self.backend.eval()
        return self

    @property
    def kind(self) -> str:
        return self.backend.kind

    @property
    def global_dim(self) -> int:
        return int(self.backend.global_dim)

    @property
    def pooled_dim(self) -> int | None:
        return self.backend.pooled_dim

    @property
    def dual_spec(self) -> str | None:
        return self.backend.dual_spec

    @property
    def dual_fingerprint(self) -> str | None:
        return self.backend.dual_fingerprint

    @property
    def device(self) -> torch.device:
        return next(self.backend.parameters()).device

    @torch.no_grad()
    def image_states(self, unit_pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.backend.image_states(unit_pixels.to(self.device))

    @torch.no_grad()
    def text_states(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.backend.text_states(list(texts))

    @torch.no_grad()
    def states(self, unit_pixels: torch.Tensor, texts: Sequence[str], batch_size: int = 256) -> FusionStates:
        """States of a set of images and captions, ``batch_size`` items per forward."""
        if len(unit_pixels) == 0 or len(texts) == 0:
            raise FusionError(f"states() needs images and captions, got {len(unit_pixels)} and {len(texts)}")
        images = [self.image_states(unit_pixels[i : i + batch_size]) for i in range(0, len(unit_pixels), batch_size)]
        captions = [self.text_states(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
        text, mask = pad_texts([row for tokens, masks, _ in captions for row in unpad_texts(tokens, masks)])
        return FusionStates(
            image=torch.cat([tokens for tokens, _ in images]),
            image_global=torch.cat([embedding for _, embedding in images]),
            text=text,
            text_mask=mask,
            text_global=torch.cat([embedding for _, _, embedding in captions]),
        )

    @torch.no_grad()
    def pair_logits(self, states: FusionStates, image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
        return score_pairs(self.backend, states, image_index, text_index, memo=self.encoding_memo)[0]

    @torch.no_grad()
    def pair_features(
        self, states: FusionStates, image_index: torch.Tensor, text_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits, pooled = score_pairs(self.backend, states, image_index, text_index, pooled=True)
        assert pooled is not None
        return logits, pooled

    @torch.no_grad()
    def score_matrix(self, states: FusionStates) -> torch.Tensor:
        """(B_images, B_texts) match logits of every pair."""
        rows = torch.arange(states.n_images, device=states.image.device)
        cols = torch.arange(states.n_texts, device=states.image.device)
        image_index = rows.repeat_interleave(states.n_texts)
        text_index = cols.repeat(states.n_images)
        return self.pair_logits(states, image_index, text_index).view(states.n_images, states.n_texts)

    @property
    def own_side_heads(self) -> bool:
        """Whether g of an image depends on the image alone and h of a caption on the caption alone."""
        return bool(self.backend.own_side_heads)

    @property
    def heads_input(self) -> str | None:
        return self.backend.heads_input

    def untrained(self) -> str | None:
        """Why the pair head counts as untrained (``None``: trained), see ``FusionBackend.untrained``."""
        return self.backend.untrained()

    def heads_untrained(self) -> str | None:
        """Why the heads g, h count as untrained (``None``: trained), see ``FusionBackend.heads_untrained``."""
        return self.backend.heads_untrained()

    @torch.no_grad()
    def matched_dual_features(self, states: FusionStates) -> tuple[torch.Tensor, torch.Tensor]:
        """``(g_i, h_i)`` (unnormalised) for the matched pairs (image i, caption i) of a batch."""
        if self.pooled_dim is None:
            raise FusionError(f"fusion teacher {self.spec} gives no pooled features in a dual teacher's space")
        index = torch.arange(states.n_images, device=states.image.device)
        return self.backend.pair_heads(states, index, index)
