"""Hard negatives mined block by block are those mined on the whole score matrix."""

from __future__ import annotations

import torch

from clipdistill.train.fusion import _mine, _mine_blocks


def test_blocks_mine_what_the_whole_matrix_mines_ties_included() -> None:
    generator = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(70, 32, generator=generator), dim=-1)
    keys = torch.nn.functional.normalize(torch.randn(90, 32, generator=generator), dim=-1)
    keys[40:50] = keys[30:40]  # identical embeddings (captions the tokenizer reads alike): tied scores
    excluded = [{(i * 7) % 90, (i * 11) % 90} if i % 3 else set(range(i % 5 + 3)) for i in range(70)]
    whole = _mine(queries @ keys.t(), excluded, 8, "captions")
    for block in (1, 16, 64, 70, 128):
        assert torch.equal(_mine_blocks(queries, keys, excluded, 8, "captions", block=block), whole), block
    assert all(not set(row.tolist()) & skip for row, skip in zip(whole, excluded, strict=True))
