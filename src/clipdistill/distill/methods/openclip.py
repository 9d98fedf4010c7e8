"""``openclip``: logit distillation exactly as open_clip's ``DistillClipLoss``."""

from __future__ import annotations

from dataclasses import dataclass

from clipdistill.distill.base import (
    Batch,
    DistillMethod,
    MethodArgs,
    MethodConfigError,
    MethodOutput,
    StudentFeatures,
    TeacherSource,
)
from clipdistill.distill.common import check_non_negative, frozen_teacher, require_teacher, scale_value
from clipdistill.distill.losses import MAX_SCALE, openclip_distill_terms
from clipdistill.distill.registry import register_method


@register_method
class OpenClipDistillMethod(DistillMethod):
    """open_clip's ``DistillClipLoss`` (Ilharco et al., open_clip ``--distill``).

    loss = clip(student) + ½[CE(softmax L^T_i2t, log_softmax L^S_i2t) + same for t2i]; the teacher
    logits use the teacher's own scale κ_T, the student's logits the student's own κ_S.

    Terms: ``task_loss`` = w_task · contrastive, ``distill_loss`` = w_distill · distillation. With
    the default weights (1, 1) they sum to exactly open_clip's value. Ours: κ = exp(log scale)
    clamped at 100 on both sides, as our clip loss does (open_clip's trainer clamps the
    parameter itself at ln 100 after each step, so the numbers agree in practice).

    Report: ``logit_scale`` (κ_S), ``teacher_logit_scale`` (κ_T)."""

    name = "openclip"
    summary = "open_clip logit distillation: KL to the teacher's in-batch similarity distribution + task loss"
    needs = frozenset({"teacher_embeddings"})

    @dataclass(frozen=True)
    class Args(MethodArgs):
        """``w_task`` (1): the student's clip loss; ``w_distill`` (1): the logit distillation term."""

        w_task: float = 1.0
        w_distill: float = 1.0

        def __post_init__(self) -> None:
            check_non_negative(self, "w_task", "w_distill")
            if self.w_task == 0 and self.w_distill == 0:
                raise MethodConfigError("keys 'method_args.w_task' and 'method_args.w_distill' are both 0")

    def __init__(self, student_dim: int, teacher: TeacherSource | None, args: Args) -> None:
        super().__init__(student_dim, require_teacher(self.name, teacher), args)
        self.args: OpenClipDistillMethod.Args = args

    def forward(self, batch: Batch, student: StudentFeatures) -> MethodOutput:
        teacher = frozen_teacher(self.teacher_outputs(batch), like=student.image)
        student_scale = student.logit_scale.exp().clamp(max=MAX_SCALE)
        teacher_scale = teacher.logit_scale.exp().clamp(max=MAX_SCALE)
        contrastive, distill = openclip_distill_terms(
            student.image, student.text, student_scale, teacher.image, teacher.text, teacher_scale, rows=student.rows
        )
        losses = {}
        if self.args.w_task > 0:
            losses["task_loss"] = self.args.w_task * contrastive
        if self.args.w_distill > 0:
            losses["distill_loss"] = self.args.w_distill * distill
        report = {
            "logit_scale": scale_value(student.logit_scale),
            "teacher_logit_scale": scale_value(teacher.logit_scale),
        }
        return MethodOutput(losses=losses, report=report)
