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
from clipdistill.run_config import (
    RunCacheConfig,
    RunConfig,
    RunEvalConfig,
    RunFusionConfig,
    RunIndexConfig,
    RunTeacherConfig,
)

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
    eval=RunEvalConfig(teacher_image_sizes=[48, 32, 96]),  # 96: above the teacher's 64 px, skipped
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
    # The teacher read at smaller inputs, timed with the rest: the frontier's cheap alternatives.
    teacher = report["teacher"]
    assert [entry["image_size"] for entry in teacher["smaller_inputs"]] == [48, 32]
    for entry in teacher["smaller_inputs"]:
        assert set(entry["metrics"]) == set(METRIC_KEYS)
        assert {k: v for k, v in entry["onnx_ms"].items() if k.startswith("text")} == {
            k: v for k, v in teacher["onnx_ms"].items() if k.startswith("text")
        }
        assert entry["flops_per_item"]["image"] < teacher["flops_per_item"]["image"]
    kinds = [point["kind"] for point in report["frontier"]]
    assert kinds == ["teacher", "teacher_smaller_input", "teacher_smaller_input"] + ["student"] * len(methods)
    for batch in ("b1", "b64"):
        best = max(report["frontier"], key=lambda point: point["rsum"])
        assert best["on_frontier"][batch]  # nothing scores more, so nothing cheaper does


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
    assert "| `clip` |" in markdown and "| `openclip` |" in markdown and "](pareto.png)" in markdown
    assert "## Quality against cost" in markdown and "| teacher_smaller_input | `teacher@48` |" in markdown
    assert "| ms b1 | ms b64 | speed-up b1 | speed-up b64 |" in markdown and "## Efficiency" in markdown
    memory = report["memory"]  # each stage's peak resident memory, and the run's
    assert {"data", "teacher", "cache", "students", "evaluation", "efficiency", "deploy", "report"} <= set(
        memory["stages"]
    )
    assert memory["peak_rss_mb"] == max(memory["stages"].values()) > 0
    assert set(memory["seconds"]) == set(memory["stages"]) and sum(memory["seconds"].values()) > 0
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


@pytest.mark.e2e
def test_demo_trains_every_method_on_each_student_of_a_ladder(scenes: Path, tmp_path: Path) -> None:
    """``--students tiny@32,tiny@48``: both methods on both students with one budget, each student
    in its own folder; each method against scratch on its own student; each student network timed
    once; the frontier and report.md name each (method, student); a rerun retrains nothing."""
    from clipdistill.run_config import resolve_run_config

    out, labels, methods = tmp_path / "ladder", ["tiny@32", "tiny@48"], ["clip", "openclip"]
    kwargs = {"data": scenes, "images": scenes.parent / "pictures", "preset": TINY, "methods": "clip,openclip"}
    report = run_demo(out, students="tiny@32,tiny@48", **kwargs)
    assert [(s["student"], s["method"]) for s in report["students"]] == [(b, m) for b in labels for m in methods]
    for student in report["students"]:
        run_dir = out / "students" / student["student"] / f"{student['method']}-s0"
        assert student["network_label"] == student["student"] and Path(student["run_dir"]) == run_dir
        model_config = json.loads((run_dir / "model" / "open_clip_config.json").read_text())
        size = int(student["student"].partition("@")[2])  # each student trained at its own input size
        assert model_config["model_cfg"]["vision_cfg"]["image_size"] == size
    assert not (out / "students" / "clip-s0").exists()  # no single-student folder beside the ladder
    assert report["budget"]["students"] == labels
    assert [(row["method"], row["student"]) for row in report["summary"]] == [(m, b) for b in labels for m in methods]

    by = {(s["method"], s["student"]): s for s in report["students"]}
    for label in labels:  # openclip against scratch on the same student
        scratch, distilled = by[("clip", label)], by[("openclip", label)]
        assert "vs_scratch" not in scratch
        expected = distilled["metrics"]["rsum"] - scratch["metrics"]["rsum"]
        assert distilled["vs_scratch"]["mean"] == pytest.approx(expected, abs=1e-3)
    # Two networks, each timed once: methods on one student share its figures, the students do not.
    assert len({s["network"] for s in report["students"]}) == 2
    for label in labels:
        assert by[("clip", label)]["network"] == by[("openclip", label)]["network"]
        assert by[("clip", label)]["onnx_ms"] == by[("openclip", label)]["onnx_ms"]
    assert by[("clip", "tiny@32")]["flops_per_item"]["image"] < by[("clip", "tiny@48")]["flops_per_item"]["image"]
    efficiency = json.loads((out / "efficiency.json").read_text())
    assert len(efficiency["timed_specs"]) == 1 + 2  # the teacher and one student per network
    names = {point["name"] for point in report["frontier"] if point["kind"] == "student"}
    assert names == {f"{m} [{b}]" for m in methods for b in labels}

    best = report["best_student"]  # one seed per row: the row with the best val rsum
    top = max(report["students"], key=lambda s: s["val_rsum"])
    assert (best["method"], best["student"]) == (top["method"], top["student"])
    assert report["deploy"]["spec"].endswith(f"students/{best['student']}/{best['method']}-s{best['seed']}/model")
    markdown = (out / "report.md").read_text()
    assert "| model | student | i2t R@1 |" in markdown
    assert all(f"| `{m}` | `{b}` |" in markdown for m in methods for b in labels)
    assert f"Shipped: `{best['method']} [{best['student']}]`" in markdown
    config = resolve_run_config(preset=None, configs=[out / "config.yaml"])
    assert config.students == [{"preset": "tiny", "image_size": 32}, {"preset": "tiny", "image_size": 48}]

    stamps = {p: p.stat().st_mtime_ns for p in [*out.rglob("summary.json"), out / "efficiency.json"]}
    assert len([path for path in stamps if "students" in path.parts]) == 4
    again = run_demo(out, students="tiny@32,tiny@48", **kwargs)
    assert {p: p.stat().st_mtime_ns for p in [*out.rglob("summary.json"), out / "efficiency.json"]} == stamps
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
