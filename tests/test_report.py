"""The demo report's plots: training curves grouped by method, seeds averaged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from clipdistill.report import curves_by_method, plot_curves, plot_pareto


def _student(tmp_path: Path, method: str, seed: int, rsums: list[float]) -> dict[str, Any]:
    run = tmp_path / f"{method}-s{seed}"
    run.mkdir()
    lines = [json.dumps({"epoch": epoch, "val": {"rsum": rsum}}) for epoch, rsum in enumerate(rsums, start=1)]
    (run / "results.jsonl").write_text("\n".join(lines) + "\n")
    latency = {"image_b1": 2.0 + seed, "text_b1": 1.0, "image_b64": 20.0, "text_b64": 10.0}
    return {"method": method, "seed": seed, "run_dir": str(run), "metrics": {"rsum": rsums[-1]}, "latency_ms": latency}


@pytest.fixture
def report(tmp_path: Path) -> dict[str, Any]:
    students = [
        _student(tmp_path, "clip", 0, [10.0, 20.0, 30.0]),
        _student(tmp_path, "clip", 1, [14.0, 24.0]),  # stopped after epoch 2
        _student(tmp_path, "dcd", 0, [5.0, 6.0, 7.0]),
    ]
    teacher = {"metrics": {"rsum": 90.0}, "latency_ms": {"image_b1": 30.0, "text_b1": 5.0}}
    return {"dataset": "toy", "students": students, "teacher": teacher, "budget": {"seeds": 2}}


def test_curves_average_seeds_over_the_epochs_all_of_them_reached(report: dict[str, Any]) -> None:
    curves = curves_by_method(report)
    assert list(curves) == ["clip", "dcd"]
    assert curves["clip"]["epochs"] == [1, 2]
    assert curves["clip"]["mean"] == pytest.approx([12.0, 22.0])
    assert [epochs for epochs, _ in curves["clip"]["runs"]] == [[1, 2, 3], [1, 2]]
    assert curves["dcd"]["epochs"] == [1, 2, 3] and curves["dcd"]["mean"] == pytest.approx([5.0, 6.0, 7.0])


def test_plots_are_written_as_images(report: dict[str, Any], tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    plot_curves(report, tmp_path / "curves.png")
    plot_pareto(report, tmp_path / "pareto.png")
    for name in ("curves.png", "pareto.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200
