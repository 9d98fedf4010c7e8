"""Learned method scalars (temperatures, gates) reach their optimum within the quick preset's
44 steps, under the optimiser the trainer builds (``train/schedule.py`` ``student_groups``).

Each case builds a batch whose optimum lies far from the scalar's initialisation and trains
student, method and scalar together for the quick preset's steps. The same run with the scalar
at the weights' learning rate (what every parameter had before scalars got their own group)
stays near its start: that is what the check guards against."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipdistill.config import ConfigError, OptimConfig
from clipdistill.distill.base import (
    Batch,
    DistillMethod,
    StudentFeatures,
    TeacherOutputs,
    TeacherSource,
    build_method_args,
)
from clipdistill.distill.methods import get_method
from clipdistill.train.schedule import AdamWSettings, build_optimizer, student_groups, update
from method_fixtures import make_batch

B, DIM = 32, 16
QUICK_STEPS, QUICK_WARMUP, QUICK_LR = 44, 10, 2e-3  # presets/quick.yaml: 2 epochs of 22 steps


class FixedTeacher(TeacherSource):
    def __init__(self, image: torch.Tensor, text: torch.Tensor, scale: float = 50.0) -> None:
        self.embed_dim = image.shape[1]
        self.spec = "fixed:teacher"
        self.outputs = TeacherOutputs(image=image, text=text, logit_scale=torch.tensor(math.log(scale)))

    def __call__(self, batch: Batch) -> TeacherOutputs:
        return self.outputs


class LeafStudent(nn.Module):
    """Student features as parameters, so the student trains beside the method (at the weights' lr)."""

    def __init__(self, image: torch.Tensor, text: torch.Tensor) -> None:
        super().__init__()
        self.image = nn.Parameter(image.clone())
        self.text = nn.Parameter(text.clone())
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def features(self) -> StudentFeatures:
        return StudentFeatures(F.normalize(self.image, dim=-1), F.normalize(self.text, dim=-1), self.logit_scale)


def unit(seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(B, DIM, generator=torch.Generator().manual_seed(seed)), dim=-1)


def train_quick(method: DistillMethod, student: LeafStudent, scalar_lr: float) -> None:
    optimizer, scheduler = build_optimizer(
        student_groups(student, method, weight_decay=0.1, scalar_lr=scalar_lr),
        AdamWSettings(lr=QUICK_LR, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6),
        QUICK_WARMUP,
        QUICK_STEPS,
    )
    data = make_batch(B)
    for _ in range(QUICK_STEPS):
        update(method(data, student.features()).total(), optimizer, scheduler, grad_clip=1.0)


def build(name: str, teacher: TeacherSource, args: dict) -> DistillMethod:
    cls = get_method(name)
    return cls(DIM, teacher, build_method_args(cls, args))


def conaclip_cts_scale() -> tuple[DistillMethod, LeafStudent, Callable[[DistillMethod], float]]:
    """Teacher and student features unrelated: the CTS edge's InfoNCE is lowest at a high
    temperature (κ → 0), far below the paper's initial 1/0.07."""
    method = build("conaclip", FixedTeacher(unit(0), unit(1)), {})
    return method, LeafStudent(unit(2), unit(3)), lambda m: float(m.log_scales["CTS"].detach().exp())


def clipkd_cross_scale() -> tuple[DistillMethod, LeafStudent, Callable[[DistillMethod], float]]:
    """ICL between unrelated student and teacher features: lowest at κ_c → 0, not 1/0.07."""
    method = build("clipkd", FixedTeacher(unit(0), unit(1)), {"w_fd": 0.0, "w_ckd": 0.0})
    return method, LeafStudent(unit(2), unit(3)), lambda m: float(m.cross_logit_scale.detach().exp())


def comkd_gate() -> tuple[DistillMethod, LeafStudent, Callable[[DistillMethod], float]]:
    """EduAttention that reads exactly the matching teacher text (identity projector and FC,
    teacher image = teacher text, student image a noisy copy): the refinement KL falls as the
    gate α opens, so its optimum is far above its initial 0."""
    shared = unit(0)
    method = build("comkd", FixedTeacher(shared, shared), {"w_align": 0.0, "w_task": 0.0})
    with torch.no_grad():
        for linear in (method.image_proj, method.attention_fc):
            linear.weight.copy_(torch.eye(DIM))
            linear.bias.zero_()
    noisy = shared + 0.6 * unit(1)
    return method, LeafStudent(noisy, unit(2)), lambda m: float(m.edu_alpha.detach())


# (case, start, reached): the scalar must get from its start past ``reached`` in 44 steps.
CASES = {
    "conaclip tau_cts": (conaclip_cts_scale, 1 / 0.07, lambda value: value < 5.0),
    "clipkd cross_logit_scale": (clipkd_cross_scale, 1 / 0.07, lambda value: value < 5.0),
    "comkd edu_alpha": (comkd_gate, 0.0, lambda value: value > 0.5),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_scalar_reaches_its_optimum_within_the_quick_budget(case: str) -> None:
    make, start, reached = CASES[case]
    torch.manual_seed(0)
    method, student, read = make()
    assert read(method) == pytest.approx(start, rel=1e-5)
    train_quick(method, student, scalar_lr=OptimConfig().scalar_lr)
    assert reached(read(method)), f"{case}: {read(method):.3f} after {QUICK_STEPS} steps"

    torch.manual_seed(0)
    method, student, read = make()
    train_quick(method, student, scalar_lr=QUICK_LR)  # the scalar at the weights' lr
    assert not reached(read(method)), f"{case}: reached {read(method):.3f} even at lr {QUICK_LR}"


def test_only_the_methods_scalars_get_the_scalar_lr() -> None:
    method, student, _ = conaclip_cts_scale()
    decay, no_decay, scalars = student_groups(student, method, weight_decay=0.1, scalar_lr=0.5)
    assert [id(p) for p in scalars["params"]] == [id(method.log_scales["CTS"])]
    assert scalars["lr"] == 0.5 and scalars["weight_decay"] == 0.0
    assert any(p is student.logit_scale for p in no_decay["params"])  # the student's own scale: weights' lr
    assert all(p.ndim >= 2 for p in decay["params"])
    every = [p for group in (decay, no_decay, scalars) for p in group["params"]]
    assert (
        len(every)
        == len({id(p) for p in every})
        == len(list(student.parameters())) + len([p for p in method.parameters() if p.requires_grad])
    )


def test_dcd_read_outs_are_at_their_optimum_from_the_first_batch() -> None:
    """DCD's affine map and self-learning bias have no learned state: they are fitted in closed
    form per batch, so a short run cannot leave them at an initialisation."""
    generator = torch.Generator().manual_seed(0)
    student = [torch.randn(B, 8, generator=generator) for _ in range(2)]
    teacher = [5.0 * scores + 3.0 for scores in student]
    method = build("dcd", FixedTeacher(unit(0), unit(1)), {})
    assert not [name for name, p in method.named_parameters() if p.ndim == 0]
    fitted = method.fit_read_outs(teacher, student)
    assert float(fitted["score_scale"]) == pytest.approx(5.0, rel=1e-4)
    assert float(fitted["score_bias"]) == pytest.approx(3.0, abs=1e-3)
    bias = fitted["bce_bias"].clone().requires_grad_(True)
    values = torch.cat(student)
    targets = torch.zeros_like(values)
    targets[:, 0] = 1.0
    F.binary_cross_entropy_with_logits(values + bias, targets).backward()
    assert abs(float(bias.grad)) < 1e-5  # the BCE's minimum over the bias


def test_scalar_lr_must_be_positive() -> None:
    with pytest.raises(ConfigError, match=r"optim\.scalar_lr"):
        OptimConfig(scalar_lr=0.0)
