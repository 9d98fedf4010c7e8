"""``student.image_init=teacher`` where it cannot apply says why and what to use instead, before
any teacher weights are loaded; an exported LiT teacher (an open_clip folder) can be inherited."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clipdistill.models import teachers
from clipdistill.models.student_towers import TowerInitError, apply_tower_init, teacher_image_trunk
from clipdistill.models.students import build_student, save_student, student_config

INSTEAD = ("student.image_init=imagenet", "student.image_init=random")


@pytest.fixture(scope="module")
def lite_student() -> object:
    return build_student(student_config("lite0", image_size=64))


@pytest.mark.parametrize(
    ("spec", "described"),
    [
        ("openclip:ViT-B-32@laion2b_s34b_b79k", "a ViT image tower"),
        ("openclip:RN50", "open_clip's ResNet image tower"),
        ("hf:openai/clip-vit-base-patch32", "a transformers CLIP image tower"),
    ],
)
def test_a_teacher_without_a_timm_trunk_is_refused_before_loading(
    lite_student: object, monkeypatch: pytest.MonkeyPatch, spec: str, described: str
) -> None:
    monkeypatch.setattr(teachers, "load_model", lambda *a, **k: pytest.fail("loaded the teacher"))
    with pytest.raises(TowerInitError) as info:
        apply_tower_init(lite_student, "teacher", "random", teacher_spec=spec)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message and message.startswith("key 'student.image_init' is 'teacher'")
    assert f"the teacher {spec} has {described}" in message and "no image tower to inherit" in message
    assert "tf_efficientnet_lite0" in message
    for hint in INSTEAD:
        assert hint in message


def test_another_trunk_is_refused_with_what_to_use_instead(lite_student: object, tmp_path: Path) -> None:
    folder = save_student(build_student(student_config("tiny", image_size=32)), tmp_path / "tiny")
    with pytest.raises(TowerInitError) as info:
        apply_tower_init(lite_student, "teacher", "random", teacher_spec=f"local-dir:{folder}")  # type: ignore[arg-type]
    message = str(info.value)
    assert "the teacher's trunk efficientvit_m0 differs from the student's tf_efficientnet_lite0" in message
    for hint in INSTEAD:
        assert hint in message
    assert teacher_image_trunk(f"run:{folder}") == ("efficientvit_m0", "the timm trunk efficientvit_m0")


def test_an_exported_lit_teacher_is_inherited_exactly(tmp_path: Path) -> None:
    from clipdistill.export.open_clip import export_open_clip
    from clipdistill.models.lit import LiTModel, lit_config_from_spec

    torch.manual_seed(1)
    lit = LiTModel(lit_config_from_spec("efficientnet-lite0@64", frozen_stages=5))
    with torch.no_grad():
        lit.image_proj.weight.normal_(0, 0.02)
        lit.image_proj.bias.normal_(0, 0.02)
    lit.save(tmp_path / "teacher")
    export_open_clip(f"run:{tmp_path / 'teacher'}", tmp_path / "oc")
    spec = f"local-dir:{tmp_path / 'oc'}"
    assert teacher_image_trunk(spec)[0] == "tf_efficientnet_lite0"
    student = build_student(student_config("lite0", image_size=64))
    assert apply_tower_init(student, "teacher", "random", teacher_spec=spec)["image_weights"] == spec
    pixels = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(student.eval().encode_image(pixels), lit.eval().encode_image(pixels))
