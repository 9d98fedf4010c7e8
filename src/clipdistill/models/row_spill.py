"""Rows a :class:`~clipdistill.models.encoding_memo.RowMemo` moves out of memory, kept on disk.

Why: a run's memo holds every frozen row of the train split (the Lite0 trunk's last map is 245 KB
per image view at 224 px), so resident memory grew with the number of images and a memo capped
in memory evicted rows that later stages then computed again (the cache stage took 5x as long on
twice the images). Read back from the page cache, a row costs a memory copy instead of ~20 ms
of trunk. One unlinked temporary file per tower: the space is the operating system's to
reclaim when the file is closed or the process dies, so a killed run leaves nothing behind.
No library keeps tensors of many shapes in one append-only file with exact strides (safetensors
and numpy's memmap write whole files or one array), hence this small module.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import IO

import torch

from clipdistill.errors import UserError
from clipdistill.io import pread_exactly


class MemoSpillError(UserError, OSError):
    """The memo could not write a row to its spill folder (full disk, no permission)."""


@dataclass(frozen=True)
class _Placed:
    """Where a row lies in the file and how to rebuild the tensor: dtype, shape, and the
    dimension order in which its memory is laid out (a channels-last map keeps its strides)."""

    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    order: tuple[int, ...]


class RowSpill:
    """Append-only store of row tensors in one temporary file under ``directory`` (default: the
    system's temporary folder, ``TMPDIR``). Rows come back with the same dtype, shape, strides
    and bits; a discarded row's bytes stay in the file until it is closed."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = str(directory) if directory is not None else tempfile.gettempdir()
        self.placed: dict[bytes, _Placed] = {}
        self.bytes = 0  # bytes of the rows held (discarded ones not counted)
        self._end = 0
        self._file: IO[bytes] | None = None

    def __contains__(self, key: bytes) -> bool:
        return key in self.placed

    def write(self, key: bytes, row: torch.Tensor) -> None:
        """Keep ``row`` on disk under ``key`` (a key already there is left as it is)."""
        if key in self.placed:
            return
        order = _memory_order(row)
        dense = row.detach().to("cpu").permute(order).contiguous()
        payload = dense.reshape(-1).view(torch.uint8).numpy()
        try:
            handle = self._open()
            view, offset = memoryview(payload), self._end
            while view:
                written = os.pwrite(handle.fileno(), view, offset)
                view, offset = view[written:], offset + written
        except OSError as error:
            raise MemoSpillError(
                f"cannot write encoding-memo rows to {self.directory} ({error.strerror or error}); the run keeps "
                f"{self.bytes / 2**30:.1f} GiB of rows there: free space or point TMPDIR at a folder with room"
            ) from error
        self.placed[key] = _Placed(self._end, payload.nbytes, row.dtype, tuple(dense.shape), order)
        self._end += payload.nbytes
        self.bytes += payload.nbytes

    def read(self, key: bytes) -> torch.Tensor | None:
        """The row under ``key`` as a new tensor, or ``None`` when it is not here."""
        placed = self.placed.get(key)
        if placed is None:
            return None
        buffer = torch.empty(placed.nbytes, dtype=torch.uint8)
        assert self._file is not None
        if not pread_exactly(self._file.fileno(), memoryview(buffer.numpy()), placed.offset):
            raise MemoSpillError(f"encoding-memo spill file in {self.directory} ends inside the row at {placed.offset}")
        dense = buffer.view(placed.dtype).reshape(placed.shape)
        return dense.permute(_inverse(placed.order))

    def discard(self, key: bytes) -> None:
        placed = self.placed.pop(key, None)
        if placed is not None:
            self.bytes -= placed.nbytes

    def close(self) -> None:
        """Forget every row and give the file's space back."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.placed.clear()
        self.bytes = self._end = 0

    def _open(self) -> IO[bytes]:
        if self._file is None:
            # unlinked at once on POSIX: nothing is left behind, whatever ends the process
            self._file = tempfile.TemporaryFile(prefix="clipdistill-memo-", dir=self.directory)  # noqa: SIM115 (open for the memo's life)
        return self._file


def _memory_order(row: torch.Tensor) -> tuple[int, ...]:
    """The dimensions from the outermost to the innermost in memory (by stride, ties in order),
    so that permuting by it gives a contiguous tensor when ``row`` is dense."""
    strides = row.stride()
    return tuple(sorted(range(row.dim()), key=lambda d: (-strides[d], d)))


def _inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    inverse = [0] * len(order)
    for position, dim in enumerate(order):
        inverse[dim] = position
    return tuple(inverse)
