"""The demo report's plots: training curves grouped by method, seeds averaged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from clipdistill.report import curves_by_method, plot_curves, plot_pareto, results_table, shared_latency

METRICS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10")


def _student(tmp_path: Path, method: str, seed: int, rsums: list[float], image_ms: float = 2.0) -> dict[str, Any]:
    run = tmp_path / f"{method}-s{seed}"
    run.mkdir()
    lines = [json.dumps({"epoch": epoch, "val": {"rsum": rsum}}) for epoch, rsum in enumerate(rsums, start=1)]
    (run / "results.jsonl").write_text("\n".join(lines) + "\n")
    latency = {"image_b1": image_ms, "text_b1": 1.0, "image_b64": 20.0, "text_b64": 10.0}
    metrics = {**dict.fromkeys(METRICS, rsums[-1] / 6), "rsum": rsums[-1]}
    return {
        "method": method,
        "seed": seed,
        "run_dir": str(run),
        "metrics": metrics,
        "latency_ms": latency,
        "params": {"total": 1_000_000},
        "flops": {"image": 5, "text": 3},
    }


@pytest.fixture
def report(tmp_path: Path) -> dict[str, Any]:
    students = [
        _student(tmp_path, "clip", 0, [10.0, 20.0, 30.0], image_ms=9.0),  # a measurement the OS slowed
        _student(tmp_path, "clip", 1, [14.0, 24.0]),  # stopped after epoch 2
        _student(tmp_path, "dcd", 0, [5.0, 6.0, 7.0]),
    ]
    teacher = {
        "spec": "run:teacher",
        "metrics": {**dict.fromkeys(METRICS, 15.0), "rsum": 90.0},
        "latency_ms": {"image_b1": 30.0, "text_b1": 5.0},
        "params": {"total": 9_000_000},
    }
    summary = [
        {"method": "clip", "rsum_mean": 27.0, "rsum_std": 3.0, "n_seeds": 2},
        {"method": "dcd", "rsum_mean": 7.0, "rsum_std": 0.0, "n_seeds": 1},
    ]
    budget = {"seeds": 2, "student": "tiny", "epochs": 3, "batch_size": 8, "lr": 0.001, "k_augmentations": 1}
    report = {"dataset": "toy", "students": students, "teacher": teacher, "budget": budget, "summary": summary}
    return {**report, "n_images": 3, "n_texts": 6}


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


def test_students_of_one_network_share_the_median_latency(report: dict[str, Any]) -> None:
    """Single latency measurements of the same network differ only by timing noise (9, 2 and 2
    ms per image here); every method row gets their median, 2 + 1 ms per pair, not the 9 + 1
    of clip's first seed."""
    (latency,) = shared_latency(report["students"]).values()
    assert latency["image_b1"] == 2.0 and latency["text_b1"] == 1.0
    table = results_table(report)
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert len(rows) == 2
    assert all(row.split(" | ")[-2] == "3.00" for row in rows), rows
    other = dict(report["students"][2], params={"total": 2_000_000})
    assert len(shared_latency([*report["students"][:2], other])) == 2  # another network: its own figure


def test_terminal_summary_shows_the_report_rows(
    report: dict[str, Any], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo's last table agrees with report.md: rsum and recalls averaged over seeds (clip:
    27.0 from 30 and 24), one latency for the shared network."""
    from clipdistill.cli.main import print_demo_summary

    monkeypatch.setenv("COLUMNS", "200")  # rich wraps cells in a narrow terminal

    report = {**report, "best_student": {"method": "clip", "seed": 0, "selected_by": "val rsum"}}
    print_demo_summary({**report, "deploy": {"index": "runs/x/index"}}, Path("runs/x"))
    out = capsys.readouterr().out.splitlines()
    rows = {line.split("│")[1].strip(): line for line in out if line.count("│") > 8}
    assert set(rows) == {"teacher", "clip", "dcd"}
    clip = [cell.strip() for cell in rows["clip"].split("│")[1:-1]]
    assert clip[1] == "4.5" and clip[5] == "27.0 ± 3.0" and clip[6] == "3.00", clip
