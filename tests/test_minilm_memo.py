"""The MiniLM hidden-state memo: same features as a fresh forward, reused rows, and off wherever
it must be off (no memo attached, a trainable tower)."""

from __future__ import annotations

import pytest
import torch

from clipdistill.models.encoding_memo import EncodingMemo, RowMemo, attach_encoding_memo
from clipdistill.models.text_minilm import MiniLMTextEncoder

CAPTIONS = ["a red heart", "a smiling face with sunglasses", "a cat", "a red heart", "two hands clapping loudly"]


@pytest.fixture(scope="module")
def encoder() -> MiniLMTextEncoder:
    model = MiniLMTextEncoder(context_length=16).eval()
    model.requires_grad_(False)
    return model


def _forward_count(encoder: MiniLMTextEncoder, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows sent through the transformer, per call."""
    rows: list[int] = []
    original = encoder._forward_hidden

    def counting(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rows.append(tokens.shape[0])
        return original(tokens, mask)

    monkeypatch.setattr(encoder, "_forward_hidden", counting)
    return rows


@torch.no_grad()
def test_memo_matches_fresh_forward_and_reuses_rows(encoder: MiniLMTextEncoder, monkeypatch) -> None:
    tokens = encoder.tokenize(CAPTIONS)
    fresh = encoder(tokens)
    rows = _forward_count(encoder, monkeypatch)
    memo = EncodingMemo()
    attach_encoding_memo(encoder, memo)
    try:
        first = encoder(tokens)
        assert rows == [4]  # the repeated caption is encoded once
        # another batch (other padding length) that shares two captions: only the new one runs
        second = encoder(encoder.tokenize(["a cat", "a lighthouse on a rocky island at night", "a red heart"]))
        assert rows == [4, 1]
    finally:
        attach_encoding_memo(encoder, None)
    assert len(memo.towers) == 1
    torch.testing.assert_close(first, fresh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second[0], fresh[2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second[2], fresh[0], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_memo_is_off_without_a_memo_and_for_a_trainable_tower(encoder: MiniLMTextEncoder, monkeypatch) -> None:
    tokens = encoder.tokenize(CAPTIONS[:2])
    rows = _forward_count(encoder, monkeypatch)
    encoder(tokens)
    encoder(tokens)
    assert rows == [2, 2]  # no memo attached: every call runs the transformer
    memo = EncodingMemo()
    attach_encoding_memo(encoder, memo)
    encoder.model.embeddings.word_embeddings.weight.requires_grad_(True)
    try:
        encoder(tokens)
        encoder(tokens)
        assert rows == [2, 2, 2, 2]  # a tower being trained changes its outputs: never memoised
        assert not memo.towers
    finally:
        encoder.model.embeddings.word_embeddings.weight.requires_grad_(False)
        attach_encoding_memo(encoder, None)


def test_a_copied_model_shares_its_memo_and_a_pickled_one_starts_empty() -> None:
    """The memo is a cache, not model state: copies of a model (an EMA, a best checkpoint kept in
    memory) read the same rows, and a pickle does not carry them."""
    import copy
    import pickle

    memo = EncodingMemo()
    memo.tower("t").put(b"row", torch.zeros(3))
    assert copy.deepcopy(memo) is memo
    restored = pickle.loads(pickle.dumps(memo))
    assert restored is not memo and not restored.towers and restored.max_bytes == memo.max_bytes


def test_memo_evicts_least_recently_used_rows_past_its_byte_budget() -> None:
    memo = RowMemo(max_bytes=2 * 4 * 4)  # two rows of four float32 values
    memo.put(b"a", torch.zeros(4))
    memo.put(b"b", torch.ones(4))
    assert memo.get(b"a") is not None  # "a" is now the most recent
    memo.put(b"c", torch.full((4,), 2.0))
    assert memo.get(b"b") is None and memo.get(b"a") is not None and memo.get(b"c") is not None
    assert memo.bytes == 32
