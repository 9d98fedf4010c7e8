"""CLIP (the task loss alone) and OpenCLIP's distillation, against open_clip's ``DistillClipLoss``."""

from __future__ import annotations

import pytest
import torch
from open_clip.loss import DistillClipLoss

from clipdistill.distill.losses import clip_loss
from method_fixtures import TEACHER_DIM, build, make_student, run


def test_clip_is_task_loss_only() -> None:
    method, _ = build("clip", 5, {"w_task": 2.0})
    student = make_student(5)
    output = run(method, student)
    features = student.features()
    assert torch.allclose(
        output.losses["task_loss"], 2.0 * clip_loss(features.image, features.text, student.logit_scale)
    )


@pytest.mark.parametrize("student_dim", [TEACHER_DIM, 5])
def test_openclip_total_equals_open_clip(student_dim: int) -> None:
    method, teacher = build("openclip", student_dim)
    student = make_student(student_dim)
    output = run(method, student)
    features = student.features()
    assert teacher is not None
    with torch.no_grad():
        reference = DistillClipLoss(local_loss=True)(
            features.image,
            features.text,
            student.logit_scale.exp(),
            teacher.image,
            teacher.text,
            teacher.logit_scale.exp(),
        )
    assert torch.allclose(output.losses["task_loss"], reference[0], atol=1e-6)
    assert torch.allclose(output.losses["distill_loss"], reference[1], atol=1e-6)
    assert torch.allclose(output.total(), reference[0] + reference[1], atol=1e-5)
    assert output.report["teacher_logit_scale"] == pytest.approx(50.0, rel=1e-5)
