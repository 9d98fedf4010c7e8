"""student.image_init=teacher: a lite student starts from its Lite teacher's own image tower."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from clipdistill.models.lit import LiTModel, lit_config_from_spec
from clipdistill.models.student_towers import TowerInitError, apply_tower_init
from clipdistill.models.students import build_student, student_config


def _teacher(tmp_path: Path, spec: str = "efficientnet-lite0@64", embed_dim: int | None = None) -> str:
    torch.manual_seed(1)
    config = lit_config_from_spec(spec, frozen_stages=5)
    if embed_dim is not None:  # a wider shared space, as an all-mpnet-base-v2 teacher's (768)
        config = replace(config, text_proj="linear", embed_dim=embed_dim)
    teacher = LiTModel(config)
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


def test_a_wider_teacher_needs_the_students_embed_dim(tmp_path: Path) -> None:
    """The projection is inherited with the trunk, so the student's embedding takes the teacher's
    width (student.embed_dim); the preset's own width is refused, naming the key and the value."""
    spec = _teacher(tmp_path, embed_dim=512)
    with pytest.raises(TowerInitError, match=r"embeds in 512 dims, the student in 384.*student\.embed_dim=512"):
        apply_tower_init(build_student(student_config("lite0", image_size=64)), "teacher", "random", teacher_spec=spec)
    student = build_student(student_config("lite0", image_size=64, embed_dim=512))
    apply_tower_init(student, "teacher", "teacher", teacher_spec=spec)
    from clipdistill.models.teachers import load_model

    pixels = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(student.eval().encode_image(pixels), load_model(spec).encode_image(pixels))
        assert student.encode_text(student.tokenize(["a red apple"])).shape == (1, 512)
