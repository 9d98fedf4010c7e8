"""Torch-free tokenizers for serving, reproducing the training tokenizers id for id.

A served text tower is only as good as its token ids: one id off and the embedding drifts.
So rather than approximating open_clip's ``SimpleTokenizer`` with a Hugging Face CLIP
tokenizer (which skips ftfy's text repair and HTML unescaping, so unicode and ``&amp;``
captions tokenise differently), :class:`ClipBpeTokenizer` is a line-by-line port of it on
numpy, reading the same BPE merges file (copied into the export folder). It needs only
``ftfy`` and ``regex``, which open_clip already depends on. The LiT teacher's WordPiece
tokenizer is served with the ``tokenizers`` library from its own ``tokenizer.json``; so is a
student on open_clip's ``HFTokenizer`` (the ``lite0`` preset); both after open_clip's text
cleaning (``clean`` in the config: ``whitespace`` or ``lower``).

Both write fixed-width (B, context_length) int64 arrays padded with the pad id, which is what
the exported text graphs take.
"""

from __future__ import annotations

import gzip
import html
import itertools
import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np

TOKENIZER_CONFIG = "tokenizer_config.json"
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
WORDPIECE_FILE = "tokenizer.json"
BPE_CACHE_SIZE = 65536  # words; open_clip's own cache is an unbounded dict, fine for training, not a server


class Tokenizer(Protocol):
    """What the serving code needs from a tokenizer."""

    context_length: int

    def __call__(self, texts: Sequence[str]) -> np.ndarray: ...


@lru_cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table (identical to open_clip's)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return set(itertools.pairwise(word))


class ClipBpeTokenizer:
    """open_clip's ``SimpleTokenizer`` (clean='lower', truncation, no reduction mask) on numpy.

    ``tokens = [sot] + bpe(clean(text)) + [eot]``; longer than the context it is cut and the
    last kept position becomes ``eot`` (that is where open_clip's text tower pools).
    """

    def __init__(
        self,
        bpe_path: str | Path,
        context_length: int,
        additional_special_tokens: Sequence[str] = (),
    ) -> None:
        import regex

        with gzip.open(bpe_path) as handle:
            merges_text = handle.read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in merges_text[1 : 49152 - 256 - 2 + 1]]
        byte_encoder = _bytes_to_unicode()
        vocab = list(byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab]
        vocab.extend("".join(m) for m in merges)
        special = ["<start_of_text>", "<end_of_text>", *additional_special_tokens]
        vocab.extend(special)
        self.encoder = {token: index for index, token in enumerate(vocab)}
        self.bpe_ranks = {merge: rank for rank, merge in enumerate(merges)}
        self.byte_encoder = byte_encoder
        self.special = frozenset(special)
        # bounded: every distinct word a client sends would otherwise stay in memory for good
        self.bpe = lru_cache(maxsize=BPE_CACHE_SIZE)(self._bpe)
        self.pattern = regex.compile(
            "|".join(special) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        self.sot_token_id = self.encoder["<start_of_text>"]
        self.eot_token_id = self.encoder["<end_of_text>"]
        self.context_length = int(context_length)
        self.pad_token_id = 0

    @staticmethod
    def clean(text: str) -> str:
        return open_clip_clean(text, lower=True)

    def _bpe(self, token: str) -> str:
        if token in self.special:
            return token
        word: tuple[str, ...] = (*token[:-1], token[-1] + "</w>")
        pairs = _pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            merged: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    merged.extend(word[i:])
                    break
                merged.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
            if len(word) == 1:
                break
            pairs = _pairs(word)
        return " ".join(word)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for token in self.pattern.findall(self.clean(text)):
            mapped = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(mapped).split(" "))
        return ids

    def __call__(self, texts: Sequence[str] | str) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            tokens = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(tokens) > self.context_length:
                tokens = tokens[: self.context_length]
                tokens[-1] = self.eot_token_id
            out[row, : len(tokens)] = tokens
        return out


CLEANS = (None, "whitespace", "lower")


def open_clip_clean(text: str, *, lower: bool = False) -> str:
    """open_clip's ``_clean_whitespace`` / ``_clean_lower``: ftfy, HTML unescape twice, collapse
    whitespace (and lowercase). Written out so serving needs no torch (open_clip imports it).
    Every tokenizer of the project cleans captions this way (the LiT teacher's MiniLM too), so a
    caption such as ``o’clock`` is one token sequence for teacher, student and service."""
    import ftfy

    text = " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).strip().split()).strip()
    return text.lower() if lower else text


class WordPieceTokenizer:
    """A Hugging Face ``tokenizer.json`` (the LiT teacher's MiniLM), truncated and padded to
    ``context_length``. Padding to the full width is safe for the LiT text graph: its mean
    pooling masks pad ids, so features equal those of the training-time longest-padding."""

    def __init__(self, path: str | Path, context_length: int, pad_token_id: int, clean: str | None = None) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        if clean not in CLEANS:
            raise ValueError(f"unknown tokenizer clean {clean!r} (valid: {', '.join(map(str, CLEANS))})")
        self.clean = clean
        self.context_length = int(context_length)
        self.pad_token_id = int(pad_token_id)
        self.tokenizer = HFTokenizer.from_file(str(path))
        self.tokenizer.enable_truncation(max_length=self.context_length)
        self.tokenizer.no_padding()

    def __call__(self, texts: Sequence[str] | str) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        out = np.full((len(texts), self.context_length), self.pad_token_id, dtype=np.int64)
        if self.clean is not None:
            texts = [open_clip_clean(text, lower=self.clean == "lower") for text in texts]
        for row, encoding in enumerate(self.tokenizer.encode_batch(list(texts))):
            out[row, : len(encoding.ids)] = encoding.ids
        return out


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer an export folder describes in ``tokenizer_config.json``."""
    from clipdistill.paths import resolve_inside

    directory = Path(directory)
    config: dict[str, Any] = json.loads((directory / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
    kind = config.get("kind")
    if kind not in ("clip_bpe", "wordpiece"):
        raise ValueError(f"{directory / TOKENIZER_CONFIG}: unknown tokenizer kind {kind!r} (clip_bpe | wordpiece)")
    # the file name comes from the config: it must stay inside the export folder
    path = resolve_inside(directory, config.get("file"), what=f"{directory / TOKENIZER_CONFIG}: file")
    if kind == "clip_bpe":
        return ClipBpeTokenizer(
            path,
            config["context_length"],
            additional_special_tokens=config.get("additional_special_tokens", ()),
        )
    return WordPieceTokenizer(path, config["context_length"], config["pad_token_id"], config.get("clean"))
