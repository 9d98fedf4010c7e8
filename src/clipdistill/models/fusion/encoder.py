"""Ours: a small cross-attention fusion encoder over a dual teacher's tokens (``fusion:PATH``),
with its save/load. See :mod:`clipdistill.models.fusion` for the design.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipdistill.io import atomic_path, atomic_write_json
from clipdistill.models.base import DualEncoder
from clipdistill.models.fusion.base import FusionBackend, FusionError, FusionStates, score_pairs
from clipdistill.models.spec import ModelSpecError

CONFIG_FILE = "fusion_config.json"
WEIGHTS_FILE = "fusion.safetensors"
#: What the heads g, h may read (:attr:`FusionConfig.heads_input`).
HEADS_INPUTS = ("own", "sides", "pair")


# --- ours: a small cross-attention encoder over a dual teacher's tokens -----------------------------
@dataclass(frozen=True)
class FusionConfig:
    """Architecture of a ``fusion:`` teacher. The token geometry (``image_tokens``,
    ``*_token_dim``) and ``embed_dim`` are read off the dual teacher it was trained on."""

    dual_spec: str
    image_token_dim: int
    image_tokens: int
    text_token_dim: int
    embed_dim: int
    dual_logit_scale: float = 1 / 0.07  # κ of the dual teacher: the initial weight of its cosine
    width: int = 64
    heads: int = 4
    mlp_ratio: float = 2.0
    dual_fingerprint: str | None = None
    #: What the match logit is. ``"cross"``: the dual cosine plus a learned correction from the
    #: cross-attention feature f. ``"pool"``: the dual teacher's own cosine recomputed with learned,
    #: pair-conditioned pooling of its word tokens and patch embeddings (:func:`pooled_cosine`);
    #: f then only feeds g, h. ``"pool"`` is what ``train-fusion`` builds: a handful of weights
    #: acting in MiniLM's token space transfers to unseen concepts, where the cross-attention
    #: correction learnt the training concepts and lowered held-out recall.
    match: str = "cross"
    #: What the heads g, h into the dual space read *[ours]*. ``"own"`` (what ``train-fusion``
    #: builds): each head reads only its own side, g_i LN(mean of image i's projected tokens) and
    #: h_i LN(masked mean of caption i's), so MCAD's image target cannot carry the caption nor its
    #: text target the image: a student's towers each see one side, and a target that carries the
    #: other is one they cannot reach. ``"sides"``: g as ``"own"``, h_i from caption i's side of the
    #: cross-attention against its own image, so ĝ_i and ĥ_i can share a code of the image.
    #: ``"pair"``: both from the pooled feature f of the matched pair. Folders written with
    #: ``"sides"`` or ``"pair"`` load as what they are (``from_dict`` reads a config without the
    #: key as ``"pair"``, which is what folders from before the key hold); MCAD uses only ``"own"``.
    heads_input: str = "own"

    def __post_init__(self) -> None:
        if self.match not in ("cross", "pool"):
            raise FusionError(f"fusion match must be 'cross' or 'pool', got {self.match!r}")
        if self.heads_input not in HEADS_INPUTS:
            raise FusionError(
                f"fusion heads_input must be one of {', '.join(map(repr, HEADS_INPUTS))}, got {self.heads_input!r}"
            )
        if self.width < 1 or self.heads < 1 or self.width % self.heads:
            raise FusionError(f"fusion width {self.width} must be a positive multiple of heads {self.heads}")
        if self.mlp_ratio <= 0:
            raise FusionError(f"fusion mlp_ratio must be > 0, got {self.mlp_ratio}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FusionConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise FusionError(f"unknown fusion config key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**{"heads_input": "pair", **raw})  # folders from before the key have pair heads


class CrossAttention(nn.Module):
    """One cross-attention layer whose output is pooled over its query tokens.

    The query side's tokens attend to the other side's tokens; the residual stream is averaged
    over the (real) query tokens, then layer-normalised:
    ``LN(mean_q[x_q + out(concat_h Σ_k a_qhk·v_kh)])``. The mean is linear, so it moves inside:
    ``mean_q x_q + out(concat_h Σ_k ā_hk·v_kh)`` with ā the attention averaged over the queries.
    A pair therefore costs its attention scores and one output projection, never a per-token
    tensor; queries, keys, values and the pooled residual are computed once per item
    (:meth:`project`). This is what makes scoring all B² pairs of a batch affordable."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim))  # (B, T, h, e)

    def project(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per item (B, T, d): queries, keys, values (B, T, h, e) and the mean of x over real tokens."""
        if mask is None:
            mean = x.mean(dim=1)
        else:
            weights = mask.unsqueeze(-1).to(x.dtype)
            mean = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return {"q": self._split(self.q(x)), "k": self._split(self.k(x)), "v": self._split(self.v(x)), "mean": mean}

    def forward(
        self,
        queries: dict[str, torch.Tensor],
        keys: dict[str, torch.Tensor],
        query_mask: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(..., d) pooled outputs from :meth:`project` outputs laid out per pair: ``q`` (..., Q, h, e),
        ``k``/``v`` (..., K, h, e), ``mean`` (..., d), masks (..., Q) / (..., K). The leading dims
        broadcast, so a list of P pairs (P, ...) and a grid of images × captions ((b, 1, ...)
        against (1, B_t, ...)) go through the same code."""
        # Laid out (..., h, keys, queries): a softmax over the second-last dim runs ~3x faster
        # on CPU than one over a last dim of a few image tokens.
        scores = torch.einsum("...qhe,...khe->...hkq", queries["q"], keys["k"]) / math.sqrt(self.head_dim)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[..., None, :, None], float("-inf"))
        attention = scores.softmax(dim=-2)
        if query_mask is None:
            pooled_attention = attention.mean(dim=-1)
        else:
            weights = query_mask[..., None, None, :].to(attention.dtype)
            pooled_attention = (attention * weights).sum(dim=-1) / weights.sum(dim=-1).clamp_min(1.0)
        read = torch.einsum("...hk,...khe->...he", pooled_attention, keys["v"]).flatten(-2)
        return self.norm(queries["mean"] + self.out(read))


