"""Images inside webdataset shards, addressed as member paths ``SHARD.tar/MEMBER``.

:func:`~clipdistill.data.wds.read_wds` gives each image such a path so nothing is extracted to
disk; the dataset model (missing-file checks), the image decoder and the service read them
through here. It imports no other part of ``data``, so none of those depends on the wds reader.
"""

from __future__ import annotations

import tarfile
from functools import lru_cache
from pathlib import Path


def split_member_path(path: str | Path) -> tuple[Path, str] | None:
    """``(shard, member)`` for a path ``.../NAME.tar/MEMBER``, else ``None``."""
    parts = Path(path).parts
    for index in range(len(parts) - 1, 0, -1):
        if parts[index - 1].endswith(".tar"):
            return Path(*parts[:index]), "/".join(parts[index:])
    return None


@lru_cache(maxsize=64)
def _member_index(shard: str, mtime: float) -> dict[str, tuple[int, int]]:
    """Member name -> (data offset, size), read once per shard version."""
    with tarfile.open(shard, "r") as tar:
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}


def read_member(path: str | Path) -> bytes | None:
    """The bytes of a tar member path, or ``None`` if ``path`` is not one / does not exist."""
    located = split_member_path(path)
    if located is None:
        return None
    shard, member = located
    if not shard.is_file():
        return None
    index = _member_index(str(shard), shard.stat().st_mtime)
    if member not in index:
        return None
    offset, size = index[member]
    with open(shard, "rb") as handle:
        handle.seek(offset)
        return handle.read(size)


def member_exists(path: str | Path) -> bool:
    located = split_member_path(path)
    if located is None or not located[0].is_file():
        return False
    shard, member = located
    return member in _member_index(str(shard), shard.stat().st_mtime)
