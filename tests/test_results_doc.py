"""benchmarks/results_doc.py: generated blocks are replaced from their JSON, the text around them
is kept, --check finds drift, and the repository's docs agree with benchmarks/results/."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "results_doc.py"


def _module():
    spec = importlib.util.spec_from_file_location("results_doc", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CACHE_COST = {
    "date": "2026-01-02",
    "machine": "test machine",
    "teacher": "run:t",
    "batch_size": 8,
    "k_aug": 2,
    "rows": {
        "student alone (clip)": {"epoch_s": 10.0, "data_s": 0.5, "compute_s": 9.5, "ratio_vs_alone": 1.0},
        "cached teacher (openclip)": {"epoch_s": 11.0, "data_s": 0.5, "compute_s": 10.5, "ratio_vs_alone": 1.1},
    },
}
BEFORE = "# Title\n\nHand-written prose.\n\n"
AFTER = "\nMore prose, untouched.\n"


def _doc(tmp_path: Path, body: str = "stale table\n") -> Path:
    (tmp_path / "results").mkdir(exist_ok=True)
    (tmp_path / "results" / "cache_cost.json").write_text(json.dumps(CACHE_COST))
    doc = tmp_path / "doc.md"
    doc.write_text(BEFORE + "<!-- generated: cache-cost -->\n" + body + "<!-- end generated -->\n" + AFTER)
    return doc


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_block_replaced_and_prose_kept(tmp_path: Path) -> None:
    doc = _doc(tmp_path)
    assert _module().main(["--doc", str(doc), "--results", str(tmp_path / "results")]) == 0
    text = doc.read_text()
    assert text.startswith(BEFORE + "<!-- generated: cache-cost -->\n")
    assert text.endswith("<!-- end generated -->\n" + AFTER)
    assert "stale table" not in text
    assert "`benchmarks/results/cache_cost.json` (test machine; 2026-01-02)" in text  # source, machine, date
    assert "| cached teacher (openclip) | 11.0 | 0.50 | 10.5 | 1.10 |" in text


def test_check_detects_drift_without_writing(tmp_path: Path) -> None:
    doc = _doc(tmp_path)
    results = str(tmp_path / "results")
    stale = doc.read_text()
    drift = _run("--check", "--doc", str(doc), "--results", results)
    assert drift.returncode == 1
    assert "cache-cost" in drift.stdout
    assert doc.read_text() == stale  # --check writes nothing
    assert _run("--doc", str(doc), "--results", results).returncode == 0
    assert _run("--check", "--doc", str(doc), "--results", results).returncode == 0
    data = dict(CACHE_COST, date="2026-01-03")  # the data moves on: the doc is stale again
    (tmp_path / "results" / "cache_cost.json").write_text(json.dumps(data))
    assert _run("--check", "--doc", str(doc), "--results", results).returncode == 1


def test_demo_block_needs_a_report(tmp_path: Path) -> None:
    module = _module()
    doc = tmp_path / "doc.md"
    text = "<!-- generated: demo-quick -->\nhand table\n<!-- end generated -->\n"
    doc.write_text(text)
    new, changed, skipped = module.rewrite(text, tmp_path, {"demo": None, "full": None})
    assert (new, changed, skipped) == (text, [], ["demo-quick"])
    report = {
        "preset": "quick",
        "n_images": 3,
        "n_texts": 15,
        "budget": {"student": "lite0", "student_image_size": 96, "epochs": 2, "seeds": 1},
        "teacher": {
            "spec": "lit:efficientnet-lite0",
            "metrics": {"rsum": 200.0},
            "onnx_ms": {"image_b1": 8, "text_b1": 8, "image_b64": 6, "text_b64": 6},
        },
        "students": [
            {
                "method": "clip",
                "seed": 0,
                "metrics": {"rsum": 100.0},
                "val_rsum": 90.0,
                "onnx_ms": {"image_b1": 3, "text_b1": 1, "image_b64": 1, "text_b64": 1},
            },
            {"method": "conaclip", "seed": 0, "metrics": {"rsum": 150.0}, "val_rsum": 140.0},
        ],
        "best_student": {"method": "conaclip", "seed": 0, "selected_by": "val rsum"},
        "machine": {"cpu": "Some CPU", "cores": 2, "torch": "2.14.1"},
        "finished_utc": "2026-01-02 03:04",
        "wall_seconds": 600,
    }
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    new, changed, skipped = module.rewrite(text, tmp_path, {"demo": path, "full": None})
    assert changed == ["demo-quick"] and not skipped
    assert "Some CPU, 2 cores" in new and "2026-01-02 03:04 UTC" in new
    assert "clipdistill demo --preset quick" in new
    assert "| `clip` (scratch) | 100.0 | 100.0 |  | 50% | 90.0 | 4.00 | 2.00 | 4.0x | 6.0x |" in new
    assert "| `conaclip` (shipped) | 150.0 | 150.0 | +50.0 | 75% | 140.0 |" in new

    # A ladder: a student column, scratch per size, each network timed, the shipped (method, size).
    small, large = "lite0@64", "lite0@96"
    fast = {"image_b1": 2, "text_b1": 2, "image_b64": 0.5, "text_b64": 0.5}
    ladder = dict(report, preset="big", students=[
        {**report["students"][0], "student": small, "onnx_ms": fast},
        {**report["students"][1], "student": small, "metrics": {"rsum": 120.0}},
        {**report["students"][0], "student": large, "metrics": {"rsum": 110.0}},
        {**report["students"][1], "student": large},
    ])  # fmt: skip
    ladder["budget"] = {**report["budget"], "students": [small, large]}
    ladder["best_student"] = {**report["best_student"], "student": large}
    path.write_text(json.dumps(ladder))
    new, changed, skipped = module.rewrite(text, tmp_path, {"demo": path, "full": None})
    assert "Students: `lite0@64`, `lite0@96`, 2 epochs" in new and "`conaclip` on `lite0@96` seed 0" in new
    assert "| `clip` (scratch) | `lite0@64` | 100.0 | 100.0 |  | 50% | 90.0 | 4.00 | 1.00 | 4.0x | 12.0x |" in new
    assert "| `conaclip` | `lite0@64` | 120.0 | 120.0 | +20.0 | 60% | 140.0 |" in new
    assert "| `clip` (scratch) | `lite0@96` | 110.0 | 110.0 |  | 55% | 90.0 | 4.00 | 2.00 | 4.0x | 6.0x |" in new
    assert "| `conaclip` (shipped) | `lite0@96` | 150.0 | 150.0 | +40.0 | 75% | 140.0 |" in new


def test_repository_docs_match_their_data() -> None:
    """docs/results.md and docs/scale.md agree with benchmarks/results/ (demo blocks: no report given)."""
    result = _run("--check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(f"demo-{name} skipped" in result.stdout for name in ("quick", "full", "big"))


def test_frontier_block_lists_every_point_and_what_beats_it(tmp_path: Path) -> None:
    module = _module()
    text = "<!-- generated: demo-big-frontier -->\n<!-- end generated -->\n"

    def point(kind: str, name: str, rsum: float, b1: float, b64: float, **extra: object) -> dict:
        on = {"b1": extra.pop("on_b1", True), "b64": extra.pop("on_b64", True)}
        return {"kind": kind, "name": name, "rsum": rsum, "onnx_ms": {"b1": b1, "b64": b64}, "on_frontier": on, **extra}

    report = {
        "preset": "big",
        "machine": {"cpu": "Some CPU", "cores": 2, "torch": "2.14.1"},
        "frontier": [
            point(
                "student", "clip [lite0@64]", 90.0, 4.0, 1.0, on_b1=False, beaten_by={"b1": "teacher@96", "b64": None}
            ),
            point("teacher", "teacher", 200.0, 40.0, 20.0),
            point("teacher_smaller_input", "teacher@96", 120.0, 3.5, 2.0, on_b64=False),
        ],
    }
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    new, changed, skipped = module.rewrite(text, tmp_path, {"demo": None, "full": None, "big": path})
    assert changed == ["demo-big-frontier"] and not skipped
    rows = [line for line in new.splitlines() if line.startswith("| ") and not line.startswith("| kind")]
    assert rows == [
        "| teacher | `teacher` | 200.0 | 40.00 | 20.00 | yes / yes |  |",
        "| teacher_smaller_input | `teacher@96` | 120.0 | 3.50 | 2.00 | yes / no |  |",
        "| student | `clip [lite0@64]` | 90.0 | 4.00 | 1.00 | no / yes | teacher@96 / - |",
    ]
