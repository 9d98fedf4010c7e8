"""Rows of a cache table read from its shard files give what the stacked table gives, bit for bit."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clipdistill.distill.cache.format import CacheCorruptError
from clipdistill.distill.cache.reader import stack_shards
from clipdistill.distill.cache.shard_rows import ShardRows


def _shards(tmp_path: Path, dtype: torch.dtype = torch.float32) -> tuple[list[Path], torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    whole = (torch.randn(23, 3, 5, generator=generator) * 100).to(dtype)
    files = []
    for index, (start, stop) in enumerate([(0, 10), (10, 11), (11, 23)]):  # a one-row shard in the middle
        file = tmp_path / f"part_{index}.safetensors"
        save_file({"states": whole[start:stop].contiguous(), "other": torch.zeros(stop - start)}, str(file))
        files.append(file)
    return files, whole


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_any_index_reads_the_rows_of_the_stacked_table(tmp_path: Path, dtype: torch.dtype) -> None:
    files, whole = _shards(tmp_path, dtype)
    table = ShardRows(files, "states")
    assert table.shape == whole.shape and len(table) == 23 and table.dtype == dtype
    assert torch.equal(stack_shards(files, "states"), whole)
    for index in (
        torch.tensor([0, 9, 10, 11, 22]),  # every shard boundary
        torch.tensor([5, 5, 3, 21, 10]),  # repeats, any order
        torch.arange(23).flip(0),
        torch.tensor([[8, 9, 10], [10, 11, 12]]),  # 2-D: runs across shards
        torch.tensor([], dtype=torch.long),
    ):
        assert torch.equal(table[index], whole[index]), index
        if index.dim() == 1:
            assert torch.equal(table.index_select(0, index), whole.index_select(0, index))
    assert torch.equal(table.load_all(), whole) and table.to("cpu") is table


def test_out_of_range_rows_and_a_missing_tensor_are_refused(tmp_path: Path) -> None:
    files, _ = _shards(tmp_path)
    table = ShardRows(files, "states")
    with pytest.raises(IndexError, match=r"out of range 0\.\.22"):
        table[torch.tensor([23])]
    with pytest.raises(CacheCorruptError, match="no readable tensor 'tokens'"):
        ShardRows(files, "tokens")
    with pytest.raises(CacheCorruptError, match="no shard holds"):
        ShardRows([], "states")


def test_a_truncated_shard_is_a_clear_error(tmp_path: Path) -> None:
    files, _ = _shards(tmp_path)
    data = files[2].read_bytes()
    files[2].write_bytes(data[: len(data) - 40])
    table = ShardRows(files, "states")
    with pytest.raises(CacheCorruptError, match="ends before row"):
        table[torch.tensor([22])]


def test_a_pickled_table_opens_its_own_files(tmp_path: Path) -> None:
    files, whole = _shards(tmp_path)
    table = ShardRows(files, "states")
    table[torch.tensor([1])]  # opens the first shard
    copy = pickle.loads(pickle.dumps(table))
    assert not copy._handles and torch.equal(copy[torch.tensor([4, 15])], whole[[4, 15]])
    table.close()
    assert not table._handles
