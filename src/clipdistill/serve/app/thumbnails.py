"""Reading a thumbnail without following links.

``Searcher.open`` has checked every ``thumbnail`` entry's spelling (relative, under
``thumbs/``) and that ``thumbs`` is not a link. A file inside the store can still be a link, or
be swapped for one after start-up, so each request walks the path from the index folder's real
location one component at a time with ``O_NOFOLLOW`` (a link anywhere is refused by the
kernel, not by a check that could race) and serves only a regular file.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = os.O_NOFOLLOW  # POSIX; the service does not run where the kernel cannot refuse links
_DIRECTORY = os.O_DIRECTORY


class ThumbnailError(OSError):
    """A thumbnail that is missing, a link, not a regular file, or too large."""


def read_thumbnail(root: Path, name: str, max_bytes: int) -> bytes:
    """The bytes of ``root/name`` (``name`` relative, ``/``-separated), opened component by
    component relative to ``root`` with ``O_NOFOLLOW``."""
    parts = name.split("/")
    fd = os.open(root, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
    try:
        for part in parts[:-1]:
            inner = os.open(part, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = inner
        # O_NONBLOCK: a FIFO planted in the store must not block the open
        file_fd = os.open(parts[-1], os.O_RDONLY | _NOFOLLOW | _CLOEXEC | os.O_NONBLOCK, dir_fd=fd)
    finally:
        os.close(fd)
    with os.fdopen(file_fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ThumbnailError(f"{name} is not a regular file")
        if info.st_size > max_bytes:
            raise ThumbnailError(f"{name} is {info.st_size} bytes, over the {max_bytes}-byte thumbnail limit")
        return handle.read(max_bytes + 1)[:max_bytes]
