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
    from clipdistill.cli.distill_cmd import print_run_summary as print_demo_summary

    monkeypatch.setenv("COLUMNS", "200")  # rich wraps cells in a narrow terminal

    report = {**report, "best_student": {"method": "clip", "seed": 0, "selected_by": "val rsum"}}
    print_demo_summary({**report, "deploy": {"index": "runs/x/index"}}, Path("runs/x"))
    out = capsys.readouterr().out.splitlines()
    rows = {line.split("│")[1].strip(): line for line in out if line.count("│") > 8}
    assert set(rows) == {"teacher", "clip", "dcd"}
    clip = [cell.strip() for cell in rows["clip"].split("│")[1:-1]]
    assert clip[1] == "4.5" and clip[5] == "27.0 ± 3.0" and clip[6] == "3.00", clip


def _onnx(image_b1: float, text_b1: float, image_b64: float, text_b64: float) -> dict[str, Any]:
    """The ONNX figures the demo's efficiency stage writes under an entry."""
    ms = {"image_b1": image_b1, "text_b1": text_b1, "image_b64": image_b64, "text_b64": text_b64}
    return {
        "onnx_ms": ms,
        "flops_per_item": {"image": 4_000_000, "text": 1_000_000},
        "peak_share": {key: 0.25 for key in ms},
    }


@pytest.fixture
def onnx_report(report: dict[str, Any]) -> dict[str, Any]:
    """``report`` after the ONNX stage: the teacher takes 8 + 2 ms per image + caption at batch 1
    and 3 + 1 ms per item at batch 64; every student 0.8 + 0.2 and 0.15 + 0.05 (one network);
    the eager latency_ms stays and says something else (35 ms vs 3 ms: 11.7x)."""
    teacher = {**report["teacher"], **_onnx(8.0, 2.0, 3.0, 1.0)}
    students = [{**student, **_onnx(0.8, 0.2, 0.15, 0.05)} for student in report["students"]]
    efficiency = {"matmul_peak_gflops": 123.4, "threads": 2, "repeats": 30, "measured_utc": "2026-12-01 13:00"}
    return {**report, "teacher": teacher, "students": students, "efficiency": efficiency}


def test_table_latency_and_speedup_come_from_onnx_ms(onnx_report: dict[str, Any]) -> None:
    """Teacher / student per image + caption: 10 / 1 = 10.0x at batch 1, 4 / 0.2 = 20.0x at
    batch 64, not the eager 11.7x; the intro line says how it was measured."""
    table = results_table(onnx_report)
    header = next(line for line in table.splitlines() if line.startswith("| model"))
    assert header.endswith("| params (M) | ms b1 | ms b64 | speed-up b1 | speed-up b64 |"), header
    separator = table.splitlines()[3]
    assert separator.count("---") == header.count("|") - 1
    cells = {line.split(" | ")[0]: line.rstrip(" |").split(" | ")[-4:] for line in table.splitlines()[4:]}
    assert cells["| teacher `run:teacher`"] == ["10.00", "4.00", "1.0x", "1.0x"]
    assert cells["| `clip`"] == ["1.00", "0.20", "10.0x", "20.0x"]
    assert cells["| `dcd`"] == ["1.00", "0.20", "10.0x", "20.0x"]
    intro = table.splitlines()[0]
    for words in ("ONNX Runtime fp32", "2 thread(s)", "median of 30 repeats", "interleaved", "123.4 GFLOP/s"):
        assert words in intro, words
    assert "eager" not in table and "11.7x" not in table


def test_efficiency_section_lists_work_and_peak_share(onnx_report: dict[str, Any]) -> None:
    from clipdistill.report import efficiency_lines, method_rows

    lines = efficiency_lines(onnx_report, method_rows(onnx_report))
    assert "## Efficiency" in lines and any("123.4 GFLOP/s" in line for line in lines)
    teacher = next(line for line in lines if line.startswith("| teacher"))
    assert teacher == "| teacher `run:teacher` | 4.0 | 1.0 | 8.000 | 2.000 | 3.000 | 1.000 | 25.0% | 25.0% |"
    old = {**onnx_report, "teacher": {k: v for k, v in onnx_report["teacher"].items() if k != "onnx_ms"}}
    assert efficiency_lines(old, method_rows(old)) == []


