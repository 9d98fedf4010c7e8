"""Per-stage peak resident memory: a stage that allocates shows it, the next one does not."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from clipdistill.memory import StagePeaks


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
