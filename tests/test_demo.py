"""The main job end to end on a small non-emoji Karpathy dataset (rendered scenes of shapes).

The e2e test (``-m e2e``) runs two methods with a minute-sized budget and checks the report's
schema, its files and that finished stages are skipped on a rerun; the slow test (``-m slow``)
runs all seven methods and checks the numbers are sane (teacher better than the scratch student).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from clipdistill.cli.main import app
from clipdistill.config import ConfigError, OptimConfig
from clipdistill.demo import run_demo
from clipdistill.distill.methods import get_method, tuned_method_args
from clipdistill.eval.retrieval import METRIC_KEYS
from clipdistill.run_config import RunCacheConfig, RunConfig, RunFusionConfig, RunIndexConfig, RunTeacherConfig

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 60, 220),
    "orange": (240, 140, 20),
    "purple": (140, 40, 180),
    "black": (20, 20, 20),
    "pink": (240, 120, 180),
    "teal": (20, 160, 160),
}
SHAPES = ("circle", "square", "triangle", "diamond")
PLACES = {"left": (4, 10), "right": (26, 10), "top": (15, 2), "bottom": (15, 26)}
# A run sized for tests: a scratch LiT teacher (resnet10t, its trainer's default budget), one
# fusion epoch, the `tiny` student for 2 epochs at 48 px, an exact index.
TINY = RunConfig(
    teacher=RunTeacherConfig(spec="lit:resnet10t"),
    fusion=RunFusionConfig(epochs=1),
    cache=RunCacheConfig(image_size=48),
    default_variant="tuned",
    optim=OptimConfig(epochs=2, batch_size=32, lr=2e-3),
    index=RunIndexConfig(factory="Flat"),
)


def _scene(shape: str, colour: tuple[int, int, int], place: tuple[int, int]) -> Image.Image:
    image = Image.new("RGB", (48, 48), "white")
    draw = ImageDraw.Draw(image)
    x, y = place
    box = (x, y, x + 18, y + 18)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(x + 9, y), (x + 18, y + 18), (x, y + 18)], fill=colour)
    else:
        draw.polygon([(x + 9, y), (x + 18, y + 9), (x + 9, y + 18), (x, y + 9)], fill=colour)
    return image


def write_scenes_dataset(root: Path) -> Path:
    """128 images (8 colours x 4 shapes x 4 places) with 3 captions each, split by colour so
    val (pink) and test (teal) hold colours never seen in training. Karpathy JSON + PNGs."""
    (root / "pictures").mkdir(parents=True, exist_ok=True)
    images, sentid = [], 0
    for imgid, (colour, shape, place) in enumerate((c, s, p) for c in COLOURS for s in SHAPES for p in PLACES):
        filename = f"{colour}_{shape}_{place}.png"
        _scene(shape, COLOURS[colour], PLACES[place]).save(root / "pictures" / filename)
        captions = [f"a {colour} {shape} on the {place}", f"{shape} in {colour}", f"a {shape} at the {place}"]
        images.append(
            {
                "imgid": imgid,
                "filename": filename,
                "split": {"pink": "val", "teal": "test"}.get(colour, "train"),
                "sentences": [{"raw": raw, "sentid": sentid + i} for i, raw in enumerate(captions)],
            }
        )
        sentid += len(captions)
    path = root / "scenes.json"
    path.write_text(json.dumps({"dataset": "scenes", "images": images}))
    return path


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_scenes_dataset(tmp_path_factory.mktemp("scenes"))


def _check_schema(report: dict, methods: list[str]) -> None:
    keys = ("dataset", "split", "n_images", "n_texts", "preset", "teacher", "fusion_teacher", "students", "summary")
    for key in keys:
        assert key in report, key
    assert report["dataset"] == "scenes" and report["split"] == "test"
    assert report["n_images"] == 16 and report["n_texts"] == 48
    for entry in (report["teacher"], *report["students"]):
        assert set(entry["metrics"]) == set(METRIC_KEYS)
        assert set(entry["latency_ms"]) == {"image_b1", "text_b1", "image_b64", "text_b64"}
        assert all(value > 0 and math.isfinite(value) for value in entry["latency_ms"].values())
        assert set(entry["onnx_ms"]) == {"image_b1", "text_b1", "image_b64", "text_b64"}  # ONNX Runtime
        assert all(value > 0 and math.isfinite(value) for value in entry["onnx_ms"].values())
        assert set(entry["flops_per_item"]) == {"image", "text"} and min(entry["flops_per_item"].values()) > 0
        assert set(entry["peak_share"]) == set(entry["onnx_ms"]) and min(entry["peak_share"].values()) > 0
        assert entry["params"]["total"] > 0 and entry["flops"]["image"] > 0
        assert all(0.0 <= entry["metrics"][k] <= 100.0 for k in METRIC_KEYS if k != "rsum")
    assert [s["method"] for s in report["students"]] == methods
    assert report["efficiency"]["repeats"] >= 30 and report["efficiency"]["matmul_peak_gflops"] > 0
    assert report["efficiency"]["threads"] >= 1 and report["efficiency"]["measured_utc"]
    # Every method trains the same student network, timed once: one figure for all of them.
    assert len({json.dumps(s["onnx_ms"], sort_keys=True) for s in report["students"]}) == 1
    assert len({json.dumps(s["latency_ms"], sort_keys=True) for s in report["students"]}) == 1  # eager: once too
    assert all(s["train_seconds"] > 0 for s in report["students"])
    assert [row["method"] for row in report["summary"]] == methods
    for row in report["summary"]:
        assert row["n_seeds"] == 1 and row["rsum_std"] == 0.0
        student = next(s for s in report["students"] if s["method"] == row["method"])
        assert row["rsum_mean"] == pytest.approx(student["metrics"]["rsum"])
    scratch = report["students"][0]
    assert scratch["method"] == "clip" and "vs_scratch" not in scratch
    for student in report["students"][1:]:  # every method against scratch, with its interval
        vs = student["vs_scratch"]
        assert vs["mean"] == pytest.approx(student["metrics"]["rsum"] - scratch["metrics"]["rsum"], abs=1e-3)
        assert vs["ci95"][0] <= vs["mean"] <= vs["ci95"][1]
    for student in report["students"]:  # which loss terms did anything, against the method's task term
        task = get_method(student["method"].partition(":")[0]).task_term
        assert task in student["terms"] and student["terms"][task]["measured"] >= 1


@pytest.mark.e2e
def test_demo_on_a_karpathy_dataset_writes_the_report_and_resumes(scenes: Path, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    methods = ["clip", "openclip"]
    report = run_demo(out, data=scenes, images=scenes.parent / "pictures", preset=TINY, methods="clip,openclip")
    _check_schema(report, methods)
    assert report["fusion_teacher"] is None  # neither method reads a fusion teacher, so none is trained
    assert [s["method_args"] for s in report["students"]] == [{}, {}]  # no tuned weights for these two
    for name in ("report.json", "report.md", "pareto.png", "curves.png", "examples.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert json.loads((out / "report.json").read_text()) == report
    # The teacher's test recall is read inside the encoding memo: the numbers its training reported.
    teacher_summary = json.loads((out / "teacher" / "train_summary.json").read_text())
    assert report["teacher"]["metrics"]["rsum"] == pytest.approx(teacher_summary["test"]["rsum"])
    markdown = (out / "report.md").read_text()
    assert "| `clip` |" in markdown and "| `openclip` |" in markdown and "![quality vs latency](pareto.png)" in markdown
    assert "| ms b1 | ms b64 | speed-up b1 | speed-up b64 |" in markdown and "## Efficiency" in markdown
    memory = report["memory"]  # each stage's peak resident memory, and the run's
    assert {"data", "teacher", "cache", "students", "evaluation", "efficiency", "deploy"} <= set(memory["stages"])
    assert memory["peak_rss_mb"] == max(memory["stages"].values()) > 0
    assert "Peak resident memory:" in markdown
    index_manifest = json.loads((out / "index" / "manifest.json").read_text())
    assert index_manifest["count"] == 16
    best = report["best_student"]
    assert report["deploy"]["spec"].endswith(f"{best['method']}-s{best['seed']}/model")

    # A rerun finds every stage finished: nothing is retrained (same summaries, same timestamps).
    stamps = {p: p.stat().st_mtime_ns for p in [*out.rglob("summary.json"), out / "efficiency.json"]}
    again = run_demo(out, data=scenes, images=scenes.parent / "pictures", preset=TINY, methods="clip,openclip")
    assert {p: p.stat().st_mtime_ns for p in [*out.rglob("summary.json"), out / "efficiency.json"]} == stamps
    assert again["teacher"]["onnx_ms"] == report["teacher"]["onnx_ms"]
    assert again["students"] == report["students"]


def test_demo_refuses_bad_requests(scenes: Path, tmp_path: Path) -> None:
    from clipdistill.distill.base import MethodConfigError

    with pytest.raises(ConfigError, match="unknown preset 'fast'"):
        run_demo(tmp_path, data=scenes, preset="fast")
    with pytest.raises(MethodConfigError, match="conaclip"):
        run_demo(tmp_path, data=scenes, preset=TINY, methods="clip,conaclp")
    args = ["demo", "--data", str(scenes), "--images", str(scenes.parent / "pictures"), "--out", str(tmp_path)]
    result = CliRunner().invoke(app, [*args, "--methods", "clip,clip"])
    assert result.exit_code == 2 and "lists a method twice" in result.output


def test_demo_stopped_by_a_signal_exits_cleanly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A SIGTERM while a student trains ends the demo with the signal's exit code and one line
    saying how to continue, not a traceback (the student's checkpoint is already saved)."""
    import clipdistill.demo
    from clipdistill.train.state import TrainingStopped

    def stopped(*args: object, **kwargs: object) -> None:
        raise TrainingStopped("SIGTERM", 7, tmp_path / "students" / "clip-s0" / "checkpoints" / "latest.pt")

    monkeypatch.setattr(clipdistill.demo, "run_demo", stopped)
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 128 + 15, result.output
    assert "demo stopped: stopped by SIGTERM after step 7" in result.output
    assert "rerun the same demo command to continue" in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_demo_all_methods_teacher_beats_scratch(scenes: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    preset = replace(TINY, optim=replace(TINY.optim, epochs=4))
    report = run_demo(tmp_path / "demo", data=scenes, images=scenes.parent / "pictures", preset=preset)
    methods = ["clip", "openclip", "clipkd", "conaclip", "mcad", "dcd", "comkd"]
    _check_schema(report, methods)
    assert report["fusion_teacher"]["rerank_test"]["k"] == 16
    scratch = next(s for s in report["students"] if s["method"] == "clip")
    assert report["teacher"]["metrics"]["rsum"] > scratch["metrics"]["rsum"]
    # The students train with the val-tuned weights, and the report says which.
    tuned = tuned_method_args()
    for student in report["students"]:
        assert student["method_args"] == tuned.get(student["method"], {})
        assert student["variant"] == ("tuned" if student["method"] in tuned else "paper")
    markdown = (tmp_path / "demo" / "report.md").read_text()
    weights = ", ".join(f"{key}={value}" for key, value in tuned["comkd"].items())
    assert "- `comkd`: ComKD-CLIP" in markdown and f"variant `tuned`: {weights}" in markdown
