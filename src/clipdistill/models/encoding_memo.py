"""Per-row outputs of frozen towers, shared by the stages a run hands one memo to.

Why: one ``distill`` run (and one ``cache build`` with a fusion teacher) encodes the same images
and captions with the same frozen weights several times: teacher training, the fusion teacher's
encoding, the cache's dual pass and its fusion pass. On 2 CPU cores each pass of the Lite0
trunk's frozen stages over the train split costs about two minutes, and each MiniLM pass over
its captions about one. A frozen tower's output is a pure function of its input row, so rows
are keyed by their content (plus the tower's identity) and computed once. No library memoises
a module's forward per input row, hence this small module.

An :class:`EncodingMemo` is an object, never a global: whoever runs the stages makes one and
hands it to the models that may read it (:func:`attach_encoding_memo`); a model without one
computes every row. The ``distill`` job (demo.py) makes one for its teacher, fusion and cache
stages and another for its students; ``cache build`` makes its own; a student's training takes
one or makes its own.

Readers: :class:`~clipdistill.models.text_minilm.MiniLMTextEncoder` (hidden states per token
row) and :class:`~clipdistill.models.lit.LiTModel` (its frozen trunk stages and, without
gradients, its whole trunk per image), when a memo is attached; a student's frozen trunk
stages (models/trunk_split.py: the ONNX Runtime graph gives a row the same bits whatever its
batch) and the fusion teacher's dense logits grids (models/fusion/base.py: the same states give
the same computation), whose rows are exact.

A MiniLM or LiT row first met in another batch can differ from a fresh forward in the last
float bits (different padding or batch size), which bitwise-exact training resume must not see,
so a student's trainer never attaches a memo to its teachers' towers.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from clipdistill.models.row_spill import RowSpill

#: Rows per tower kept in memory; the least recently used beyond it go to the tower's spill file
#: (models/row_spill.py), so what a run holds does not grow with its images. 64 MiB is one batch
#: of 256 of Lite0's whole-trunk rows at 224 px (245 KB per image view): a row is read back from
#: the page cache for the cost of a copy, so a larger budget only held memory (0.7 GB at 256 MiB
#: across the teacher's three towers).
DEFAULT_MAX_BYTES = 64 << 20


class RowMemo:
    """Tensors per row key, least recently used moved out first once ``max_bytes`` is exceeded:
    to ``spill`` (on disk, read back on request) when given, else dropped."""

    def __init__(self, max_bytes: int, spill: RowSpill | None = None) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.rows: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.spill = spill

    def get(self, key: bytes) -> torch.Tensor | None:
        value = self.rows.get(key)
        if value is not None:
            self.rows.move_to_end(key)
            return value
        # a spilled row is read back, not moved in: it would only push another row out
        return self.spill.read(key) if self.spill is not None else None

    def put(self, key: bytes, value: torch.Tensor) -> None:
        if key in self.rows or (self.spill is not None and key in self.spill):
            return
        self.rows[key] = value
        self.bytes += value.numel() * value.element_size()
        while self.bytes > self.max_bytes and self.rows:
            oldest = next(iter(self.rows))  # the least recently used
            if self.spill is not None:
                self.spill.write(oldest, self.rows[oldest])
            self._remove(oldest)

    def discard(self, keys: list[bytes]) -> None:
        """Drop the rows of ``keys`` (those present): rows no reader will ask for again."""
        for key in keys:
            if key in self.rows:
                self._remove(key)
            if self.spill is not None:
                self.spill.discard(key)

    def close(self) -> None:
        """Drop every row, in memory and on disk."""
        self.rows.clear()
        self.bytes = 0
        if self.spill is not None:
            self.spill.close()

    def _remove(self, key: bytes) -> None:
        dropped = self.rows.pop(key)
        self.bytes -= dropped.numel() * dropped.element_size()

    def fetch(self, keys: list[bytes], compute: Callable[[list[int]], list[torch.Tensor]]) -> list[torch.Tensor]:
        """The row of every key: memoised ones from the memo, the others from ``compute``
        (given the positions of the rows to compute, a repeated key only once; it returns one
        tensor per position, which is stored). Rows computed here are returned even if storing
        them evicted them again (a memo smaller than the batch)."""
        found = [self.get(key) for key in keys]
        first = {key: i for i, key in reversed(list(enumerate(keys)))}
        missing = [i for i, value in enumerate(found) if value is None and first[keys[i]] == i]
        fresh: dict[bytes, torch.Tensor] = {}
        if missing:
            for i, value in zip(missing, compute(missing), strict=True):
                fresh[keys[i]] = value
                self.put(keys[i], value)
        return [value if value is not None else fresh[key] for value, key in zip(found, keys, strict=True)]


class EncodingMemo:
    """The rows of every frozen tower one run's stages share: a :class:`RowMemo` per tower key,
    each with ``max_bytes`` in memory and the rest in a spill file under ``spill_dir`` (default:
    ``TMPDIR``); ``spill=False`` drops rows past ``max_bytes`` instead (computed again if asked).

    A cache, not model state: a copy of a model (``copy.deepcopy``) shares its memo, and a
    pickled one starts with an empty memo."""

    def __init__(
        self, max_bytes: int = DEFAULT_MAX_BYTES, *, spill: bool = True, spill_dir: str | os.PathLike[str] | None = None
    ) -> None:
        self.max_bytes = max_bytes
        self.spill = spill
        self.spill_dir = None if spill_dir is None else str(spill_dir)
        self.towers: dict[str, RowMemo] = {}

    def tower(self, key: str, max_bytes: int | None = None) -> RowMemo:
        """The memo of ``key`` (a name of the frozen weights), created on first use with
        ``max_bytes`` (default: this memo's)."""
        if key not in self.towers:
            spill = RowSpill(self.spill_dir) if self.spill else None
            self.towers[key] = RowMemo(self.max_bytes if max_bytes is None else max_bytes, spill)
        return self.towers[key]

    def clear(self) -> None:
        """Drop every row, in memory and on disk (once the passes that share them are over)."""
        for tower in self.towers.values():
            tower.close()
        self.towers.clear()

    def __deepcopy__(self, memo: dict[int, Any]) -> EncodingMemo:
        return self

    def __getstate__(self) -> dict[str, Any]:
        return {"max_bytes": self.max_bytes, "spill": self.spill, "spill_dir": self.spill_dir, "towers": {}}


def attach_encoding_memo(model: nn.Module, memo: EncodingMemo | None) -> nn.Module:
    """Hand ``memo`` to every module of ``model`` that reads one (a class with an
    ``encoding_memo`` attribute: the MiniLM tower, the LiT teacher, an open_clip model, the
    fusion teacher), nested ones included; ``None`` takes it away. Returns ``model``."""
    for module in model.modules():
        if hasattr(type(module), "encoding_memo"):
            module.encoding_memo = memo
    return model


def traced() -> bool:
    """Whether a graph is being traced or compiled (an exported graph must hold the
    computation, not a lookup or an ONNX Runtime call)."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def usable_memo(memo: EncodingMemo | None) -> EncodingMemo | None:
    """``memo``, unless a graph is being traced (then ``None``: compute the rows)."""
    return None if memo is None or traced() else memo


def tensor_key(tensor: torch.Tensor) -> bytes:
    """A content key for one row: its shape, dtype and bytes, hashed (a 600 KB image row hashes
    in well under a millisecond, against ~20 ms for the frozen stages it stands for)."""
    row = tensor.detach().to("cpu").contiguous()
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{tuple(row.shape)}|{row.dtype}".encode())
    digest.update(row.numpy().tobytes() if row.dtype != torch.bfloat16 else row.float().numpy().tobytes())
    return digest.digest()


def module_key(name: str, modules: list[torch.nn.Module]) -> str:
    """A key for a frozen tower: ``name`` plus a hash of its parameters and buffers, so two
    instances with the same weights share rows and a reloaded or changed tower does not."""
    digest = hashlib.blake2b(digest_size=16)
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return f"{name}:{digest.hexdigest()}"
