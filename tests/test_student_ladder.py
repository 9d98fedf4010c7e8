"""A ladder of students (``RunConfig.students``, ``--students``): parsing, validation and labels,
and the report's grouping by (method, student) on synthetic report dicts (no training here; the
end-to-end run is ``test_demo.py``'s ladder test)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from clipdistill.cli.main import app
from clipdistill.config import ConfigError, StudentConfig
from clipdistill.eval.frontier import frontier_points
from clipdistill.eval.paired_bootstrap import rsum_of
from clipdistill.report import curves_by_method, method_rows, plot_curves, results_table
from clipdistill.run_config import RunConfig, resolve_run_config
from clipdistill.run_summary import add_vs_scratch, best_student, method_summary, row_label, shipped
from clipdistill.student_ladder import ladder_budget, parse_students, student_variants

METRICS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10")


# --- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize("entries", [None, []])
def test_no_ladder_is_the_single_student_in_its_usual_place(entries: list | None) -> None:
    base = StudentConfig(preset="lite0", image_size=96)
    (variant,) = student_variants(base, entries)
    assert variant.label is None and variant.config == base
    assert variant.students_dir == "students" and variant.report_fields() == {}
    assert ladder_budget([variant]) == {}


def test_each_variant_is_its_keys_over_the_student_with_a_label_from_what_differs() -> None:
    base = StudentConfig(preset="lite0", image_init="imagenet", frozen_stages=2)
    entries = [{"image_size": 64}, {"image_size": 96}, {"image_size": 128, "label": "lite0-big"}]
    variants = student_variants(base, entries)
    assert [v.label for v in variants] == ["lite0@64", "lite0@96", "lite0-big"]
    assert [v.config.image_size for v in variants] == [64, 96, 128]
    assert {(v.config.preset, v.config.image_init, v.config.frozen_stages) for v in variants} == {
        ("lite0", "imagenet", 2)
    }
    assert [v.students_dir for v in variants] == ["students/lite0@64", "students/lite0@96", "students/lite0-big"]
    assert variants[0].report_fields() == {"student": "lite0@64", "network_label": "lite0@64"}
    assert ladder_budget(variants) == {"students": ["lite0@64", "lite0@96", "lite0-big"]}

    # Variants of one architecture and size are told apart by the keys whose values differ.
    inits = student_variants(StudentConfig(preset="lite0"), [{"image_init": "imagenet"}, {}])
    assert [v.label for v in inits] == ["lite0-img=imagenet", "lite0-img=random"]
    widths = student_variants(StudentConfig(preset="lite0"), [{"embed_dim": 768}, {}])
    assert [v.label for v in widths] == ["lite0-dim=768", "lite0-dim=None"]


def test_a_variant_naming_an_architecture_drops_the_base_keys_it_conflicts_with() -> None:
    """A model-config file and a checkpoint bring their own size (and a checkpoint its weights),
    so the base student's size and initialisation do not make them an error."""
    base = StudentConfig(preset="lite0", image_size=96, image_init="imagenet")
    file, checkpoint, preset = student_variants(
        base, [{"model_config": "/configs/my_student.json"}, {"init": "hf-hub:org/TinyCLIP-x"}, {"preset": "tiny"}]
    )
    wide = student_variants(StudentConfig(preset="lite0", embed_dim=768), [{"model_config": "/c/s.json"}])
    assert wide[0].config.embed_dim is None  # a model-config file brings its own width
    assert (file.label, file.config.image_size, file.config.model_config) == (
        "my_student",
        None,
        "/configs/my_student.json",
    )
    assert (checkpoint.label, checkpoint.config.image_size, checkpoint.config.image_init) == (
        "TinyCLIP-x",
        None,
        "random",
    )
    assert (preset.label, preset.config.image_size, preset.config.image_init) == ("tiny@96", 96, "imagenet")
    over_checkpoint = student_variants(StudentConfig(init="hf-hub:org/TinyCLIP-x"), [{"preset": "lite0"}])
    assert over_checkpoint[0].config.init is None and over_checkpoint[0].label == "lite0"


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (
            [{"imag_size": 64}],
            r"unknown config key 'students\[0\]\.imag_size' \(did you mean 'students\[0\]\.image_size'",
        ),
        ([{}, {"image_size": "big"}], r"key 'students\[1\]\.image_size' must be an integer, got str 'big'"),
        ([{"image_size": 8}], r"key 'students\[0\]\.image_size' must be >= 16 pixels, got 8"),
        ([{"embed_dim": 0}], r"key 'students\[0\]\.embed_dim' must be >= 1, got 0"),
        ([{"text_init": "imagenet"}], r"key 'students\[0\]\.text_init' has value 'imagenet'"),
        ([{"preset": "lite00"}], r"key 'students\[0\]\.preset': unknown student preset 'lite00'.*'lite0'"),
        (["lite0@64"], r"key 'students\[0\]' must be a mapping, got str 'lite0@64'"),
        (
            [{"image_size": 64}, {"image_size": 64}],
            r"'students\[0\]' and 'students\[1\]' both get the label 'lite0@64'",
        ),
        ([{"label": "big/one"}], r"key 'students\[0\]\.label' has value 'big/one'; a label is one folder name"),
    ],
)
def test_a_bad_entry_is_refused_when_the_config_is_resolved_naming_it(entries: list, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_run_config(preset=None, values={"student": {"preset": "lite0"}, "students": entries})


def test_students_round_trip_through_config_yaml(tmp_path: Path) -> None:
    config = resolve_run_config(preset="quick", overrides=["students=[{image_size: 64}, {image_size: 96, label: b}]"])
    assert config.students == [{"image_size": 64}, {"image_size": 96, "label": "b"}]
    from clipdistill.run_config import run_config_yaml

    (tmp_path / "config.yaml").write_text(run_config_yaml(config))
    assert resolve_run_config(preset=None, configs=[tmp_path / "config.yaml"]) == config
    assert RunConfig().students is None


# --- the --students flag -----------------------------------------------------------------------
def test_the_flag_maps_each_item_to_an_entry(tmp_path: Path) -> None:
    file = tmp_path / "my_student.json"
    file.write_text("{}")
    entries = parse_students(f"lite0@64, lite0@96,tiny,{file},hf-hub:org/TinyCLIP-x")
    assert entries == [
        {"preset": "lite0", "image_size": 64},
        {"preset": "lite0", "image_size": 96},
        {"preset": "tiny"},
        {"model_config": str(file)},
        {"init": "hf-hub:org/TinyCLIP-x"},
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lite0@big", r"--students lite0@big: the size after '@' must be a whole number of pixels, got 'big'"),
        ("lite00@64", r"--students lite00@64: unknown student preset 'lite00'.*'lite0'"),
        ("nowhere/student.json", r"--students nowhere/student\.json: no such open_clip model-config file"),
        (" , ", r"--students is empty"),
    ],
)
def test_a_bad_flag_item_is_named(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_students(text)


def test_distill_prints_the_ladder_and_its_config_reruns_it(tmp_path: Path) -> None:
    args = ["distill", "--student", "lite0", "--students", "lite0@64,lite0@96", "--print-config"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.output)
    assert printed["student"]["preset"] == "lite0"
    assert printed["students"] == [{"preset": "lite0", "image_size": 64}, {"preset": "lite0", "image_size": 96}]
    (tmp_path / "config.yaml").write_text(result.output)
    again = CliRunner().invoke(app, ["distill", "--config", str(tmp_path / "config.yaml"), "--print-config"])
    assert again.exit_code == 0 and again.output == result.output

    bad = CliRunner().invoke(app, ["distill", "--students", "lite0@x", "--print-config"])
    assert bad.exit_code == 2 and "the size after '@' must be a whole number" in bad.output


class _Captured(Exception):
    def __init__(self, config: RunConfig) -> None:
        self.config = config


def test_demo_passes_the_flag_to_the_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import clipdistill.demo

    def capture(config: RunConfig, out: Any, *, preset: str = "custom") -> dict:
        raise _Captured(config)

    monkeypatch.setattr(clipdistill.demo, "run_distill", capture)
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--students", "tiny@32,tiny@48"])
    assert isinstance(result.exception, _Captured), result.output
    assert result.exception.config.students == [
        {"preset": "tiny", "image_size": 32},
        {"preset": "tiny", "image_size": 48},
    ]


# --- grouping by (method, student) on a synthetic report ---------------------------------------
def _ranks(hits: int, queries: int = 10) -> dict[str, list[int]]:
    """Ranks of a model that finds ``hits`` of ``queries`` at rank 0 in both directions."""
    ranks = [0] * hits + [50] * (queries - hits)
    return {"i2t": list(ranks), "t2i": list(ranks)}


def _student(tmp_path: Path, method: str, label: str | None, seed: int, hits: int, val: float) -> dict[str, Any]:
    run = tmp_path / (label or "") / f"{method}-s{seed}"
    run.mkdir(parents=True)
    (run / "results.jsonl").write_text(json.dumps({"epoch": 1, "val": {"rsum": val}}) + "\n")
    rsum = rsum_of(_ranks(hits))
    entry = {"method": method, "seed": seed}
    if label is not None:
        entry.update(student=label, network_label=label)
    size = 32 if label in (None, "tiny@32") else 48
    return {
        **entry,
        "spec": f"local-dir:{run}/model",
        "run_dir": str(run),
        "metrics": {**dict.fromkeys(METRICS, rsum / 6), "rsum": rsum},
        "val_rsum": val,
        "params": {"total": 1_000_000},
        "flops": {"image": size * 10, "text": 3},
        "latency_ms": {"image_b1": size / 16, "text_b1": 1.0, "image_b64": 1.0, "text_b64": 0.5},
        "onnx_ms": {"image_b1": size / 16, "text_b1": 1.0, "image_b64": 1.0, "text_b64": 0.5},
        "network": "student-same",  # one network hash for both: only the labels keep them apart
    }


def _report(students: list[dict[str, Any]], labels: list[str] | None) -> dict[str, Any]:
    teacher = {
        "spec": "run:teacher",
        "metrics": {**dict.fromkeys(METRICS, 90.0), "rsum": 540.0},
        "latency_ms": {"image_b1": 30.0, "text_b1": 5.0, "image_b64": 10.0, "text_b64": 2.0},
        "onnx_ms": {"image_b1": 30.0, "text_b1": 5.0, "image_b64": 10.0, "text_b64": 2.0},
        "params": {"total": 9_000_000},
    }
    budget = {"seeds": 2, "student": "tiny", "epochs": 3, "batch_size": 8, "lr": 0.001, "k_augmentations": 1}
    if labels:
        budget["students"] = labels
    report = {"dataset": "toy", "n_images": 10, "n_texts": 10, "teacher": teacher, "budget": budget}
    report["efficiency"] = {"threads": 1, "repeats": 30, "matmul_peak_gflops": 10.0}
    return {**report, "students": students, "summary": method_summary(students)}


@pytest.fixture
def ladder(tmp_path: Path) -> list[dict[str, Any]]:
    """Scratch finds 0 of 10 on tiny@32 and 10 of 10 on tiny@48; openclip finds 5 of 10 on both,
    so it is far above scratch on one student and far below it on the other. openclip on tiny@48
    has the best mean val rsum though clip on tiny@32 has the best single seed."""
    return [
        _student(tmp_path, "clip", "tiny@32", 0, hits=0, val=90.0),
        _student(tmp_path, "clip", "tiny@32", 1, hits=0, val=0.0),
        _student(tmp_path, "openclip", "tiny@32", 0, hits=5, val=20.0),
        _student(tmp_path, "openclip", "tiny@32", 1, hits=5, val=20.0),
        _student(tmp_path, "clip", "tiny@48", 0, hits=10, val=30.0),
        _student(tmp_path, "clip", "tiny@48", 1, hits=10, val=30.0),
        _student(tmp_path, "openclip", "tiny@48", 0, hits=5, val=50.0),
        _student(tmp_path, "openclip", "tiny@48", 1, hits=5, val=60.0),
    ]


def test_summary_rows_and_vs_scratch_are_per_method_and_student(ladder: list[dict[str, Any]]) -> None:
    summary = method_summary(ladder)
    assert [(row["method"], row["student"], row["n_seeds"]) for row in summary] == [
        ("clip", "tiny@32", 2),
        ("openclip", "tiny@32", 2),
        ("clip", "tiny@48", 2),
        ("openclip", "tiny@48", 2),
    ]
    assert [row["rsum_mean"] for row in summary] == pytest.approx([0.0, 300.0, 600.0, 300.0])
    add_vs_scratch(ladder, [_ranks(hits) for hits in (0, 0, 5, 5, 10, 10, 5, 5)])
    assert ladder[2]["vs_scratch"]["mean"] == ladder[3]["vs_scratch"]["mean"] == pytest.approx(300.0)
    assert ladder[6]["vs_scratch"]["mean"] == pytest.approx(-300.0)  # against scratch on tiny@48, not tiny@32
    assert ladder[6]["vs_scratch"]["ci95"][1] < 0 < ladder[2]["vs_scratch"]["ci95"][0]
    assert not any("vs_scratch" in student for student in ladder if student["method"] == "clip")


def test_a_variant_without_scratch_gets_no_vs_scratch(tmp_path: Path) -> None:
    students = [
        _student(tmp_path, "clip", "tiny@32", 0, hits=0, val=1.0),
        _student(tmp_path, "openclip", "tiny@32", 0, hits=5, val=1.0),
        _student(tmp_path, "openclip", "tiny@48", 0, hits=5, val=1.0),
    ]
    add_vs_scratch(students, [_ranks(0), _ranks(5), _ranks(5)])
    assert "vs_scratch" in students[1] and "vs_scratch" not in students[2]


def test_the_shipped_student_is_the_best_mean_val_row(ladder: list[dict[str, Any]]) -> None:
    best = best_student(ladder)
    assert (best["method"], best["student"], best["seed"]) == ("openclip", "tiny@48", 1)
    assert shipped(best) == {"method": "openclip", "student": "tiny@48", "seed": 1, "selected_by": "val rsum"}
    assert row_label(best) == "openclip [tiny@48]"


def test_a_single_student_keeps_the_rows_it_always_had(tmp_path: Path) -> None:
    students = [
        _student(tmp_path, "clip", None, 0, hits=2, val=10.0),
        _student(tmp_path, "openclip", None, 0, hits=6, val=20.0),
    ]
    add_vs_scratch(students, [_ranks(2), _ranks(6)])
    assert method_summary(students) == [
        {"method": "clip", "rsum_mean": 120.0, "rsum_std": 0.0, "n_seeds": 1},
        {"method": "openclip", "rsum_mean": 360.0, "rsum_std": 0.0, "n_seeds": 1},
    ]
    assert students[1]["vs_scratch"]["mean"] == pytest.approx(240.0)
    assert shipped(best_student(students)) == {"method": "openclip", "seed": 0, "selected_by": "val rsum"}
    table = results_table(_report(students, None))
    assert "| model | i2t R@1 |" in table and "student" not in table.split("\n\n")[1]
    assert "Students: `tiny` preset" in table


def test_the_results_table_has_a_student_column_with_a_ladder(ladder: list[dict[str, Any]]) -> None:
    add_vs_scratch(ladder, [_ranks(hits) for hits in (0, 0, 5, 5, 10, 10, 5, 5)])
    report = _report(ladder, ["tiny@32", "tiny@48"])
    rows = method_rows(report)
    assert [(row["method"], row["student"]) for row in rows] == [
        ("clip", "tiny@32"),
        ("openclip", "tiny@32"),
        ("clip", "tiny@48"),
        ("openclip", "tiny@48"),
    ]
    table = results_table(report)
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("| model"))
    assert header.startswith("| model | student | i2t R@1 |")
    rows_md = [line for line in lines if line.startswith("| ")]
    assert len({line.count("|") for line in rows_md}) == 1  # header, teacher and every row: same columns
    assert lines[lines.index(header) + 1].count("|") == header.count("|")
    assert any(line.startswith("| `openclip` | `tiny@48` |") and "| -300.0 [" in line for line in rows_md)
    assert any(line.startswith("| `openclip` | `tiny@32` |") and "| +300.0 [" in line for line in rows_md)
    assert "Students: `tiny@32`, `tiny@48`," in table


