"""Peak resident memory of this process, per stage of a run.

A run's stages differ in what they hold (decoded images, a teacher, a cache, a student), and a
user sizing a machine needs the largest of them, not only the run's overall peak. On Linux the
kernel's high-water mark of resident memory (``VmHWM`` in ``/proc/self/status``) can be reset by
writing ``5`` to ``/proc/self/clear_refs``, so each stage's own peak is measured exactly. Where
that is not possible (another OS, a kernel that refuses the write), each stage reports the
process's running peak instead and ``per_stage`` says ``"cumulative"``. No library exposes the
reset (psutil reads VmHWM but cannot clear it), hence this module.

The reset lowers the high-water mark the kernel later reports as the process's ``ru_maxrss``
(what ``/usr/bin/time`` prints), so after a run that used it only these per-stage figures hold
the run's peak.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _high_water_mb() -> float | None:
    """VmHWM in MiB, or None where /proc does not give it."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        return None
    return None


def _running_peak_mb() -> float:
    """The process's peak resident memory since it started (ru_maxrss: kB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def _reset_high_water() -> bool:
    """Reset VmHWM to the current resident size; whether the kernel allowed it."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _high_water_mb() is not None


def release_free_memory() -> bool:
    """Hand the heap's free pages back to the OS (glibc's ``malloc_trim``); whether it could.

    glibc keeps memory a stage freed inside its heaps, so the next stage starts from the previous
    one's high-water mark of resident memory rather than from what is alive. Trimming between
    stages makes each stage's figure its own and lowers the run's peak. Only glibc has
    ``malloc_trim``; elsewhere this is a no-op that returns False."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()  # objects in reference cycles (autograd graphs, closures) free their tensors first
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):  # musl and other C libraries have no malloc_trim
        return False


class StagePeaks:
    """Peak resident memory (MiB) of each named stage, and of the whole run.

    Use ``with peaks.stage("teacher"): ...`` around each stage; a name used twice keeps the
    larger peak. Only this process is measured: worker processes (image decoding) are not. After
    each stage the heap's free pages go back to the OS (:func:`release_free_memory`)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock  # wall seconds per stage; a test hands its own
        self.stages: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.exact = True
        self._overall = 0.0

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.exact = _reset_high_water() and self.exact
        started = self.clock()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + self.clock() - started
            peak = _high_water_mb() if self.exact else None
            value = _running_peak_mb() if peak is None else peak
            self.stages[name] = max(self.stages.get(name, 0.0), value)
            self._overall = max(self._overall, value)
            release_free_memory()  # the next stage starts from what is alive, not from this peak

    def report(self) -> dict[str, Any]:
        """``{"peak_rss_mb", "per_stage": "reset" | "cumulative", "stages": {name: MiB},
        "seconds": {name: wall seconds}}``: a stage entered twice sums its seconds, so a user sees
        where a run's time goes beside where its memory goes (``benchmarks/growth.py`` reads both)."""
        return {
            "peak_rss_mb": round(self._overall, 1),
            "per_stage": "reset" if self.exact else "cumulative",
            "stages": {name: round(value, 1) for name, value in self.stages.items()},
            "seconds": {name: round(value, 1) for name, value in self.seconds.items()},
        }