def test_a_report_without_onnx_ms_renders_eager_latency_labelled(
    report: dict[str, Any], onnx_report: dict[str, Any]
) -> None:
    """An older report.json (no onnx_ms) renders with its eager-torch columns, labelled so and
    saying which entries lack the ONNX timing; one entry without it is enough to fall back."""
    from clipdistill.report import latency_source

    assert latency_source(report) == ("eager", ["teacher", "clip-s0", "clip-s1", "dcd-s0"])
    table = results_table(report)
    header = next(line for line in table.splitlines() if line.startswith("| model"))
    assert header.endswith("| latency ms (eager torch) | speed-up (eager torch) |")
    assert "Latency: eager torch" in table and "`onnx_ms`, for teacher, clip-s0, clip-s1, dcd-s0" in table
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert all(row.split(" | ")[-2:] == ["3.00", "11.7x |"] for row in rows), rows  # 35 / 3 ms

    partial = {**onnx_report, "students": [*onnx_report["students"][:2], report["students"][2]]}
    assert latency_source(partial) == ("eager", ["dcd-s0"])
    assert "latency ms (eager torch)" in results_table(partial)


@pytest.mark.parametrize("with_onnx", [True, False])
def test_pareto_x_axis_is_onnx_ms_at_batch_1(
    with_onnx: bool, report: dict[str, Any], onnx_report: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import matplotlib

    import clipdistill.report as report_module

    matplotlib.use("Agg")
    figures: list[Any] = []
    monkeypatch.setattr(report_module, "_save", lambda figure, path: figures.append(figure))
    plot_pareto(onnx_report if with_onnx else report, Path("unused.png"))
    panels = figures[0].axes
    assert len(panels) == (2 if with_onnx else 1)  # batch 64 too where the report has it
    axes = panels[0]
    xs = sorted(float(x) for collection in axes.collections for x, _ in collection.get_offsets())
    if with_onnx:
        assert "ONNX Runtime fp32, batch 1" in axes.get_xlabel()
        assert xs == pytest.approx([1.0, 1.0, 1.0, 10.0])  # three students, the teacher
    else:
        assert "eager torch, batch 1" in axes.get_xlabel()
        assert xs == pytest.approx([3.0, 3.0, 10.0, 35.0])  # the eager figures, clip-s0 slowed to 9 + 1


def test_terminal_summary_shows_onnx_latency(
    onnx_report: dict[str, Any], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from clipdistill.cli.distill_cmd import print_run_summary as print_demo_summary

    monkeypatch.setenv("COLUMNS", "200")
    report = {**onnx_report, "best_student": {"method": "clip", "seed": 0, "selected_by": "val rsum"}}
    print_demo_summary({**report, "deploy": {"index": "runs/x/index"}}, Path("runs/x"))
    out = capsys.readouterr().out
    assert "ms b1 (ONNX)" in out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 8}
    assert [cell.strip() for cell in rows["teacher"].split("│")[1:-1]][6] == "10.00"
    assert [cell.strip() for cell in rows["clip"].split("│")[1:-1]][6] == "1.00"


def test_onnx_figures_without_their_measurement_settings_are_refused(onnx_report: dict[str, Any]) -> None:
    report = {k: v for k, v in onnx_report.items() if k != "efficiency"}
    with pytest.raises(ValueError, match="onnx_ms but no 'efficiency'"):
        results_table(report)


def test_method_lines_name_the_variant_and_what_it_switches_off() -> None:
    from clipdistill.report import _weights

    tuned = {"variant": "tuned", "method_args": {"w_ref": 1.0, "w_align": 0.0, "temperature": 4.0}}
    assert _weights(tuned) == "; variant `tuned`: w_ref=1.0, w_align=0.0, temperature=4.0 (switched off: w_align)"
    assert _weights({"variant": "paper", "method_args": {}}) == "; variant `paper`"


def test_terms_table_flags_a_term_under_five_percent_of_the_task_gradient(report: dict[str, Any]) -> None:
    from clipdistill.report import term_lines

    assert term_lines(report) == []  # students without measurements: no section
    report["students"][2]["terms"] = {
        "task_loss": {"measured": 3, "grad_norm": 1.0},
        "dcd_distill_loss": {"grad_ratio": 0.6, "max_grad_ratio": 0.7, "cos_task": 0.78, "inert": False},
        "dcd_self_loss": {"grad_ratio": 0.01, "max_grad_ratio": 0.02, "cos_task": 0.1, "inert": True},
    }
    lines = term_lines(report)
    assert lines[1] == "## Which loss terms did anything"
    rows = [line for line in lines if line.startswith("| `dcd`")]
    assert rows == [
        "| `dcd` | 0 | `dcd_distill_loss` | 0.600 | +0.78 |  |",
        "| `dcd` | 0 | `dcd_self_loss` | 0.010 | +0.10 | under 5% of the task gradient all run |",
    ]


def test_memory_line_gives_the_peak_and_each_stage() -> None:
    from clipdistill.report import _memory_lines

    assert _memory_lines(None) == []
    memory = {"peak_rss_mb": 3072.0, "per_stage": "reset", "stages": {"teacher": 3072.0, "students": 1536.0}}
    assert _memory_lines(memory)[1] == "Peak resident memory: 3.0 GiB; per stage, GiB: teacher 3.0, students 1.5."
    memory["per_stage"] = "cumulative"
    assert "running peak" in _memory_lines(memory)[1]


def test_the_fusion_paragraph_gives_the_rerank_gain_with_its_interval(report: dict[str, Any]) -> None:
    """report.json's fusion section carries val and test re-ranking, each gain with its 95%
    interval, and report.md's fusion sentence states both; a summary from before the interval
    gives the gain alone."""
    from clipdistill.report import markdown

    def rerank(dual: float, reranked: float, ci: list[float] | None) -> dict[str, Any]:
        entry = {
            "k": 16,
            "dual": {"t2i_R@1": dual, "t2i_R@5": 50.0},
            "reranked": {"t2i_R@1": reranked, "t2i_R@5": 50.0},
            "gain_R@1": reranked - dual,
        }
        return entry if ci is None else {**entry, "gain_R@1_ci95": ci}

    report["fusion_teacher"] = {
        "spec": "fusion:out/fusion",
        "params": 120_000,
        "rerank_val": rerank(30.0, 33.5, [1.31, 5.74]),
        "rerank_test": rerank(28.0, 29.0, [-1.5, 3.5]),
    }
    report["best_student"] = {"method": "clip", "seed": 0, "selected_by": "val rsum"}
    parity = {name: {"recall": {"rsum": 30.0}} for name in ("torch", "onnx_fp32")}
    report["deploy"] = {"spec": "local-dir:x", "export": "x", "index": "i", "parity": parity}
    report["wall_seconds"], report["preset"] = 1.0, "quick"
    text = markdown(report)
    assert "R@1 gain (95% interval over the caption queries): val +3.5 [+1.3, +5.7], test +1.0 [-1.5, +3.5]." in text
    report["fusion_teacher"]["rerank_test"] = rerank(28.0, 29.0, None)
    del report["fusion_teacher"]["rerank_val"]
    assert "R@1 gain (95% interval over the caption queries): test +1.0." in markdown(report)


def test_pareto_draws_the_frontier_the_smaller_inputs_and_beaten_students(
    onnx_report: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import matplotlib

    import clipdistill.report as report_module
    from clipdistill.eval.frontier import frontier_points

    matplotlib.use("Agg")
    figures: list[Any] = []
    monkeypatch.setattr(report_module, "_save", lambda figure, path: figures.append(figure))
    onnx_report["teacher"]["smaller_inputs"] = [
        {"image_size": 32, "metrics": {"rsum": 50.0}, **_onnx(2.0, 2.0, 1.0, 1.0)}
    ]
    onnx_report["frontier"] = frontier_points(onnx_report, baseline="clip")
    plot_pareto(onnx_report, Path("unused.png"))
    for axes in figures[0].axes:  # batch 1 and batch 64
        legend = [text.get_text() for text in axes.get_legend().get_texts()]
        assert sorted(legend) == ["a cheaper alternative scores more", "frontier", "teacher at smaller inputs"]
        (curve,) = [line for line in axes.lines if line.get_label() == "teacher at smaller inputs"]
        assert list(curve.get_ydata()) == [50.0, 90.0]  # teacher@32, then the teacher, by cost
