"""The fusion stage's per-row tensors kept on disk come back with the same bits, by position."""

from __future__ import annotations

import pytest
import torch

from clipdistill.train.fusion_split import SpilledRows, TokenRows


def test_spilled_rows_come_back_by_position_in_any_order() -> None:
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randn(length, 6, generator=generator) for length in (3, 1, 5, 2)]
    spilled = SpilledRows()
    for index in (2, 0, 3, 1):  # written out of order, as captions are encoded by length
        spilled.put(index, rows[index][:, :4])  # a strided view, as a padded batch's slice is
    assert len(spilled) == 4
    back = spilled.read([3, 0, 0, 2])
    for got, index in zip(back, (3, 0, 0, 2), strict=True):
        assert torch.equal(got, rows[index][:, :4])
    with pytest.raises(IndexError, match="row 4 of 4"):
        spilled.read([4])


def test_spilled_token_rows_stack_a_batch() -> None:
    spilled = SpilledRows()
    rows = [torch.full((3, 2), float(i)) for i in range(5)]
    for row in rows:
        spilled.append(row)
    tokens = TokenRows.spilled(spilled, torch.device("cpu"))
    assert len(tokens) == 5
    assert torch.equal(tokens[torch.tensor([4, 1])], torch.stack([rows[4], rows[1]]))
    assert torch.equal(tokens[1:3], torch.stack(rows[1:3]))