def pooled_cosine(
    words: torch.Tensor,
    word_logits: torch.Tensor,
    mask: torch.Tensor,
    patches: torch.Tensor,
    image_mean: torch.Tensor,
    word_image: torch.Tensor,
    patch_text: torch.Tensor,
    patch_norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cosine of a caption and an image, each pooled with weights that depend on the other.

    ``words`` (..., L, D) are the caption's token features in the dual space and ``patches``
    (..., N, D) the image's patch embeddings there (the dual head applied per patch), so uniform
    weights give back the dual teacher's own cosine (mean pooling on both sides). The caption's
    weights are ``softmax_w(word_logits_w + word_image · cos(word_w, image_mean))`` over real words
    (``word_logits`` (..., L) per caption; the second term lets the image say which words it
    explains), the image's are ``softmax_p(patch_text · cos(patch_p, pooled caption))``. Leading
    dims broadcast (pairs, or a grid of images × captions), computed with batched matmuls.
    ``patch_norms`` (..., N), when given, are the patches' norms computed once per image: the
    patch cosines are then (patch · text) / norm, which saves normalising a per-pair copy of every
    patch (about a tenth of a fusion training step)."""
    unit_words = F.normalize(words, dim=-1)
    logits = word_logits + word_image * (unit_words @ image_mean.unsqueeze(-1)).squeeze(-1)
    weights = logits.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    text = F.normalize((weights.unsqueeze(-2) @ words).squeeze(-2), dim=-1)  # (..., D)
    if patch_norms is None:
        patch_cosines = (F.normalize(patches, dim=-1) @ text.unsqueeze(-1)).squeeze(-1)
    else:
        patch_cosines = (patches @ text.unsqueeze(-1)).squeeze(-1) / patch_norms
    patch_weights = (patch_text * patch_cosines).softmax(dim=-1)
    image = F.normalize((patch_weights.unsqueeze(-2) @ patches).squeeze(-2), dim=-1)
    return (image * text).sum(dim=-1)


def pooled_cosine_grid(
    words: torch.Tensor,
    word_logits: torch.Tensor,
    mask: torch.Tensor,
    patches: torch.Tensor,
    image_mean: torch.Tensor,
    word_image: torch.Tensor,
    patch_text: torch.Tensor,
    patch_norms: torch.Tensor,
) -> torch.Tensor:
    """:func:`pooled_cosine` of every image (``patches`` (I, N, D), ``image_mean`` (I, D),
    ``patch_norms`` (I, N)) against every caption (``words`` (T, L, D), ``word_logits``/``mask``
    (T, L)): (I, T). The same arithmetic as broadcasting the pair version over an (I, 1) × (1, T)
    grid, but each product is a batched matmul over one side, so no (I, T, N, D) or (I, T, L, D)
    copy is made: broadcasting makes four of those per block of images, which would be nearly
    all of MCAD's dense scoring."""
    unit_words = F.normalize(words, dim=-1)
    word_cosines = torch.einsum("tld,id->itl", unit_words, image_mean)
    logits = word_logits.unsqueeze(0) + word_image * word_cosines
    weights = logits.masked_fill(~mask.unsqueeze(0), float("-inf")).softmax(dim=-1)  # (I, T, L)
    text = F.normalize(torch.bmm(weights.transpose(0, 1), words).transpose(0, 1), dim=-1)  # (I, T, D)
    patch_cosines = torch.bmm(text, patches.transpose(1, 2)) / patch_norms.unsqueeze(1)  # (I, T, N)
    patch_weights = (patch_text * patch_cosines).softmax(dim=-1)
    image = F.normalize(torch.bmm(patch_weights, patches), dim=-1)  # (I, T, D)
    return (image * text).sum(dim=-1)


class FusionEncoder(FusionBackend):
    """``fusion:PATH``: the trainable cross-attention encoder (see the module docstring).

    ``dual`` is the frozen dual teacher that produces the tokens; it is ``None`` when only
    the head was loaded (states then come from the teacher cache). Its weights are never saved
    with the fusion teacher: :meth:`head_state` holds everything else."""

    kind = "fusion"

    def __init__(self, config: FusionConfig, dual: DualEncoder | None = None) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.global_dim = config.embed_dim
        self.pooled_dim = config.embed_dim
        self.dual_spec = config.dual_spec
        self.dual_fingerprint = config.dual_fingerprint
        self.heads_input = config.heads_input
        self.image_in = nn.Sequential(nn.LayerNorm(config.image_token_dim), nn.Linear(config.image_token_dim, width))
        self.image_pos = nn.Parameter(torch.randn(config.image_tokens, width) * 0.02)
        self.text_in = nn.Sequential(nn.LayerNorm(config.text_token_dim), nn.Linear(config.text_token_dim, width))
        self.text_to_image = CrossAttention(width, config.heads)
        self.image_to_text = CrossAttention(width, config.heads)
        hidden = max(1, round(width * config.mlp_ratio))
        self.mlp = nn.Sequential(
            nn.LayerNorm(3 * width), nn.Linear(3 * width, hidden), nn.GELU(), nn.Linear(hidden, width)
        )
        self.itm = nn.Linear(width, 1)
        nn.init.zeros_(self.itm.weight)  # untrained, the logit is the dual teacher's own score
        nn.init.zeros_(self.itm.bias)
        self.dual_weight = nn.Parameter(torch.tensor(float(config.dual_logit_scale)))
        # The logit's offset: under listwise training no gradient reaches it (a shift of all of a
        # caption's candidates changes no softmax), so train-fusion freezes it at its centring;
        # under BCE it is the intercept of the log-odds.
        self.dual_bias = nn.Parameter(torch.tensor(0.0))
        self.image_head = nn.Linear(width, config.embed_dim, bias=False)  # g
        self.text_head = nn.Linear(width, config.embed_dim, bias=False)  # h
        if config.heads_input in ("own", "sides"):
            self.image_side_norm = nn.LayerNorm(width)  # g reads LN(mean of the image's projected tokens)
        if config.heads_input == "own":
            self.text_side_norm = nn.LayerNorm(width)  # h reads LN(masked mean of the caption's projected tokens)
        #: What ``train-fusion`` recorded of the training that produced these weights (the
        #: ``training`` entry of ``fusion_config.json``); ``None`` when nothing was recorded.
        self.training_record: dict[str, Any] | None = None
        if config.match == "pool":
            # The dual teacher's own linear heads, frozen copies (set by :meth:`copy_dual_heads`), so
            # the pooled cosine starts as the dual cosine and the states need no dual teacher.
            self.patch_proj = nn.Linear(config.image_token_dim, config.embed_dim).requires_grad_(False)
            self.word_proj = nn.Linear(config.text_token_dim, config.embed_dim, bias=False).requires_grad_(False)
            self.word_norm = nn.LayerNorm(config.embed_dim)
            self.word_score = nn.Linear(config.embed_dim, 1)
            nn.init.zeros_(self.word_score.weight)  # uniform word weights: the dual teacher's mean pooling
            nn.init.zeros_(self.word_score.bias)
            self.word_image = nn.Parameter(torch.tensor(0.0))
            self.patch_text = nn.Parameter(torch.tensor(0.0))
            self.itm.requires_grad_(False)  # the logit is the pooled cosine; f only feeds g, h
        self.dual = dual
        if dual is not None:
            dual.eval()
            dual.requires_grad_(False)

    def train(self, mode: bool = True) -> FusionEncoder:
        super().train(mode)
        if self.dual is not None:
            self.dual.eval()  # the dual teacher is frozen, whatever the head does
        return self

    def copy_dual_heads(self, dual: DualEncoder) -> None:
        """Copy the dual teacher's image head (applied per patch) and text projection into the
        frozen ``patch_proj``/``word_proj`` of a ``match="pool"`` encoder. Exact for the LiT
        teacher, whose embeddings are these linear maps of its mean-pooled tokens."""
        image_proj, text_proj = getattr(dual, "image_proj", None), getattr(dual, "text_proj", None)
        if not isinstance(image_proj, nn.Linear) or not isinstance(text_proj, nn.Linear | nn.Identity):
            raise FusionError(
                f"fusion match 'pool' needs a dual teacher whose embeddings are linear heads on its pooled tokens "
                f"(image_proj, text_proj as in the LiT teacher); {dual.spec or type(dual).__name__} has none"
            )
        with torch.no_grad():
            self.patch_proj.weight.copy_(image_proj.weight)
            self.patch_proj.bias.copy_(image_proj.bias)
            if isinstance(text_proj, nn.Linear):
                self.word_proj.weight.copy_(text_proj.weight)
            else:
                self.word_proj.weight.copy_(torch.eye(*self.word_proj.weight.shape))

    def head_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous() for k, v in self.state_dict().items() if not k.startswith("dual.")}

    def _require_dual(self) -> DualEncoder:
        if self.dual is None:
            raise FusionError(
                f"fusion teacher (dual teacher {self.dual_spec}) was loaded without its dual teacher, "
                "so it can score pairs of cached states but cannot encode images or captions"
            )
        return self.dual

    # per-item projections (trained) of the dual teacher's raw tokens
    def project_image(self, tokens: torch.Tensor, patches: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token states of an image. ``patches``, when given, is ``patch_proj(tokens)``
        computed beforehand: it is frozen, and on the teacher's 1280-wide tokens it is a large
        part of a fusion training step (the trainer computes it once per image row)."""
        if tokens.shape[1] != self.config.image_tokens:
            raise FusionError(
                f"the dual teacher gave {tokens.shape[1]} image tokens but this fusion teacher was trained on "
                f"{self.config.image_tokens} (a different image size or trunk?)"
            )
        projected = self.image_in(tokens) + self.image_pos
        if self.config.match == "pool":  # states carry the patch embeddings in the dual space too
            projected = torch.cat([projected, self.patch_proj(tokens) if patches is None else patches], dim=-1)
        return projected

    def project_text(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        projected = self.text_in(hidden)
        if self.config.match == "pool":  # ... and the caption's word features in the dual space
            projected = torch.cat([projected, self.word_proj(hidden)], dim=-1)
        return projected * mask.unsqueeze(-1).to(hidden.dtype)

    def image_states(self, unit_pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dual = self._require_dual()
        pixels = dual.prepare_pixels(unit_pixels)
        with torch.no_grad():
            tokens = dual.encode_image_tokens(pixels)  # type: ignore[attr-defined]
            embedding = dual.encode_image(pixels)
        return self.project_image(tokens), embedding

    def text_states(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dual = self._require_dual()
        device = next(self.parameters()).device
        ids = dual.tokenize(texts).to(device)
        with torch.no_grad():
            embedding, hidden, mask = dual.encode_text_and_tokens(ids)  # type: ignore[attr-defined]
        longest = max(1, int(mask.sum(dim=1).max()))
        hidden, mask = hidden[:, :longest], mask[:, :longest]
        return self.project_text(hidden, mask), mask, embedding

    def prepare_pairs(self, states: FusionStates, with_pooled: bool = True) -> dict[str, Any]:
        width = self.config.width
        prepared: dict[str, Any] = {
            "mask": states.text_mask,
            "image_global": states.image_global,
            "text_global": states.text_global,
        }
        if self._needs_cross_attention(with_pooled):
            image, text = states.image[..., :width], states.text[..., :width]
            prepared["text_queries"] = self.text_to_image.project(text, states.text_mask)
            prepared["image_keys"] = self.text_to_image.project(image)
            prepared["image_queries"] = self.image_to_text.project(image)
            prepared["text_keys"] = self.image_to_text.project(text, states.text_mask)
        if self.config.match == "pool":
            # Detached: they are outputs of the frozen word_proj/patch_proj on frozen dual tokens,
            # so no trained weight gets a gradient through them, but as slices of a state that
            # carries the trained projections they would drag a per-pair backward pass (gather,
            # normalise) through autograd: with the skipped cross-attention, 40% of a fusion step.
            words, patches = states.text[..., width:].detach(), states.image[..., width:].detach()
            prepared["words"] = words
            prepared["word_logits"] = self.word_score(self.word_norm(words)).squeeze(-1)
            prepared["patches"] = patches
            prepared["image_mean"] = F.normalize(patches.mean(dim=1), dim=-1)
            prepared["patch_norms"] = patches.norm(dim=-1).clamp_min(1e-12)  # F.normalize's eps
        return prepared

    def _pool_cosine(self, p: dict[str, Any], image: Any, text: Any, grid: bool) -> torch.Tensor:
        """:func:`pooled_cosine` for pairs (``image``/``text`` index tensors) or a grid (``image``
        a slice of images against every caption, :func:`pooled_cosine_grid`)."""
        if grid:
            return pooled_cosine_grid(
                p["words"],
                p["word_logits"],
                p["mask"],
                p["patches"][image],
                p["image_mean"][image],
                self.word_image,
                self.patch_text,
                p["patch_norms"][image],
            )

        def img(name: str) -> torch.Tensor:
            return p[name][image]

        def txt(name: str) -> torch.Tensor:
            return p[name][text]

        return pooled_cosine(
            txt("words"),
            txt("word_logits"),
            txt("mask"),
            img("patches"),
            img("image_mean"),
            self.word_image,
            self.patch_text,
            img("patch_norms"),
        )

    def _head(
        self, pooled_text: torch.Tensor | None, pooled_image: torch.Tensor | None, cosine: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(match logit, pooled f)``; f is ``None`` when the cross-attention was skipped."""
        if pooled_text is None or pooled_image is None:
            return self.dual_weight * cosine + self.dual_bias, None
        pooled = self.mlp(torch.cat([pooled_text, pooled_image, pooled_text * pooled_image], dim=-1))
        if self.config.match == "pool":  # ``cosine`` is already the pooled cosine
            return self.dual_weight * cosine + self.dual_bias, pooled
        return self.itm(pooled).squeeze(-1) + self.dual_weight * cosine + self.dual_bias, pooled

    def _needs_cross_attention(self, with_pooled: bool) -> bool:
        """With ``match="pool"`` the logit is the pooled cosine alone: the pair cross-attention
        only makes f, so a caller that wants logits only (fusion training's listwise loss, MCAD's
        and DCD's scoring) skips it, a large part of their cost (docs/results.md, "Where the demo's
        time goes")."""
        return with_pooled or self.config.match != "pool"

    def pair_forward(
        self,
        prepared: dict[str, Any],
        image_index: torch.Tensor,
        text_index: torch.Tensor,
        with_pooled: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        p = prepared

        def take(projected: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
            return {name: value[index] for name, value in projected.items()}

        pooled_text = pooled_image = None
        if self._needs_cross_attention(with_pooled):
            mask = p["mask"][text_index]
            pooled_text = self.text_to_image(
                take(p["text_queries"], text_index), take(p["image_keys"], image_index), query_mask=mask
            )
            pooled_image = self.image_to_text(
                take(p["image_queries"], image_index), take(p["text_keys"], text_index), key_mask=mask
            )
        if self.config.match == "pool":
            cosine = self._pool_cosine(p, image_index, text_index, grid=False)
        else:
            cosine = (p["image_global"][image_index] * p["text_global"][text_index]).sum(dim=-1)
        return self._head(pooled_text, pooled_image, cosine)

    def pair_grid(
        self, prepared: dict[str, Any], images: slice, with_pooled: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(logits (b, B_t), pooled (b, B_t, d))`` for images ``images`` × every caption: the
        same computation as :meth:`pair_forward`, broadcast instead of gathered per pair (no
        per-pair copies of caption tokens, which dominate the cost of dense pair sets)."""
        p = prepared

        def grid(projected: dict[str, torch.Tensor], axis: int, part: slice | None = None) -> dict[str, torch.Tensor]:
            return {name: (value if part is None else value[part]).unsqueeze(axis) for name, value in projected.items()}

        pooled_text = pooled_image = None
        if self._needs_cross_attention(with_pooled):
            mask = p["mask"].unsqueeze(0)
            pooled_text = self.text_to_image(
                grid(p["text_queries"], 0), grid(p["image_keys"], 1, images), query_mask=mask
            )
            pooled_image = self.image_to_text(
                grid(p["image_queries"], 1, images), grid(p["text_keys"], 0), key_mask=mask
            )
        if self.config.match == "pool":
            cosine = self._pool_cosine(p, images, None, grid=True)
        else:
            cosine = p["image_global"][images] @ p["text_global"].t()
        return self._head(pooled_text, pooled_image, cosine)

    def dual_heads(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image_head(pooled), self.text_head(pooled)

    @property
    def own_side_heads(self) -> bool:
        return self.config.heads_input == "own"

    def _zero_initialised(self) -> list[torch.Tensor]:
        """The trained weights of the match logit that start at exactly 0 (``match="cross"``: the
        ITM correction; ``"pool"``: the word and patch pooling weights): while all are 0 the
        logit is the dual teacher's own score, and any training step moves them."""
        if self.config.match == "pool":
            return [self.word_score.weight, self.word_score.bias, self.word_image, self.patch_text]
        return [self.itm.weight, self.itm.bias]

    def untrained(self) -> str | None:
        """Why the pair head counts as untrained, or ``None`` when it is trained. A folder's
        training record (:attr:`training_record`) decides when there is one; without one (folders
        written before ``train-fusion`` recorded its training, or an encoder built in code) the
        head is untrained exactly when the logit's zero-initialised weights are all still 0."""
        if self.training_record is not None:
            steps = int(self.training_record.get("steps", 0))
            return None if steps > 0 else f"its {CONFIG_FILE} records {steps} training steps"
        if any(bool(weight.detach().ne(0).any()) for weight in self._zero_initialised()):
            return None
        return "its match logit's weights are still at their initialisation, so it scores like the dual teacher"

    def heads_untrained(self) -> str | None:
        """Why the heads g, h count as untrained (``None``: trained or unknown): a training record
        with ``w_heads`` 0 says the heads loss never ran, so g, h are their random initialisation."""
        if self.training_record is not None and float(self.training_record.get("w_heads", 1.0)) == 0.0:
            return f"its {CONFIG_FILE} records w_heads 0: its heads g, h were never trained"
        return None

    def pair_heads(
        self, states: FusionStates, image_index: torch.Tensor, text_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(g, h)`` (unnormalised) for pairs (image_index[p], text_index[p]); gradients flow.

        ``heads_input="own"`` *[ours]*: g from the image's own projected tokens, h from the
        caption's own (masked mean, padding is zero), so neither depends on the item it is paired
        with. ``"sides"``: g as ``"own"``, h from the caption's queries attending to the paired
        image (the caption side of the cross-attention). ``"pair"``: both from the pooled pair
        feature f (:meth:`dual_heads`)."""
        if self.config.heads_input == "pair":
            _, pooled = score_pairs(self, states, image_index, text_index, pooled=True)
            assert pooled is not None
            return self.dual_heads(pooled)
        width = self.config.width
        image = states.image[image_index][..., :width]
        text, mask = states.text[text_index][..., :width], states.text_mask[text_index]
        g = self.image_head(self.image_side_norm(image.mean(dim=1)))
        if self.config.heads_input == "own":
            weights = mask.unsqueeze(-1).to(text.dtype)
            caption = (text * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
            return g, self.text_head(self.text_side_norm(caption))
        caption_side = self.text_to_image(
            self.text_to_image.project(text, mask), self.text_to_image.project(image), query_mask=mask
        )
        return g, self.text_head(caption_side)


def dual_token_geometry(dual: DualEncoder) -> dict[str, int]:
    """Token shapes of a dual teacher, read by running it once on a blank image and caption;
    a dual encoder without token features is an error naming what is missing."""
    missing = [
        name for name in ("encode_image_tokens", "encode_text_and_tokens") if not callable(getattr(dual, name, None))
    ]
    if missing:
        raise FusionError(
            f"dual teacher {dual.spec or type(dual).__name__} has no token features ({', '.join(missing)} missing); "
            "a fusion: teacher is trained on a dual teacher that provides them (the LiT teacher, run:PATH)"
        )
    device = next(dual.parameters()).device
    with torch.no_grad():
        pixels = dual.prepare_pixels(torch.ones(1, 3, *dual.image_size, device=device))
        image_tokens = dual.encode_image_tokens(pixels)  # type: ignore[attr-defined]
        _, text_tokens, _ = dual.encode_text_and_tokens(dual.tokenize(["a"]).to(device))  # type: ignore[attr-defined]
    return {
        "image_tokens": int(image_tokens.shape[1]),
        "image_token_dim": int(image_tokens.shape[2]),
        "text_token_dim": int(text_tokens.shape[2]),
        "embed_dim": int(dual.embed_dim),
    }


def save_fusion_encoder(encoder: FusionEncoder, directory: str | Path) -> Path:
    """Write ``fusion_config.json`` + ``fusion.safetensors`` (head only) atomically; the config
    carries the encoder's :attr:`~FusionEncoder.training_record` as ``training`` when it has one."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(encoder.head_state(), str(tmp))
    meta: dict[str, Any] = {"kind": "fusion", "config": asdict(encoder.config)}
    if encoder.training_record is not None:
        meta["training"] = encoder.training_record
    atomic_write_json(directory / CONFIG_FILE, meta)
    return directory


def read_fusion_config(directory: str | Path) -> FusionConfig:
    return FusionConfig.from_dict(_read_meta(directory)["config"])


def read_fusion_training(directory: str | Path) -> dict[str, Any] | None:
    """A ``fusion:`` folder's training record (``None``: written before ``train-fusion`` recorded
    one); a malformed record is an error naming the file."""
    record = _read_meta(directory).get("training")
    steps = record.get("steps") if isinstance(record, dict) else None
    if record is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 0):
        raise FusionError(f"{Path(directory) / CONFIG_FILE}: field 'training' must hold an int 'steps' >= 0")
    return record


def _read_meta(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    file = directory / CONFIG_FILE
    if not file.is_file():
        if not directory.exists():
            raise ModelSpecError(f"fusion:{directory}: folder does not exist")
        raise ModelSpecError(
            f"fusion:{directory}: no {CONFIG_FILE} (a fusion teacher folder is written by "
            "`clipdistill teacher train-fusion`)"
        )
    meta = json.loads(file.read_text(encoding="utf-8"))
    if meta.get("kind") != "fusion":
        raise FusionError(f"{file}: field 'kind' is {meta.get('kind')!r}, expected 'fusion'")
    return meta
