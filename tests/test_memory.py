"""Per-stage peak resident memory: a stage that allocates shows it, the next one does not."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from clipdistill.memory import StagePeaks, release_free_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the per-stage reset is Linux's /proc")
def test_each_stage_reports_its_own_peak() -> None:
    peaks = StagePeaks()
    with peaks.stage("big"):
        block = np.ones(300 * 1024 * 1024 // 8)  # 300 MiB, touched
        del block
    with peaks.stage("small"):
        np.ones(1024).sum()
    report = peaks.report()
    assert report["per_stage"] == "reset"
    assert report["stages"]["big"] - report["stages"]["small"] > 250
    assert report["peak_rss_mb"] == report["stages"]["big"]
    assert set(report["seconds"]) == {"big", "small"} and report["seconds"]["big"] >= 0.0


def test_a_stage_entered_twice_sums_its_seconds() -> None:
    clock = iter([10.0, 12.5, 20.0, 21.0])
    peaks = StagePeaks(clock=lambda: next(clock))
    with peaks.stage("students"):
        pass
    with peaks.stage("students"):
        pass
    assert peaks.report()["seconds"] == {"students": 3.5}


def test_without_a_reset_each_stage_reports_the_running_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    import clipdistill.memory as memory

    monkeypatch.setattr(memory, "_reset_high_water", lambda: False)
    peaks = StagePeaks()
    with peaks.stage("a"):
        pass
    with peaks.stage("b"):
        pass
    report = peaks.report()
    assert report["per_stage"] == "cumulative"
    assert report["stages"]["b"] >= report["stages"]["a"] > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc are Linux's")
def test_freed_heap_memory_goes_back_to_the_os() -> None:
    """Small blocks freed around survivors stay resident under glibc until trimmed: without the
    release every later stage would start from this one's peak."""
    import re

    def resident_mb() -> float:
        return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024

    blocks = [bytearray(1000) for _ in range(200_000)]  # ~200 MB of heap, below mmap's threshold
    survivors = blocks[::100]  # fragment the heap: it cannot shrink from the top alone
    del blocks
    freed = resident_mb()
    assert release_free_memory()
    assert resident_mb() < freed - 100
    assert len(survivors) == 2000
