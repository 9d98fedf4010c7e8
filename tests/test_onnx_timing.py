"""ONNX Runtime efficiency: interleaved timing, FLOPs, share of the measured matmul peak."""

from __future__ import annotations

import pytest

from clipdistill.eval.onnx_timing import _flops_per_item, onnx_efficiency, speedup, time_interleaved
from clipdistill.models.students import build_student, student_config


def test_rounds_rotate_so_no_call_always_goes_first() -> None:
    order: list[str] = []
    calls = {name: (lambda n=name: order.append(n)) for name in "abc"}
    times = time_interleaved(calls, repeats=3, warmup=0)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(len(samples) == 3 and min(samples) >= 0 for samples in times.values())


def test_every_model_and_tower_is_timed_in_one_run(tmp_path) -> None:
    student = build_student(student_config("tiny", image_size=32))
    report = onnx_efficiency({"student": student}, batch_sizes=(1, 4), repeats=30, work_dir=tmp_path)
    assert report["repeats"] == 30 and report["matmul_peak_gflops"] > 0
    row = report["models"]["student"]
    assert set(row["onnx_ms"]) == {"image_b1", "text_b1", "image_b4", "text_b4"}
    assert all(ms > 0 for ms in row["onnx_ms"].values())
    assert all(0 < share < 2 for share in row["peak_share"].values())
    assert row["flops"] == {tower: _flops_per_item(student, tower) for tower in ("image", "text")}
    assert list(tmp_path.iterdir()) == []  # exported graphs are temporary


def test_timing_sessions_do_not_spin_between_calls(tmp_path) -> None:
    """Interleaved timing needs idle pools asleep: the spinning pool of the previously timed ONNX
    Runtime session took the cores from the one being timed (docs/results.md, ONNX timing)."""
    from clipdistill.eval.onnx_timing import _matmul_graph, _session

    path = tmp_path / "matmul.onnx"
    _matmul_graph(path, 8)
    options = _session(path, 2).get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_flops_follow_the_image_size() -> None:
    """Same network at twice the side: about four times the image FLOPs (the convolutions; the
    final projection's cost is constant, 3.5x measured at 128 -> 256 px), the same text FLOPs."""
    small = build_student(student_config("tiny", image_size=128))
    large = build_student(student_config("tiny", image_size=256))
    ratio = _flops_per_item(large, "image") / _flops_per_item(small, "image")
    assert 3.2 < ratio <= 4.0
    assert _flops_per_item(large, "text") == _flops_per_item(small, "text")


def test_text_flops_are_those_of_the_padded_graph_input() -> None:
    """The LiT teacher's tokenizer pads to the longest caption, its exported graph to the fixed
    context: the FLOPs per caption are the graph's, so a short caption counts as a full one."""
    from clipdistill.eval.efficiency import count_flops
    from clipdistill.models.lit import LiTConfig, LiTModel

    teacher = LiTModel(LiTConfig(image_model="test_convnext", image_size=32)).eval()
    context = teacher.config.context_length
    full = teacher.tokenize([" ".join(["word"] * 2 * context)])
    assert full.shape[1] == context  # truncated to the context: a caption that fills the graph
    assert _flops_per_item(teacher, "text") == count_flops(lambda: teacher.encode_text(full))


def test_too_few_repeats_is_refused() -> None:
    with pytest.raises(ValueError, match="repeats"):
        onnx_efficiency({}, repeats=5)


def test_speedup_is_time_per_image_plus_caption() -> None:
    teacher = {"image_b1": 8.0, "text_b1": 2.0}
    student = {"image_b1": 1.5, "text_b1": 0.5}
    assert speedup(teacher, student, 1) == 5.0


def test_only_the_named_towers_of_a_model_are_timed(tmp_path) -> None:
    """A model that differs from another only in its input size needs its image tower alone."""
    student = build_student(student_config("tiny", image_size=32))
    report = onnx_efficiency(
        {"full": student, "image": student},
        batch_sizes=(1,),
        repeats=30,
        work_dir=tmp_path,
        towers={"image": ["image"]},
    )
    assert set(report["models"]["full"]["onnx_ms"]) == {"image_b1", "text_b1"}
    assert set(report["models"]["image"]["onnx_ms"]) == {"image_b1"}
    assert set(report["models"]["image"]["flops"]) == {"image"}
    with pytest.raises(ValueError, match="towers must be a non-empty subset"):
        onnx_efficiency({"a": student}, repeats=30, towers={"a": ["audio"]})
