"""``clip``: the no-teacher baseline, the "scratch" row of every report.

The student is trained with the clip loss alone (symmetric InfoNCE at its own learned scale).
Also home of the small argument checks every method shares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from clipdistill.distill.base import (
    Batch,
    DistillMethod,
    MethodArgs,
    MethodConfigError,
    MethodOutput,
    StudentFeatures,
    TeacherSource,
    register_method,
)
from clipdistill.distill.losses import MAX_SCALE, clip_loss


def check_non_negative(args: MethodArgs, *names: str) -> None:
    """Raise :class:`MethodConfigError` naming ``method_args.<name>`` unless each is finite and ≥ 0."""
    for name in names:
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0:
            raise MethodConfigError(f"key 'method_args.{name}' must be a finite number >= 0, got {value!r}")


def check_positive(args: MethodArgs, *names: str) -> None:
    """Raise :class:`MethodConfigError` naming ``method_args.<name>`` unless each is finite and > 0."""
    for name in names:
        value = getattr(args, name)
        if not math.isfinite(value) or value <= 0:
            raise MethodConfigError(f"key 'method_args.{name}' must be a finite number > 0, got {value!r}")


def scale_value(logit_scale: torch.Tensor) -> float:
    """κ = exp(log scale) clamped at 100 as the losses use it, as a float for reports."""
    return float(logit_scale.detach().exp().clamp(max=MAX_SCALE))


@register_method
class ClipMethod(DistillMethod):
    """CLIP (Radford et al., 2021) without a teacher: ``task_loss`` = w_task · clip loss.

    Report: ``logit_scale`` = the student's κ (exp of its log scale, clamped at 100)."""

    name = "clip"
    needs = frozenset()

    @dataclass(frozen=True)
    class Args(MethodArgs):
        """``w_task`` (default 1): weight of the student's clip loss; must be > 0 (it is the only term)."""

        w_task: float = 1.0

        def __post_init__(self) -> None:
            check_positive(self, "w_task")

    def __init__(self, student_dim: int, teacher: TeacherSource | None, args: Args) -> None:
        super().__init__(student_dim, teacher, args)
        self.args: ClipMethod.Args = args

    def forward(self, batch: Batch, student: StudentFeatures) -> MethodOutput:
        task = clip_loss(student.image, student.text, student.logit_scale, student.rows)
        return MethodOutput(
            losses={"task_loss": self.args.w_task * task},
            report={"logit_scale": scale_value(student.logit_scale)},
        )
