"""The command line end to end on a tiny dataset: teacher train, eval, student create, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from clipdistill.cli.main import app
from clipdistill.eval.retrieval import recall_at_k

runner = CliRunner()
METRIC_KEYS = {"i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum"}


def test_help_lists_the_subcommands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    listed = {line.split()[1] for line in result.output.splitlines() if line.startswith("│ ") and len(line.split()) > 1}
    expected = ("data", "teacher", "student", "eval", "demo", "train", "cache", "export", "embed", "index", "search")
    for command in expected:
        assert command in listed, f"{command} missing from --help: {sorted(listed)}"


def test_bad_data_path_is_one_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["eval", "--model", "run:x", "--data", str(tmp_path / "nope"), "--out", "m.json"])
    assert result.exit_code == 2
    assert "error:" in result.output and "nope" in result.output
    assert "Traceback" not in result.output


def test_bad_model_spec_is_one_clear_error(shapes_dataset_dir: Path, tmp_path: Path) -> None:
    args = ["eval", "--model", "opneclip:RN50", "--data", str(shapes_dataset_dir), "--out", str(tmp_path / "m.json")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "unknown model schema 'opneclip'" in result.output


def test_absent_device_is_an_error(shapes_dataset_dir: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the absent-device path cannot be exercised")
    args = ["eval", "--model", "run:x", "--data", str(shapes_dataset_dir), "--out", str(tmp_path / "m.json")]
    result = runner.invoke(app, [*args, "--device", "cuda"])
    assert result.exit_code == 2
    assert "CUDA is not available" in result.output


def test_teacher_train_then_eval_writes_metrics(shapes_dataset_dir: Path, tmp_path: Path) -> None:
    teacher = tmp_path / "teacher"
    train = runner.invoke(
        app,
        [
            "teacher",
            "train",
            "--data",
            str(shapes_dataset_dir),
            "--out",
            str(teacher),
            "--image-model",
            "test_convnext",
            "--image-size",
            "32",
            "--epochs",
            "3",
            "--batch-size",
            "4",
        ],
    )
    assert train.exit_code == 0, train.output
    log = [json.loads(line) for line in (teacher / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    summary = json.loads((teacher / "train_summary.json").read_text())
    assert summary["best_epoch"] in (1, 2, 3) and set(summary["test"]) == METRIC_KEYS

    out = tmp_path / "metrics.json"
    result = runner.invoke(
        app,
        ["eval", "--model", f"run:{teacher}", "--data", str(shapes_dataset_dir), "--split", "test", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert set(metrics) >= METRIC_KEYS
    assert metrics["dataset"] == "shapes" and metrics["split"] == "test" and metrics["model"] == f"run:{teacher}"
    assert (metrics["n_images"], metrics["n_texts"]) == (3, 6)
    assert set(metrics["latency_ms"]) == {"image_b1", "text_b1", "image_b64", "text_b64"}
    assert metrics["params"]["image"] > 0 and metrics["flops"]["image"] > 0
    # The selected epoch's test metrics equal what eval recomputes from the saved model.
    assert metrics["rsum"] == pytest.approx(summary["test"]["rsum"], abs=1e-6)


def test_teacher_train_from_a_lit_spec(shapes_dataset_dir: Path, tmp_path: Path) -> None:
    """`--model lit:WEIGHTS@SIZE` trains the pretrained-trunk teacher; eval takes the same spec."""
    teacher = tmp_path / "teacher"
    args = ["teacher", "train", "--data", str(shapes_dataset_dir), "--out", str(teacher), "--epochs", "1"]
    train = runner.invoke(app, [*args, "--model", "lit:efficientnet-lite0@64", "--frozen-stages", "5"])
    assert train.exit_code == 0, train.output
    saved = json.loads((teacher / "clipdistill_model.json").read_text())["config"]
    assert (saved["image_pretrained"], saved["image_size"], saved["frozen_stages"]) == ("efficientnet-lite0", 64, 5)
    out = tmp_path / "m.json"
    untrained = runner.invoke(
        app, ["eval", "--model", "lit:efficientnet-lite0@64", "--data", str(shapes_dataset_dir), "--out", str(out)]
    )
    assert untrained.exit_code == 0, untrained.output
    both = runner.invoke(app, [*args, "--model", "lit:efficientnet-lite0", "--image-model", "resnet10t"])
    assert both.exit_code != 0 and "not both" in both.output
    wrong = runner.invoke(app, [*args, "--model", "run:somewhere"])
    assert wrong.exit_code != 0 and "lit:TRUNK" in wrong.output


def test_eval_matches_recall_on_embeddings_of_a_saved_student(shapes_dataset_dir: Path, tmp_path: Path) -> None:
    student_dir = tmp_path / "student"
    created = runner.invoke(
        app, ["student", "create", "--preset", "tiny", "--image-size", "32", "--out", str(student_dir)]
    )
    assert created.exit_code == 0, created.output
    out = tmp_path / "m.json"
    result = runner.invoke(
        app,
        [
            "eval",
            "--model",
            f"local-dir:{student_dir}",
            "--data",
            str(shapes_dataset_dir),
            "--split",
            "val",
            "--out",
            str(out),
            "--no-efficiency",
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert "latency_ms" not in metrics

    from clipdistill.data.loading import load_dataset
    from clipdistill.eval.embed import embed_split
    from clipdistill.models.teachers import load_model

    val = load_dataset(shapes_dataset_dir).split("val")
    image_emb, text_emb = embed_split(load_model(f"local-dir:{student_dir}"), val)
    expected = recall_at_k(image_emb, text_emb, val.text_to_image())
    assert {k: metrics[k] for k in METRIC_KEYS} == pytest.approx(expected)
