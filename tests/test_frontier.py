"""The quality/cost frontier: which points nothing cheaper beats, and which students a cheap
alternative (the teacher at a smaller input, scratch) beats at equal or lower cost."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from clipdistill.eval.frontier import frontier_lines, frontier_points, pair_cost


def _ms(image: float, text: float) -> dict[str, float]:
    """``onnx_ms`` with batch 64 at half the batch-1 cost per item."""
    return {"image_b1": image, "text_b1": text, "image_b64": image / 2, "text_b64": text / 2}


def _student(method: str, rsum: float, seed: int = 0, cost: tuple[float, float] = (3.0, 2.0)) -> dict[str, Any]:
    return {"method": method, "seed": seed, "network": "student-a", "metrics": {"rsum": rsum}, "onnx_ms": _ms(*cost)}


def _report(students: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "teacher": {
            "metrics": {"rsum": 200.0},
            "onnx_ms": _ms(10.0, 8.0),
            "smaller_inputs": [
                {"image_size": 128, "metrics": {"rsum": 150.0}, "onnx_ms": _ms(4.0, 8.0)},
                {"image_size": 96, "metrics": {"rsum": 90.0}, "onnx_ms": _ms(2.0, 8.0)},
            ],
        },
        "students": students,
    }


def test_points_are_the_teacher_its_smaller_inputs_and_each_method_mean() -> None:
    students = [_student("clip", 100.0), _student("clip", 110.0, seed=1), _student("conaclip", 175.0)]
    points = {p["name"]: p for p in frontier_points(_report(students), baseline="clip")}
    assert [p["kind"] for p in points.values()] == ["teacher", "teacher_smaller_input", "teacher_smaller_input"] + [
        "student"
    ] * 2
    assert points["teacher@128"]["onnx_ms"] == {"b1": 12.0, "b64": 6.0}  # image + caption per item
    assert points["clip"]["rsum"] == 105.0 and points["clip"]["seeds"] == 2 and points["clip"]["scratch"]
    assert not points["conaclip"]["scratch"]


def test_frontier_and_what_beats_a_student() -> None:
    """A student below scratch on its own network is beaten by scratch; a student below the
    teacher at a smaller input that costs no more is beaten by it; the best student is on the
    frontier, as is the teacher (nothing scores more), and a smaller-input teacher that a cheaper
    student beats is not."""
    students = [_student("clip", 100.0), _student("conaclip", 175.0), _student("dcd", 95.0)]
    report = _report(students)
    report["students"].append(_student("mcad", 120.0, cost=(9.0, 1.0)))  # dearer than scratch, better
    report["students"].append(_student("comkd", 85.0, cost=(9.0, 1.0)))  # as dear as teacher@96 (90)
    points = {p["name"]: p for p in frontier_points(report, baseline="clip")}
    assert points["dcd"]["beaten_by"] == {"b1": "clip", "b64": "clip"}
    assert points["mcad"]["beaten_by"] == {"b1": None, "b64": None}
    assert points["comkd"]["beaten_by"] == {"b1": "clip", "b64": "clip"}  # the best of clip and teacher@96
    assert points["conaclip"]["beaten_by"] == {"b1": None, "b64": None}
    assert points["conaclip"]["on_frontier"] == {"b1": True, "b64": True}
    assert points["teacher"]["on_frontier"] == {"b1": True, "b64": True}
    assert points["teacher@128"]["on_frontier"] == {"b1": False, "b64": False}  # conaclip: cheaper, better
    assert "beaten_by" not in points["teacher"]

    # A smaller-input teacher as cheap as the student and better beats it (scratch does not).
    report["teacher"]["smaller_inputs"].append({"image_size": 64, "metrics": {"rsum": 180.0}, "onnx_ms": _ms(1, 4)})
    points = {p["name"]: p for p in frontier_points(report, baseline="clip")}
    assert points["conaclip"]["beaten_by"] == {"b1": "teacher@64", "b64": "teacher@64"}
    assert points["conaclip"]["on_frontier"] == {"b1": False, "b64": False}


def test_another_student_network_is_named_and_priced_apart() -> None:
    small = _student("clip", 100.0)
    large = {**_student("clip", 130.0, cost=(6.0, 2.0)), "network": "student-b", "network_label": "lite0@128"}
    points = {p["name"]: p for p in frontier_points(_report([small, large]), baseline="clip")}
    assert points["clip [student-a]"]["onnx_ms"]["b1"] == 5.0
    assert points["clip [lite0@128]"]["onnx_ms"]["b1"] == 8.0
    assert points["clip [student-a]"]["on_frontier"]["b1"] and points["clip [lite0@128]"]["on_frontier"]["b1"]


def test_markdown_has_one_row_per_point() -> None:
    points = frontier_points(_report([_student("clip", 100.0), _student("dcd", 95.0)]), baseline="clip")
    lines = frontier_lines(points)
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| kind")]
    assert len(rows) == len(points) == 5
    assert "| student | `dcd` | 95.0 | 5.00 | 2.50 | no / no | clip / clip |" in lines
    assert frontier_lines([]) == []


def test_pair_cost_needs_both_towers_at_both_batches() -> None:
    with pytest.raises(KeyError):
        pair_cost({"image_b1": 1.0, "text_b1": 1.0})


def test_a_conv_teacher_reads_smaller_inputs_and_a_vit_refuses() -> None:
    from clipdistill.models.lit import LiTConfig, LiTModel
    from clipdistill.models.students import build_student, student_config

    teacher = LiTModel(LiTConfig(image_model="test_convnext", image_size=64)).eval()
    assert teacher.at_image_size(32) is teacher and teacher.image_size == (32, 32)
    assert teacher.prepare_pixels(torch.rand(2, 3, 48, 48)).shape[-2:] == (32, 32)
    assert teacher.embed_images(torch.rand(2, 3, 48, 48)).shape == (2, teacher.embed_dim)
    with pytest.raises(ValueError, match=">= 32 px"):
        teacher.at_image_size(16)
    vit = LiTModel(LiTConfig(image_model="test_vit", image_size=32))
    with pytest.raises(ValueError, match="fixed input size 32x32; it cannot run at 24 px"):
        vit.at_image_size(24)
    with pytest.raises(ValueError, match="fixed input size"):
        build_student(student_config("tiny", image_size=32)).at_image_size(24)
