"""``comkd``: ComKD-CLIP (arXiv 2408.04145), adapted from classification to retrieval.

The paper distils a prompted CLIP classifier with two mechanisms: IFAlign (align the
statistics of projected student image features with the teacher's) and EduAttention (the
student's image feature attends to the teacher's text features, and the refined feature is
distilled against the teacher's logits). Both are carried over to image–text retrieval here.
Neither exists at inference: the projectors and the attention are submodules of the method,
not of the student, so the exported student is a plain dual encoder, identical in graph and
state-dict keys to one trained with the clip loss alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clipdistill.distill.base import (
    Batch,
    DistillMethod,
    MethodArgs,
    MethodConfigError,
    MethodOutput,
    StudentFeatures,
    TeacherSource,
    TunedArgs,
)
from clipdistill.distill.common import check_non_negative, check_positive, frozen_teacher, require_teacher, scale_value
from clipdistill.distill.losses import (
    MAX_SCALE,
    bidirectional_kl,
    clip_loss,
    contrastive_logits,
    moment_alignment,
)
from clipdistill.distill.registry import register_method


@register_method
class ComKDMethod(DistillMethod):
    """ComKD-CLIP: task loss + w_align · IFAlign + w_ref · refinement KL.

    - P: learnable linear projectors student dim → teacher dim (``image_proj``, and
      ``text_proj`` with ``text_align``), always present (the paper's P is learnable even when
      dims agree); p = norm(P(v^S)) *[ours: re-normalised so it lives on the teacher's sphere]*.
    - IFAlign (``align_loss``): |μ_d(p) − μ_d(v^T)| + |σ²_d(p) − σ²_d(v^T)| per feature
      dimension d over the batch *[ours: the axis is not given]*, summed over d as the paper
      writes it (``align_reduction: sum``, the default) or averaged (``mean`` *[ours]*: the summed
      L1 has a gradient that never shrinks, and summed over the teacher's dimensions at w_align 1
      it dominates the gradient norm that the global clip scales by). ``sum`` stays the default:
      ``mean`` at a weight w is ``sum`` at w/d, about off, and ``sum`` at a small weight did
      better than off on val (docs/results.md, "ComKD"); ``tuned`` has the demo student's weight.
      ``text_align`` (true, *[ours]*) adds the same for norm(P_t(t^S)) against t^T.
    - EduAttention: a = softmax(κ_a·p·t^Tᵀ)·t^T (the student image feature queries the batch's
      teacher text features), f = norm(p + α·FC(a)) *[ours: re-normalised for a cosine logit]*,
      α a learnable scalar initialised to ``alpha_init`` (0). *[ours]* κ_a is learnable (kept as
      log κ_a, clamped at 100 like every logit scale) and initialised to the teacher's logit scale
      on the first batch: the paper's 1/√d assumes unnormalised features, and on unit vectors it
      makes the logits <= 0.05 and the weights uniform (a = the batch mean of teacher text, for
      every row). ``attention_c`` (a number) restores the paper's fixed softmax(p·t^Tᵀ / C).
      Training only: it shapes p through the refinement loss below.
    - Refinement (``ref_loss``): ½[KL(softmax(q^T/τ) ‖ softmax(q^S/τ)) + the same on the
      transposes (caption → image)], q^T = κ_T·v^T·t^Tᵀ, q^S = κ_S·f·t^Tᵀ, τ = 1 (τ² factor).
      *[ours]* κ_S is the student's own scale (clamped at 100).
    - ``text_refine`` (*[ours]*, default false): the same EduAttention and refinement on the text
      side. The paper distils a classifier whose text features come from the teacher, so it
      gives the student's text tower nothing; a retrieval student has one. Its projected text
      q = norm(P_t(t^S)) queries the batch's teacher image features, g = norm(q + α_t·FC_t(
      softmax(κ_a·q·v^Tᵀ)·v^T)) (own α_t from 0 and FC_t, the shared κ_a), and ``text_ref_loss``
      is w_ref · the same KL with q^S_t = κ_S·v^T·gᵀ (teacher image vs student text).
    - ``task_loss``: w_task · clip loss of the student.

    Defaults: w_task 1, w_align 1, w_ref 1. Report: ``logit_scale``, ``edu_alpha`` (α),
    ``edu_scale`` (κ_a), ``edu_entropy`` (mean attention entropy over log B: 1 is uniform)."""

    name = "comkd"
    summary = "ComKD-CLIP: IFAlign mean/variance alignment + EduAttention refinement (training-only modules)"
    # At its defaults (w_align 1, w_ref 1) the L1 moment alignment swamps the task loss. On the
    # demo's teacher-initialised student IFAlign adds nothing (w_align 0), and a lighter, softer
    # refinement (w_ref 1, τ 4) suits its frozen stages (docs/results.md, "ComKD").
    tuned = TunedArgs(
        {"w_ref": 1.0, "w_align": 0.0, "temperature": 4.0},
        chosen_by="benchmarks/results/methods_sweep_dcd_comkd.json "
        "(val; w_align 0 from benchmarks/results/methods_comkd_lite0.json)",
    )
    needs = frozenset({"teacher_embeddings"})

    @dataclass(frozen=True)
    class Args(MethodArgs):
        """Defaults: w_task 1, w_align 1, w_ref 1, text_align true, τ 1, α init 0, align_reduction
        sum, attention_c null (learnable κ_a from the teacher's scale; a number: the paper's fixed C)."""

        w_task: float = 1.0
        w_align: float = 1.0
        w_ref: float = 1.0
        text_align: bool = True
        # [ours] EduAttention + refinement for the student's text too; off, as val chose it
        # (benchmarks/results/methods_comkd_text_refine.json)
        text_refine: bool = False
        temperature: float = 1.0
        alpha_init: float = 0.0
        attention_c: float | None = None  # None: learnable κ_a; a number C: softmax(p·t^Tᵀ / C), the paper's
        align_reduction: str = "sum"  # IFAlign over feature dims: "sum" (the paper) or "mean"

        def __post_init__(self) -> None:
            check_non_negative(self, "w_task", "w_align", "w_ref")
            check_positive(self, "temperature")
            if not math.isfinite(self.alpha_init):
                raise MethodConfigError(
                    f"key 'method_args.alpha_init' must be a finite number, got {self.alpha_init!r}"
                )
            if self.attention_c is not None:
                if isinstance(self.attention_c, bool) or not isinstance(self.attention_c, int | float):
                    raise MethodConfigError(
                        f"key 'method_args.attention_c' must be a number or null, got {self.attention_c!r}"
                    )
                if not math.isfinite(self.attention_c) or self.attention_c <= 0:
                    raise MethodConfigError(f"key 'method_args.attention_c' must be > 0, got {self.attention_c!r}")
            if self.align_reduction not in ("sum", "mean"):
                raise MethodConfigError(
                    f"key 'method_args.align_reduction' must be 'sum' or 'mean', got {self.align_reduction!r}"
                )
            if self.w_task == self.w_align == self.w_ref == 0:
                raise MethodConfigError("keys 'method_args.w_*' are all 0: nothing to train")

    def __init__(self, student_dim: int, teacher: TeacherSource | None, args: Args) -> None:
        super().__init__(student_dim, require_teacher(self.name, teacher), args)
        self.args: ComKDMethod.Args = args
        teacher_dim = int(self.teacher.embed_dim)
        self.image_proj = nn.Linear(student_dim, teacher_dim)
        uses_attention = args.w_ref > 0
        text_refines = uses_attention and args.text_refine
        # one text projector serves IFAlign and the text refinement, as image_proj serves both
        wants_text_proj = (args.text_align and args.w_align > 0) or text_refines
        self.text_proj = nn.Linear(student_dim, teacher_dim) if wants_text_proj else None
        self.attention_fc = nn.Linear(teacher_dim, teacher_dim) if uses_attention else None
        self.edu_alpha = nn.Parameter(torch.tensor(float(args.alpha_init))) if uses_attention else None
        self.text_attention_fc = nn.Linear(teacher_dim, teacher_dim) if text_refines else None
        self.text_edu_alpha = nn.Parameter(torch.tensor(float(args.alpha_init))) if text_refines else None
        self.attention_c = float(args.attention_c) if args.attention_c is not None else None
        learnable = uses_attention and self.attention_c is None
        # [ours] log κ_a, set from the teacher's logit scale on the first batch (``edu_scale_set``
        # records that, and travels in checkpoints, so a resumed run does not reset it).
        self.edu_log_scale = nn.Parameter(torch.zeros(())) if learnable else None
        self.register_buffer("edu_scale_set", torch.tensor(False))

    def attention_scale(self, teacher_log_scale: torch.Tensor | None = None) -> torch.Tensor:
        """The attention's inverse temperature: κ_a, or 1/C for a fixed ``attention_c``. The first
        call with the teacher's log scale initialises κ_a to it."""
        if self.edu_log_scale is None:
            assert self.attention_c is not None
            return torch.tensor(1.0 / self.attention_c)
        if not bool(self.edu_scale_set) and teacher_log_scale is not None:
            with torch.no_grad():
                self.edu_log_scale.copy_(teacher_log_scale.detach().float().reshape(()))
                self.edu_scale_set.fill_(True)
        return self.edu_log_scale.exp().clamp(max=MAX_SCALE)

    def attention_weights(
        self, projected: torch.Tensor, teacher_text: torch.Tensor, teacher_log_scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, B) EduAttention weights softmax(κ_a·p·t^Tᵀ) of each student image over the teacher texts."""
        scale = self.attention_scale(teacher_log_scale).to(projected)
        return torch.softmax(scale * projected @ teacher_text.t(), dim=1)

    def refined(
        self,
        projected: torch.Tensor,
        teacher_keys: torch.Tensor,
        teacher_log_scale: torch.Tensor | None = None,
        *,
        text_side: bool = False,
    ) -> torch.Tensor:
        """EduAttention: f = norm(p + α·FC(softmax(κ_a·p·kᵀ)·k)), the keys k the teacher's text
        (image side) or, with ``text_side``, its images and the text side's own α_t and FC_t."""
        fc, alpha = (self.text_attention_fc, self.text_edu_alpha) if text_side else (self.attention_fc, self.edu_alpha)
        assert fc is not None and alpha is not None
        read = self.attention_weights(projected, teacher_keys, teacher_log_scale) @ teacher_keys
        return F.normalize(projected + alpha * fc(read), dim=-1)

    def forward(self, batch: Batch, student: StudentFeatures) -> MethodOutput:
        args = self.args
        teacher = frozen_teacher(self.teacher_outputs(batch), like=student.image)
        losses: dict[str, torch.Tensor] = {}
        report = {"logit_scale": scale_value(student.logit_scale)}
        if args.w_task > 0:
            task = clip_loss(student.image, student.text, student.logit_scale, student.rows)
            losses["task_loss"] = args.w_task * task
        projected = F.normalize(self.image_proj(student.image), dim=-1)
        if args.w_align > 0:
            reduction = args.align_reduction
            align = moment_alignment(projected, teacher.image, reduction)
            if self.text_proj is not None:
                text = F.normalize(self.text_proj(student.text), dim=-1)
                align = align + moment_alignment(text, teacher.text, reduction)
            losses["align_loss"] = args.w_align * align
        if args.w_ref > 0:
            assert self.edu_alpha is not None
            refined = self.refined(projected, teacher.text, teacher.logit_scale)
            teacher_logits = contrastive_logits(teacher.image, teacher.text, teacher.logit_scale)
            student_logits = student.logit_scale.exp().clamp(max=MAX_SCALE) * refined @ teacher.text.t()
            losses["ref_loss"] = args.w_ref * bidirectional_kl(
                teacher_logits, student_logits, args.temperature, rows=student.rows
            )
            if self.text_edu_alpha is not None:
                assert self.text_proj is not None
                text_query = F.normalize(self.text_proj(student.text), dim=-1)
                refined_text = self.refined(text_query, teacher.image, teacher.logit_scale, text_side=True)
                text_logits = student.logit_scale.exp().clamp(max=MAX_SCALE) * teacher.image @ refined_text.t()
                losses["text_ref_loss"] = args.w_ref * bidirectional_kl(
                    teacher_logits, text_logits, args.temperature, rows=student.rows
                )
                report["text_edu_alpha"] = float(self.text_edu_alpha.detach())
            report["edu_alpha"] = float(self.edu_alpha.detach())
            report["edu_scale"] = float(self.attention_scale().detach())
            with torch.no_grad():
                weights = self.attention_weights(projected, teacher.text)
                entropy = -(weights * weights.clamp_min(1e-12).log()).sum(dim=1).mean()
                report["edu_entropy"] = float(entropy / math.log(max(2, weights.shape[1])))
        return MethodOutput(losses=losses, report=report)
