"""``clipkd``: CLIP-KD (Yang et al., CVPR 2024) — feature, interactive-contrastive and
logit distillation together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from clipdistill.distill.base import (
    Batch,
    DistillMethod,
    MethodArgs,
    MethodConfigError,
    MethodOutput,
    StudentFeatures,
    TeacherSource,
)
from clipdistill.distill.common import (
    check_non_negative,
    check_positive,
    frozen_teacher,
    make_projector,
    project_to_teacher,
    require_teacher,
    scale_value,
)
from clipdistill.distill.losses import (
    bidirectional_kl,
    clip_loss,
    contrastive_logits,
    cross_contrastive_loss,
    feature_mse,
)
from clipdistill.distill.registry import register_method


@register_method
class ClipKDMethod(DistillMethod):
    """CLIP-KD: FD + ICL + CKD + the student's own clip loss.

    - FD (``fd_loss``): w_fd · [MSE(P_v(v^S), v^T) + MSE(P_t(t^S), t^T)], P = linear projector
      only when dims differ (trainable submodules ``image_proj``/``text_proj``, dropped at export),
      projected features re-normalised. The paper's/code's weight 2000 is our default: MSE over
      unit vectors is tiny. The two modalities are summed, as CLIP-KD's code does.
    - ICL (``icl_loss``): w_icl · ½[CE(κ_c·P(v^S)·t^Tᵀ, I) + CE(κ_c·P(t^S)·v^Tᵀ, I)], κ_c a
      learnable log-scale parameter (``cross_logit_scale``) initialised to ln(1/0.07) and clamped at
      κ ≤ 100 in use. CLIP-KD's code multiplies by the raw log-value parameter; we exponentiate, as
      the paper's "learnable temperature" and CLIP do.
    - CKD (``ckd_loss``): w_ckd · ½[KL(softmax L^T_i2t ‖ softmax L^S_i2t) + t2i], T = 1, T² factor,
      L^T at the teacher's own scale, L^S = the student's own logits (its space, its scale).
    - ``task_loss``: w_task · clip loss of the student.

    A weight of 0 drops its term and the trainable extras only it uses (so distributed training
    sees no unused parameters). Report: ``logit_scale`` (κ_S), ``cross_logit_scale`` (κ_c)."""

    name = "clipkd"
    summary = "CLIP-KD: feature MSE to the teacher embeddings + interactive and contrastive relation losses"
    needs = frozenset({"teacher_embeddings"})

    @dataclass(frozen=True)
    class Args(MethodArgs):
        """Defaults are CLIP-KD's: w_task 1, w_fd 2000, w_icl 1, w_ckd 1, κ_c init 1/0.07, CKD T = 1."""

        w_task: float = 1.0
        w_fd: float = 2000.0
        w_icl: float = 1.0
        w_ckd: float = 1.0
        cross_scale_init: float = 1.0 / 0.07
        ckd_temperature: float = 1.0

        def __post_init__(self) -> None:
            check_non_negative(self, "w_task", "w_fd", "w_icl", "w_ckd")
            check_positive(self, "cross_scale_init", "ckd_temperature")
            if self.w_task == self.w_fd == self.w_icl == self.w_ckd == 0:
                raise MethodConfigError("keys 'method_args.w_*' are all 0: nothing to train")

    def __init__(self, student_dim: int, teacher: TeacherSource | None, args: Args) -> None:
        super().__init__(student_dim, require_teacher(self.name, teacher), args)
        self.args: ClipKDMethod.Args = args
        uses_projection = args.w_fd > 0 or args.w_icl > 0
        teacher_dim = int(self.teacher.embed_dim)
        self.image_proj = make_projector(student_dim, teacher_dim) if uses_projection else None
        self.text_proj = make_projector(student_dim, teacher_dim) if uses_projection else None
        self.cross_logit_scale = nn.Parameter(torch.tensor(math.log(args.cross_scale_init))) if args.w_icl > 0 else None

    def forward(self, batch: Batch, student: StudentFeatures) -> MethodOutput:
        args = self.args
        teacher = frozen_teacher(self.teacher_outputs(batch), like=student.image)
        report = {"logit_scale": scale_value(student.logit_scale)}
        losses: dict[str, torch.Tensor] = {}
        if args.w_task > 0:
            task = clip_loss(student.image, student.text, student.logit_scale, student.rows)
            losses["task_loss"] = args.w_task * task
        if args.w_fd > 0 or args.w_icl > 0:
            image = project_to_teacher(student.image, self.image_proj)
            text = project_to_teacher(student.text, self.text_proj)
            if args.w_fd > 0:
                fd = feature_mse(image, teacher.image, student.rows) + feature_mse(text, teacher.text, student.rows)
                losses["fd_loss"] = args.w_fd * fd
            if args.w_icl > 0:
                assert self.cross_logit_scale is not None
                icl = cross_contrastive_loss(
                    image, text, teacher.image, teacher.text, self.cross_logit_scale, rows=student.rows
                )
                losses["icl_loss"] = args.w_icl * icl
                report["cross_logit_scale"] = scale_value(self.cross_logit_scale)
        if args.w_ckd > 0:
            student_logits = contrastive_logits(student.image, student.text, student.logit_scale)
            teacher_logits = contrastive_logits(teacher.image, teacher.text, teacher.logit_scale)
            losses["ckd_loss"] = args.w_ckd * bidirectional_kl(
                teacher_logits, student_logits, args.ckd_temperature, rows=student.rows
            )
        return MethodOutput(losses=losses, report=report)
