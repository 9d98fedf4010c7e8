"""Fakes for the tests of CLIP, OpenCLIP, CLIP-KD and CoNaCLIP: a teacher of fixed embeddings,
a student of leaf tensors, and the check that gradients reach the student and the method's
trainable extras, never the teacher."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clipdistill.distill.base import (
    Batch,
    DistillMethod,
    MethodOutput,
    StudentFeatures,
    TeacherOutputs,
    TeacherSource,
    build_method_args,
)
from clipdistill.distill.methods import get_method

B, TEACHER_DIM = 4, 6


class FakeTeacher(TeacherSource):
    """Fixed random unit embeddings. They require grad so a test can prove none reaches them."""

    def __init__(self, embed_dim: int = TEACHER_DIM, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.embed_dim = embed_dim
        self.spec = "fake:teacher"
        self.image = F.normalize(torch.randn(B, embed_dim, generator=generator), dim=-1).requires_grad_(True)
        self.text = F.normalize(torch.randn(B, embed_dim, generator=generator), dim=-1).requires_grad_(True)
        self.logit_scale = torch.tensor(math.log(50.0), requires_grad=True)

    def __call__(self, batch: Batch) -> TeacherOutputs:
        return TeacherOutputs(image=self.image, text=self.text, logit_scale=self.logit_scale)

    def tensors(self) -> list[torch.Tensor]:
        return [self.image, self.text, self.logit_scale]


@dataclass
class Student:
    """Raw leaf tensors; ``features()`` gives the normalised StudentFeatures built from them."""

    raw_image: torch.Tensor
    raw_text: torch.Tensor
    logit_scale: torch.Tensor

    def features(self) -> StudentFeatures:
        return StudentFeatures(
            image=F.normalize(self.raw_image, dim=-1),
            text=F.normalize(self.raw_text, dim=-1),
            logit_scale=self.logit_scale,
        )


def make_student(dim: int, seed: int = 1) -> Student:
    generator = torch.Generator().manual_seed(seed)
    return Student(
        raw_image=torch.randn(B, dim, generator=generator).requires_grad_(True),
        raw_text=torch.randn(B, dim, generator=generator).requires_grad_(True),
        logit_scale=torch.tensor(math.log(1 / 0.07), requires_grad=True),
    )


def make_batch(size: int = B) -> Batch:
    return Batch(
        unit_pixels=torch.zeros(size, 3, 4, 4),
        texts=[f"caption {i}" for i in range(size)],
        image_ids=[str(i) for i in range(size)],
        caption_ids=[f"{i}_0" for i in range(size)],
        aug_ids=torch.zeros(size, dtype=torch.int64),
    )


def build(name: str, student_dim: int, raw_args: dict | None = None) -> tuple[DistillMethod, FakeTeacher | None]:
    cls = get_method(name)
    teacher = None if not cls.needs else FakeTeacher()
    return cls(student_dim, teacher, build_method_args(cls, raw_args)), teacher


def run(method: DistillMethod, student: Student) -> MethodOutput:
    return method(make_batch(), student.features())


def check_gradients(method: DistillMethod, teacher: FakeTeacher | None, student: Student, output: MethodOutput) -> None:
    total = output.total()
    assert torch.isfinite(total)
    total.backward()
    for tensor in (student.raw_image, student.raw_text):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0
    for name, param in method.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), f"no gradient for {name}"
        assert param.grad.abs().sum() > 0, f"zero gradient for {name}"
    if teacher is not None:
        for tensor in teacher.tensors():
            assert tensor.grad is None


EXPECTED_TERMS = {
    "clip": {"task_loss"},
    "openclip": {"task_loss", "distill_loss"},
    "clipkd": {"task_loss", "fd_loss", "icl_loss", "ckd_loss"},
    "conaclip": {"its_fd_loss", "its_sd_loss", "iss_sd_loss", "cts_infonce_loss", "cts_sd_loss", "css_infonce_loss"},
}
