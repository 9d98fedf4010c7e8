"""``clipdistill eval`` of an ONNX export folder (what users deploy) beside the torch model it came
from, on a CSV without a split column (the test split is carved, seeded), with its cost table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clipdistill.cli.main import app
from clipdistill.eval.onnx_eval import export_dir_of, graph_flops, graph_parameters
from test_demo import PLACES, _scene
from test_splits import _write_csv

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
COLOURS |= {"purple": (140, 40, 170)}
SHAPES = ("circle", "square", "triangle")
METRICS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum")


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 pictures, two caption rows each, open_clip's CSV layout with no split column."""
    root = tmp_path_factory.mktemp("eval_csv")
    (root / "pictures").mkdir()
    rows = []
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            for spot, xy in PLACES.items():
                name = f"pictures/{colour}_{shape}_{spot}.png"
                _scene(shape, rgb, xy).save(root / name)
                rows += [{"filepath": name, "title": f"a {colour} {shape} on the {spot}"}]
                rows += [{"filepath": name, "title": f"{shape} in {colour}"}]
    return _write_csv(root / "all.csv", rows)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(student folder, its export with fp32 and int8 graphs): a seeded untrained tiny student."""
    import torch

    from clipdistill.export.onnx import export_model
    from clipdistill.models.students import build_student, save_student

    root = tmp_path_factory.mktemp("eval_export")
    torch.manual_seed(0)
    save_student(build_student("tiny"), root / "student")
    export_model(f"local-dir:{root / 'student'}", root / "export", int8=True)
    return root / "student", root / "export"


def _eval(args: list[str], out: Path) -> tuple[dict, str]:
    result = CliRunner().invoke(app, ["eval", *args, "--out", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text()), result.output


def test_an_export_folder_evaluates_like_its_torch_model(
    exported: tuple[Path, Path], table: Path, tmp_path: Path
) -> None:
    student, export = exported
    common = ["--data", str(table), "--split", "test", "--split-seed", "3"]
    onnx, printed = _eval(["--model", str(export), *common, "--no-progress"], tmp_path / "onnx.json")
    torch_, _ = _eval(["--model", f"local-dir:{student}", *common, "--no-progress"], tmp_path / "torch.json")

    for result in (onnx, torch_):  # the keys downstream readers know, for either backend
        assert {"dataset", "model", "split", "n_images", "n_texts", *METRICS} <= set(result)
        assert set(result["params"]) == {"image", "text", "total"} and set(result["flops"]) == {"image", "text"}
        assert set(result["latency_ms"]) == {"image_b1", "text_b1", "image_b64", "text_b64"}
        assert all(ms > 0 for ms in result["latency_ms"].values())
        assert result["splits"]["carved_from_train"] == ["test", "val"] and result["splits"]["seed"] == 3
    assert (onnx["backend"], onnx["precision"], torch_["backend"]) == ("onnx", "fp32", "torch")
    assert onnx["source_spec"] == f"local-dir:{student}"
    assert (onnx["n_images"], onnx["n_texts"]) == (torch_["n_images"], torch_["n_texts"]) and onnx["n_images"] >= 4
    flip = 100.0 / onnx["n_texts"]  # one caption ranked differently (a near tie) moves a t2i recall this much
    for key in METRICS:
        assert abs(onnx[key] - torch_[key]) <= flip + 1e-6, (key, onnx[key], torch_[key])
    # the graph's cost is the network's: the same FLOPs per image as torch counts; parameters
    # within 1% (BatchNorm folded into the convolutions; the text graph holds its causal masks)
    assert onnx["flops"]["image"] == torch_["flops"]["image"]
    for tower in ("image", "text", "total"):
        assert onnx["params"][tower] == pytest.approx(torch_["params"][tower], rel=0.01)
    flat = " ".join(printed.split())
    assert "(onnx fp32)" in flat and "rsum" in flat
    assert all(column in flat for column in ("params M", "GFLOPs/img", "GFLOPs/cap", "ms/img b1", "ms/cap b64"))
    assert "latency: ONNX Runtime" in flat


def test_int8_graphs_and_the_onnx_prefix(exported: tuple[Path, Path], table: Path, tmp_path: Path) -> None:
    _, export = exported
    args = ["--model", f"onnx:{export}", "--data", str(table), "--precision", "int8", "--no-efficiency"]
    result, printed = _eval([*args, "--progress"], tmp_path / "int8.json")
    assert result["precision"] == "int8" and "params" not in result and 0 <= result["rsum"] <= 600
    assert "embed images" in printed and "embed captions" in printed  # the progress bars (stderr)
    assert export_dir_of(f"onnx:{export}") == export and export_dir_of(str(export)) == export
    assert export_dir_of("local-dir:somewhere") is None


def test_bad_precision_and_device_are_one_line_errors(exported: tuple[Path, Path], table: Path, tmp_path: Path) -> None:
    student, export = exported
    runner = CliRunner()
    for model, extra, message in [
        (str(export), ["--precision", "fp16"], "unknown precision 'fp16'"),
        (f"local-dir:{student}", ["--precision", "int8"], "applies to an ONNX export folder"),
        (str(student), [], "export.json is missing (run clipdistill export)"),  # a folder that is no export
    ]:
        args = ["eval", "--model", model, "--data", str(table), "--out", str(tmp_path / "m.json"), *extra]
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output


def test_graph_flops_count_matmul_gemm_and_conv(tmp_path: Path) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    conv_w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "conv_w")
    gemm_w = numpy_helper.from_array(rng.standard_normal((5, 4 * 6 * 6)).astype(np.float32), "gemm_w")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "conv_w"], ["c"]),  # (1, 4, 6, 6) from (1, 3, 8, 8)
            helper.make_node("Flatten", ["c"], ["f"]),
            helper.make_node("Gemm", ["f", "gemm_w"], ["g"], transB=1),  # (1, 5)
            helper.make_node("MatMul", ["g", "m_w"], ["y"]),  # (1, 2)
        ],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        [conv_w, gemm_w, numpy_helper.from_array(np.ones((5, 2), np.float32), "m_w")],
    )
    path = tmp_path / "probe.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    expected = 2 * (4 * 6 * 6) * (3 * 3 * 3) + 2 * 5 * 144 + 2 * 2 * 5
    assert graph_flops(path, {"x": np.zeros((1, 3, 8, 8), np.float32)}) == expected
    assert graph_parameters(path) == 4 * 3 * 3 * 3 + 5 * 144 + 5 * 2


def test_a_loaded_dataset_is_not_read_again(
    exported: tuple[Path, Path], table: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clipdistill.data import loading
    from clipdistill.data.splits import SplitOptions, split_dataset
    from clipdistill.eval.evaluate import evaluate_model

    _, export = exported
    dataset, _ = split_dataset(table, None, SplitOptions(seed=3))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the dataset was read again")

    monkeypatch.setattr(loading, "load_dataset", refuse)
    result = evaluate_model(str(export), dataset, split="val", efficiency=False)
    assert result["n_images"] == dataset.split_counts()["val"] and "splits" not in result
