"""``clip``: the no-teacher baseline, the "scratch" row of every report.

The student is trained with the clip loss alone (symmetric InfoNCE at its own learned scale).
"""

from __future__ import annotations

from dataclasses import dataclass

from clipdistill.distill.base import Batch, DistillMethod, MethodArgs, MethodOutput, StudentFeatures, TeacherSource
from clipdistill.distill.common import check_positive, scale_value
from clipdistill.distill.losses import clip_loss
from clipdistill.distill.registry import register_method


@register_method
class ClipMethod(DistillMethod):
    """CLIP (Radford et al., 2021) without a teacher: ``task_loss`` = w_task · clip loss.

    Report: ``logit_scale`` = the student's κ (exp of its log scale, clamped at 100)."""

    name = "clip"
    summary = "scratch: the student's own contrastive loss, no teacher (the baseline to beat)"
    needs = frozenset()
    baseline = True

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
