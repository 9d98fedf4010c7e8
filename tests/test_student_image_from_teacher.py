"""student.image_init=teacher: a lite student starts from its Lite teacher's own image tower."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clipdistill.models.lit import LiTModel, lit_config_from_spec
from clipdistill.models.student_towers import TowerInitError, apply_tower_init
from clipdistill.models.students import build_student, student_config


def _teacher(tmp_path: Path, spec: str = "efficientnet-lite0@64") -> str:
    torch.manual_seed(1)
    teacher = LiTModel(lit_config_from_spec(spec, frozen_stages=5))
    with torch.no_grad():  # a trained head: not the ImageNet weights, not zero
        teacher.image_proj.weight.normal_(0, 0.02)
        teacher.image_proj.bias.normal_(0, 0.02)
        teacher.trunk.blocks[6][0].conv_pw.weight.mul_(1.5)
    folder = tmp_path / "teacher"
    teacher.save(folder)
    return f"run:{folder}"


def test_student_inherits_the_teacher_image_tower_exactly(tmp_path: Path) -> None:
    spec = _teacher(tmp_path)
    student = build_student(student_config("lite0", image_size=64))
    done = apply_tower_init(student, "teacher", "random", teacher_spec=spec)
    assert done["image_weights"] == spec
    from clipdistill.models.teachers import load_model

    teacher = load_model(spec)
    pixels = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        # Same size and statistics: the student's image embedding is the teacher's.
        torch.testing.assert_close(student.eval().encode_image(pixels), teacher.encode_image(pixels))


def test_image_init_teacher_errors_name_the_key(tmp_path: Path) -> None:
    student = build_student(student_config("lite0", image_size=64))
    with pytest.raises(TowerInitError, match=r"teacher\.spec"):
        apply_tower_init(student, "teacher", "random", teacher_spec=None)
    other = _teacher(tmp_path, "efficientnet-lite1@64")
    with pytest.raises(TowerInitError, match="tf_efficientnet_lite1"):
        apply_tower_init(student, "teacher", "random", teacher_spec=other)
    tiny = build_student(student_config("tiny", image_size=32))
    with pytest.raises(TowerInitError, match=r"student\.image_init"):
        apply_tower_init(tiny, "teacher", "random", teacher_spec=other)