def test_a_one_variant_ladder_has_no_student_column(tmp_path: Path) -> None:
    students = [_student(tmp_path, "clip", "tiny@32", 0, hits=2, val=1.0)]
    header = next(
        line for line in results_table(_report(students, ["tiny@32"])).splitlines() if line.startswith("| model")
    )
    assert header.startswith("| model | i2t R@1 |")


def test_frontier_and_curves_keep_each_student_apart(ladder: list[dict[str, Any]], tmp_path: Path) -> None:
    """The two variants share one network hash here (as two initialisations of one architecture
    would): their labels still make them separate frontier points and curves."""
    points = [
        p for p in frontier_points(_report(ladder, ["tiny@32", "tiny@48"]), baseline="clip") if p["kind"] == "student"
    ]
    by_name = {p["name"]: p for p in points}
    assert set(by_name) == {"clip [tiny@32]", "openclip [tiny@32]", "clip [tiny@48]", "openclip [tiny@48]"}
    assert by_name["clip [tiny@48]"]["rsum"] == pytest.approx(600.0) and by_name["clip [tiny@32]"]["rsum"] == 0.0
    assert by_name["openclip [tiny@32]"]["seeds"] == 2

    report = _report(ladder, ["tiny@32", "tiny@48"])
    curves = curves_by_method(report)
    assert list(curves) == ["clip [tiny@32]", "openclip [tiny@32]", "clip [tiny@48]", "openclip [tiny@48]"]
    assert curves["openclip [tiny@48]"]["mean"] == pytest.approx([55.0])
    assert curves["clip [tiny@32]"]["key"] == ("clip", "tiny@32")
    import matplotlib

    matplotlib.use("Agg")
    plot_curves(report, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
