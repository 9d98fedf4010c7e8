"""One tensor of a teacher cache, its rows read from the shard files when a batch asks for them.

Why: the fusion states (and token features) of a cache are hundreds of bytes to tens of KB per
row, 0.7 GB for the emoji train split with a fusion teacher, and grow with the images; a student
reads a batch's rows per step, so holding the whole table in memory only adds to every student's
peak. Rows are read with ``os.preadv`` from the page cache (a 128-row batch is a few MB). The
safetensors library reads tensors whole or through a memory map, and mapped pages that training
touches count as the process's resident memory until the file is closed, so the reader parses the
format's header (8-byte little-endian length, then JSON with each tensor's dtype, shape and byte
range) and reads the byte ranges itself.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch

from clipdistill.distill.cache.format import CacheCorruptError
from clipdistill.io import pread_exactly

#: safetensors dtype names -> torch dtypes (the ones a cache writes, and their neighbours).
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class _Part:
    file: Path
    offset: int  # of the tensor's first byte in the file
    rows: int


def tensor_location(file: Path, name: str) -> tuple[torch.dtype, tuple[int, ...], int]:
    """``(dtype, shape, byte offset)`` of tensor ``name`` in the safetensors file ``file``."""
    with open(file, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        try:
            header = json.loads(handle.read(size))
            entry = header[name]
            dtype = DTYPES[entry["dtype"]]
            begin, end = (int(v) for v in entry["data_offsets"])
            shape = tuple(int(v) for v in entry["shape"])
        except (ValueError, KeyError, TypeError) as error:
            raise CacheCorruptError(f"teacher cache shard {file}: no readable tensor {name!r} ({error})") from error
    expected = dtype.itemsize * int(torch.Size(shape).numel())
    if end - begin != expected:
        raise CacheCorruptError(
            f"teacher cache shard {file}: tensor {name!r} spans {end - begin} bytes, not {expected}"
        )
    return dtype, shape, 8 + size + begin


class ShardRows:
    """Tensor ``name`` of ``files`` (rows in file order) as one table whose rows are read on
    request: ``table[index]`` and ``table.index_select(0, index)`` give what the same indexing of
    the stacked tensor gives, bit for bit."""

    def __init__(self, files: Sequence[Path], name: str) -> None:
        if not files:
            raise CacheCorruptError(f"no shard holds {name!r}; rebuild the cache")
        parts, row_shape, dtype = [], None, None
        for file in files:
            file_dtype, shape, offset = tensor_location(Path(file), name)
            if row_shape is None:
                row_shape, dtype = shape[1:], file_dtype
            elif (shape[1:], file_dtype) != (row_shape, dtype):
                raise CacheCorruptError(f"teacher cache shard {file}: {name!r} is {file_dtype} {shape}, unlike its kin")
            parts.append(_Part(Path(file), offset, shape[0]))
        assert row_shape is not None and dtype is not None
        self.name = name
        self.parts = parts
        self.dtype = dtype
        self.row_shape = row_shape
        self.row_bytes = dtype.itemsize * int(torch.Size(row_shape).numel())
        self.starts = [0]
        for part in parts:
            self.starts.append(self.starts[-1] + part.rows)
        self._handles: dict[Path, IO[bytes]] = {}

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.starts[-1], *self.row_shape))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_handles": {}}  # open files stay with their process

    def to(self, device: str | torch.device) -> ShardRows | torch.Tensor:
        """Itself on the CPU (rows stay on disk); on an accelerator the whole table, moved there
        once, so that a step gathers its rows on the device without a host copy."""
        if torch.device(device).type == "cpu":
            return self
        return self.load_all().to(device)

    def load_all(self) -> torch.Tensor:
        """Every row as one tensor."""
        return self[torch.arange(len(self))]

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        if dim != 0:
            raise ValueError(f"{self.name}: rows are selected along dim 0, not {dim}")
        return self[index]

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        """Rows at ``index`` (any shape), shaped ``(*index.shape, *row_shape)``."""
        wanted = index.reshape(-1).to("cpu")
        if wanted.numel() and (int(wanted.min()) < 0 or int(wanted.max()) >= len(self)):
            raise IndexError(f"{self.name}: row index out of range 0..{len(self) - 1}")
        unique = torch.unique(wanted)  # sorted: runs of consecutive rows are read at once
        rows = torch.empty((len(unique), *self.row_shape), dtype=self.dtype)
        flat = rows.view(len(unique), -1).view(torch.uint8) if len(unique) else rows
        position = 0
        for first, count in _runs(unique.tolist()):
            self._read(first, count, flat[position : position + count])
            position += count
        picked = rows[torch.searchsorted(unique, wanted)]
        return picked.reshape(*index.shape, *self.row_shape)

    def _read(self, first: int, count: int, into: torch.Tensor) -> None:
        """Rows [first, first + count) into ``into`` (count rows of bytes), across shards."""
        done = 0
        while done < count:
            row = first + done
            part_index = bisect.bisect_right(self.starts, row) - 1
            part = self.parts[part_index]
            local = row - self.starts[part_index]
            take = min(count - done, part.rows - local)
            target = memoryview(into[done : done + take].numpy()).cast("B")
            offset = part.offset + local * self.row_bytes
            if not pread_exactly(self._handle(part.file).fileno(), target, offset):
                raise CacheCorruptError(f"teacher cache shard {part.file} ends before row {local} of {self.name!r}")
            done += take

    def _handle(self, file: Path) -> IO[bytes]:
        if file not in self._handles:
            self._handles[file] = open(file, "rb")  # noqa: SIM115 (kept open while the table is read)
        return self._handles[file]

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def _runs(sorted_rows: list[int]) -> list[tuple[int, int]]:
    """``(first, count)`` of each run of consecutive values in ``sorted_rows``."""
    runs: list[tuple[int, int]] = []
    for row in sorted_rows:
        if runs and runs[-1][0] + runs[-1][1] == row:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((row, 1))
    return runs
