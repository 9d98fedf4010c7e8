"""``DecodeBudget``: how many bytes of decoded query pixels may exist at once.

A 150 kB PNG can claim 6,000 x 6,000 pixels; decoded and converted that is hundreds of MB, so
the number of concurrent decodes, not the number of requests, decides the server's memory.
Each decode reserves its estimated cost before it starts and waits while the budget is spent;
an image costing more than the whole budget waits until it is alone.

Written here because the standard library's semaphores count permits, not weights; this is a
weighted semaphore in a dozen lines over ``threading.Condition``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

# Bytes per pixel Pillow stores for a mode (RGB is kept as 4 bytes per pixel internally).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}


def decode_cost(width: int, height: int, mode: str) -> int:
    """Bytes a decode plus ``to_rgb`` may hold at its peak, generously: the decoded image, plus
    two full copies (an EXIF-rotated one and the RGB conversion) for plain modes, or five
    (RGBA copy, white background, composite, rotation, RGB) for modes with transparency, a
    palette, 16 bits or floats (their scaling to 8 bits also goes through wide intermediates).
    An upper bound by design: it stays above a real decode's peak (docs/results.md, "Search
    service")."""
    decoded = _MODE_BYTES.get(mode, 4)
    extra = 8 if mode in ("RGB", "L", "1", "CMYK", "YCbCr", "LAB", "HSV") else 20
    return width * height * (decoded + extra)


class DecodeBudget:
    """A weighted semaphore over bytes (thread-safe; used from the search executor)."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"decode budget must be positive, got {capacity}")
        self.capacity = capacity
        self.in_use = 0
        self.peak = 0
        self._changed = threading.Condition()

    @contextmanager
    def reserve(self, cost: int) -> Iterator[None]:
        cost = max(1, min(cost, self.capacity))  # over the whole budget: wait to be alone
        with self._changed:
            self._changed.wait_for(lambda: self.in_use + cost <= self.capacity)
            self.in_use += cost
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            with self._changed:
                self.in_use -= cost
                self._changed.notify_all()


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def return_freed_pixels_to_the_os(threshold: int = 1 << 20) -> bool:
    """Make glibc map every allocation of ``threshold`` bytes or more on its own and unmap it
    when freed; True when set, False where the C library has no ``mallopt`` (not glibc).

    Why: Pillow allocates image memory in blocks of up to 16 MiB through malloc. glibc's default
    (a dynamic mmap threshold that rises to the size of the last freed block) serves them from
    per-thread arenas that keep freed memory, so after N search threads have each decoded one
    36-megapixel image the process holds N of them, although the budget let only one exist at a
    time (benchmarks/serve_memory.py; docs/results.md, "Search service").
    A fixed threshold turns the dynamic rule off. Called by ``clipdistill serve`` (the process
    is the server); a library user embedding ``create_app`` decides for their own process.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))
