"""The memo's spill file: rows come back with their bits, dtype, shape and strides; a memo past its
budget keeps rows on disk instead of dropping them; a folder it cannot write to is a clear error."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from clipdistill.models.encoding_memo import EncodingMemo, RowMemo
from clipdistill.models.row_spill import MemoSpillError, RowSpill


def _rows() -> dict[bytes, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(2, 8, 3, 5, generator=generator).contiguous(memory_format=torch.channels_last)
    return {
        b"plain": torch.randn(4, 6, generator=generator),
        b"channels-last": maps[1],  # a (C, h, w) slice of a channels-last batch: strides (1, w*C, C)
        b"bf16": torch.randn(7, generator=generator).to(torch.bfloat16),
        b"ints": torch.arange(12, dtype=torch.int64).reshape(3, 4),
        b"transposed": torch.randn(5, 3, generator=generator).t(),
    }


def test_rows_come_back_with_their_bits_dtype_shape_and_strides(tmp_path: Path) -> None:
    spill = RowSpill(tmp_path)
    rows = _rows()
    for key, row in rows.items():
        spill.write(key, row)
    for key in reversed(list(rows)):  # any order
        back = spill.read(key)
        assert back is not None
        assert back.dtype == rows[key].dtype and back.shape == rows[key].shape
        assert back.stride() == rows[key].stride(), key
        assert torch.equal(back, rows[key])
    assert spill.read(b"absent") is None
    assert spill.bytes == sum(row.numel() * row.element_size() for row in rows.values())
    assert not list(tmp_path.iterdir())  # the file is unlinked from the start: a killed run leaves nothing


def test_discard_and_close_forget_rows(tmp_path: Path) -> None:
    spill = RowSpill(tmp_path)
    spill.write(b"a", torch.ones(3))
    spill.write(b"b", torch.zeros(3))
    spill.discard(b"a")
    assert spill.read(b"a") is None and torch.equal(spill.read(b"b"), torch.zeros(3))
    assert spill.bytes == 12
    spill.close()
    assert spill.read(b"b") is None and spill.bytes == 0
    spill.write(b"c", torch.full((2,), 5.0))  # usable again after close: a new file
    assert torch.equal(spill.read(b"c"), torch.full((2,), 5.0))


def test_a_memo_past_its_budget_keeps_rows_on_disk(tmp_path: Path) -> None:
    memo = RowMemo(max_bytes=2 * 4 * 4, spill=RowSpill(tmp_path))  # two rows of four float32 in memory
    for i in range(5):
        memo.put(bytes([i]), torch.full((4,), float(i)))
    assert list(memo.rows) == [bytes([3]), bytes([4])] and memo.bytes == 32
    assert memo.spill is not None and set(memo.spill.placed) == {bytes([i]) for i in range(3)}
    for i in range(5):
        assert torch.equal(memo.get(bytes([i])), torch.full((4,), float(i)))
    calls: list[list[int]] = []
    fetched = memo.fetch([bytes([0]), b"new"], lambda missing: calls.append(missing) or [torch.zeros(4)])
    assert calls == [[1]] and torch.equal(fetched[0], torch.zeros(4))  # row 0 from disk, only the new one computed
    memo.discard([bytes([0]), bytes([4])])
    assert memo.get(bytes([0])) is None and memo.get(bytes([4])) is None
    memo.close()
    assert not memo.rows and memo.get(bytes([1])) is None


def test_an_encoding_memo_spills_by_default_and_clear_drops_the_files(tmp_path: Path) -> None:
    memo = EncodingMemo(max_bytes=16, spill_dir=tmp_path)
    tower = memo.tower("t")
    for i in range(4):
        tower.put(bytes([i]), torch.full((4,), float(i)))
    assert tower.spill is not None and len(tower.spill.placed) == 3
    memo.clear()
    assert not memo.towers and tower.spill.bytes == 0 and tower.spill._file is None
    restored = pickle.loads(pickle.dumps(EncodingMemo(max_bytes=16, spill=False, spill_dir=tmp_path)))
    assert (restored.max_bytes, restored.spill, restored.spill_dir) == (16, False, str(tmp_path))
    assert EncodingMemo(spill=False).tower("t").spill is None


def test_a_folder_it_cannot_write_to_is_named_in_the_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    memo = RowMemo(max_bytes=0, spill=RowSpill(missing))
    with pytest.raises(MemoSpillError, match=f"cannot write encoding-memo rows to {missing}.*TMPDIR"):
        memo.put(b"a", torch.ones(4))
