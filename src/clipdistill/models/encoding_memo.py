"""An opt-in, process-wide memo of frozen towers' per-row outputs, for no-grad encoding passes.

Why: one demo run (and one ``cache build`` with a fusion teacher) encodes the same images and
captions with the same frozen weights several times: teacher training, the fusion teacher's
encoding, the cache's dual pass and its fusion pass. On 2 CPU cores each pass of the Lite0
trunk's frozen stages over the train split costs about two minutes, and each MiniLM pass over
its captions about one. A frozen tower's output is a pure function of its input row, so rows
are keyed by their content (plus the tower's identity) and computed once. No library memoises
a module's forward per input row, hence this small module.

Users: :class:`~clipdistill.models.text_minilm.MiniLMTextEncoder` (hidden states per token row)
and :class:`~clipdistill.models.lit.LiTModel` (its frozen trunk stages per image), inside the
block. Outside it, two users whose rows are exact: a student's frozen trunk stages
(models/trunk_split.py: the ONNX Runtime graph gives a row the same bits whatever its batch) and
the fusion teacher's dense logits grids (models/fusion/base.py: the same states give the same
computation).

A row first met in another batch can differ from a fresh forward in the last float bits
(different padding or batch size), which bitwise-exact training resume must not see, so the
memo is only on inside :func:`encoding_memo` and the student trainer never opens one.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterator

import torch

#: Per tower. MiniLM: ~90k captions of 16 tokens; a demo run on the emoji set needs ~0.4 GiB.
#: Lite0's frozen stages at 224 px: 88 KB per image, ~6.5k images (2 views of train, val, test) ~0.6 GiB.
DEFAULT_MAX_BYTES = 2 << 30
_MEMOS: dict[str, RowMemo] = {}
_ACTIVE = [0]


class RowMemo:
    """Tensors per row key, least recently used evicted first once ``max_bytes`` is exceeded."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.rows: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    def get(self, key: bytes) -> torch.Tensor | None:
        value = self.rows.get(key)
        if value is not None:
            self.rows.move_to_end(key)
        return value

    def put(self, key: bytes, value: torch.Tensor) -> None:
        if key in self.rows:
            return
        self.rows[key] = value
        self.bytes += value.numel() * value.element_size()
        while self.bytes > self.max_bytes and self.rows:
            _, dropped = self.rows.popitem(last=False)
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


@contextlib.contextmanager
def encoding_memo() -> Iterator[None]:
    """Inside this block, frozen towers reuse the outputs of rows they have already encoded in
    this process (see the module docstring for who uses it and why it is opt-in)."""
    _ACTIVE[0] += 1
    try:
        yield
    finally:
        _ACTIVE[0] -= 1


def memo_active() -> bool:
    """Whether an :func:`encoding_memo` block is open and nothing is being traced or compiled
    (an exported graph must hold the computation, not a lookup)."""
    return bool(_ACTIVE[0]) and not torch.jit.is_tracing() and not torch.compiler.is_compiling()


def memo_for(tower: str, max_bytes: int = DEFAULT_MAX_BYTES) -> RowMemo:
    """The memo of ``tower`` (a key naming the frozen weights), created on first use."""
    return _MEMOS.setdefault(tower, RowMemo(max_bytes))


def clear_encoding_memos() -> None:
    """Drop every memoised row (frees the memory once the encoding passes are over)."""
    _MEMOS.clear()


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
