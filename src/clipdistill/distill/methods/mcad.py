"""``mcad``: MCAD (Lei et al., NAACL 2024 Findings) — multi-teacher cross-modal alignment
distillation from a dual-stream and a single-stream (fusion) teacher.

The fusion teacher scores pairs jointly (better aligned, too slow to index); its knowledge is
folded into the dual teacher's similarities and features, and the student learns both. The
student's inference cost is unchanged: nothing of the fusion teacher is exported.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from clipdistill.distill.base import (
    Batch,
    DistillMethod,
    MethodArgs,
    MethodConfigError,
    MethodOutput,
    StudentFeatures,
    TeacherOutputs,
    TeacherSource,
    TunedArgs,
)
from clipdistill.distill.common import (
    check_non_negative,
    check_positive,
    frozen_teacher,
    fusion_of,
    fusion_states,
    make_projector,
    project_to_teacher,
    require_teacher,
    scale_value,
)
from clipdistill.distill.losses import (
    MAX_SCALE,
    bidirectional_kl,
    clip_loss,
    contrastive_logits,
    feature_mse,
    fused_similarity,
    topk_pair_mask,
)
from clipdistill.distill.registry import register_method

if TYPE_CHECKING:
    from clipdistill.models.fusion import FusionStates


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two flat tensors (0 when either is constant)."""
    x, y = x.detach().double().flatten(), y.detach().double().flatten()
    x, y = x - x.mean(), y - y.mean()
    denominator = float(x.norm() * y.norm())
    return float((x * y).sum()) / denominator if denominator > 0 else 0.0


def _other_side(heads_input: str | None) -> str:
    """Why heads that are not ``own`` make targets a student's tower cannot reach."""
    if heads_input == "sides":
        return "computes h from the caption attending to its paired image, so its text target would carry the image"
    return "computes g and h from the image-caption pair, so its image target would carry the caption"


@register_method
class MCADMethod(DistillMethod):
    """MCAD: distribution + feature distillation from the fused teachers, plus the task loss.

    - Modified similarity *[ours: the paper's formula was not available to us]*:
      Ŝ_ij = cos(v^T_i, t^T_j) + μ·z(F_ij), F_ij the fusion teacher's match logit for the
      in-batch pair (image i, caption j), z standardising F over the scored pairs of the batch
      (:func:`~clipdistill.distill.losses.fused_similarity`; ``fusion_standardise: dual``
      rescales it to the dual similarities' spread so μ is a fraction of it, ``unit`` leaves
      it at std 1). ``fusion_pairs: all`` scores all B² pairs; ``topk`` only each row's and
      each column's dual top-``topk`` (default 16) and keeps the dual similarity elsewhere.
    - Modified features *[ours]*: v̂_i = norm(v^T_i + λ·ĝ_i), t̂_i = norm(t^T_i + λ·ĥ_i), ĝ, ĥ the
      fusion teacher's heads into the dual space **unit-normalised**, so with λ 0.3 the target is
      a bounded nudge: cos(v̂, v^T) >= √(1 − λ²) ≈ 0.95. g_i is computed from image i's own states
      and h_i from caption i's own (the teacher's ``heads_input: own``), so each target is what
      the student's tower for that side can see: the image target is the same whichever caption
      is in the batch, the text target the same whichever image. A fusion teacher without such
      heads (``blip-itm``; a ``fusion:`` folder with ``sides`` heads, whose h read the paired image,
      or ``pair`` heads, whose g and h read the pair), or ``use_fusion_features: false``, distils
      v^T, t^T instead (report ``fusion_features`` = 0; a warning says why).
    - Terms: ``dist_loss`` = w_dist · ½[KL(softmax(κ_T·Ŝ/T) ‖ softmax(L^S/T)) + t2i] (T = 1, T²
      factor), L^S the student's own logits; ``feat_loss`` = w_feat · [MSE(P_v(v^S), v̂) +
      MSE(P_t(t^S), t̂)], P linear projectors when dims differ, projected features re-normalised
      (w_feat 2000 as CLIP-KD's FD: MSE between unit vectors is tiny); ``task_loss`` = w_task ·
      clip loss of the student.

    Needs a trained fusion teacher (key ``teacher.fusion``; an untrained head is refused when the
    method is built, :func:`~clipdistill.distill.base.require_trained_fusion`); its g, h must map
    into the space of the configured dual teacher (checked by weights fingerprint). Report: ``logit_scale``,
    ``fused_pairs`` (fraction of the B² pairs scored by the fusion teacher), ``fusion_features``,
    ``fusion_dual_corr`` (corr(z(F), S) over the scored pairs of the batch)."""

    name = "mcad"
    summary = "MCAD: teacher similarities and features refined by the single-stream fusion teacher, distilled jointly"
    tuned = TunedArgs(
        {"mu": 0.2},
        chosen_by="benchmarks/results/methods_mcad.json (val sweep of mu against the paper's 0.5)",
    )
    needs = frozenset({"teacher_embeddings", "fusion_scores"})
    optional_needs = frozenset({"fusion_features"})

    @dataclass(frozen=True)
    class Args(MethodArgs):
        """Defaults: w_task 1, w_dist 1, w_feat 2000, μ 0.5, λ 0.3, fusion_pairs all, topk 16,
        fusion_standardise dual, temperature 1, use_fusion_features true."""

        w_task: float = 1.0
        w_dist: float = 1.0
        w_feat: float = 2000.0
        mu: float = 0.5
        lam: float = 0.3
        fusion_pairs: str = "all"
        topk: int = 16
        fusion_standardise: str = "dual"
        temperature: float = 1.0
        use_fusion_features: bool = True

        def __post_init__(self) -> None:
            check_non_negative(self, "w_task", "w_dist", "w_feat", "mu", "lam")
            check_positive(self, "temperature")
            if self.fusion_pairs not in ("all", "topk"):
                raise MethodConfigError(
                    f"key 'method_args.fusion_pairs' must be 'all' or 'topk', got {self.fusion_pairs!r}"
                )
            if self.fusion_standardise not in ("dual", "unit"):
                raise MethodConfigError(
                    f"key 'method_args.fusion_standardise' must be 'dual' or 'unit', got {self.fusion_standardise!r}"
                )
            if self.topk < 1:
                raise MethodConfigError(f"key 'method_args.topk' must be >= 1, got {self.topk}")
            if self.w_task == self.w_dist == self.w_feat == 0:
                raise MethodConfigError("keys 'method_args.w_*' are all 0: nothing to train")

    def __init__(self, student_dim: int, teacher: TeacherSource | None, args: Args) -> None:
        super().__init__(student_dim, require_teacher(self.name, teacher), args)
        self.args: MCADMethod.Args = args
        fusion = fusion_of(self.teacher)
        if fusion is None:
            raise MethodConfigError(f"method {self.name!r} needs a fusion teacher: set key 'teacher.fusion'")
        teacher_dim = int(self.teacher.embed_dim)
        self.use_fusion_features = args.use_fusion_features and fusion.pooled_dim is not None
        if self.use_fusion_features and args.w_feat > 0 and not fusion.own_side_heads:
            warnings.warn(
                f"method {self.name!r}: fusion teacher {fusion.spec} {_other_side(fusion.heads_input)}; "
                "distilling the dual teacher's features instead (retrain it with `clipdistill teacher train-fusion`, "
                "whose heads each read their own side)",
                stacklevel=2,
            )
            self.use_fusion_features = False
        heads_untrained = fusion.heads_untrained() if self.use_fusion_features and args.w_feat > 0 else None
        if heads_untrained is not None:
            warnings.warn(
                f"method {self.name!r}: fusion teacher {fusion.spec}: {heads_untrained}; distilling the dual "
                "teacher's features instead (retrain it with `clipdistill teacher train-fusion` and w_heads > 0)",
                stacklevel=2,
            )
            self.use_fusion_features = False
        if self.use_fusion_features and args.w_feat > 0:
            from clipdistill.models.fusion import same_dual_teacher

            if fusion.pooled_dim != teacher_dim or not same_dual_teacher(fusion, self.teacher.spec):
                raise MethodConfigError(
                    f"method {self.name!r}: the fusion teacher {fusion.spec} (key 'teacher.fusion') maps its pooled "
                    f"features into the space of {fusion.dual_spec} (dim {fusion.pooled_dim}), not into that of "
                    f"key 'teacher.spec' = {self.teacher.spec} (dim {teacher_dim}); use the dual teacher it was "
                    "trained on, or set method_args.use_fusion_features=false"
                )
        self.image_proj = make_projector(student_dim, teacher_dim) if args.w_feat > 0 else None
        self.text_proj = make_projector(student_dim, teacher_dim) if args.w_feat > 0 else None

    def fused_teacher(self, teacher: TeacherOutputs, states: FusionStates) -> tuple[torch.Tensor, float, float]:
        """``(Ŝ, fraction of pairs scored, corr(F, S) over the scored pairs)`` for the batch. The
        correlation says what the fusion teacher adds: near 1, F is an affine function of the dual
        cosine and Ŝ is S at a sharper temperature (z standardising is affine, so corr(z(F), S) = corr(F, S))."""
        args = self.args
        fusion = fusion_of(self.teacher)
        assert fusion is not None
        dual = teacher.image @ teacher.text.t()
        if args.fusion_pairs == "all":
            mask = torch.ones_like(dual, dtype=torch.bool)
            logits = fusion.score_matrix(states).to(dual)
        else:
            mask = topk_pair_mask(dual, args.topk)
            image_index, text_index = mask.nonzero(as_tuple=True)
            logits = torch.zeros_like(dual)
            logits[image_index, text_index] = fusion.pair_logits(states, image_index, text_index).to(dual)
        fused = fused_similarity(dual, logits, mask, args.mu, args.fusion_standardise)  # type: ignore[arg-type]
        return fused, float(mask.float().mean()), pearson(logits[mask], dual[mask])

    def fused_features(self, teacher: TeacherOutputs, states: FusionStates) -> tuple[torch.Tensor, torch.Tensor]:
        """``(v̂, t̂)`` = norm(v^T + λ·norm(g)), norm(t^T + λ·norm(h)) for the batch's matched pairs."""
        fusion = fusion_of(self.teacher)
        assert fusion is not None
        g, h = fusion.matched_dual_features(states)
        lam = self.args.lam
        image = F.normalize(teacher.image + lam * F.normalize(g.to(teacher.image), dim=-1), dim=-1)
        text = F.normalize(teacher.text + lam * F.normalize(h.to(teacher.text), dim=-1), dim=-1)
        return image, text

    def forward(self, batch: Batch, student: StudentFeatures) -> MethodOutput:
        args = self.args
        raw = self.teacher_outputs(batch)
        teacher = frozen_teacher(raw, like=student.image)
        states = fusion_states(self.name, raw)
        fusion = fusion_of(self.teacher)
        assert fusion is not None
        losses: dict[str, torch.Tensor] = {}
        report = {"logit_scale": scale_value(student.logit_scale), "fusion_features": float(self.use_fusion_features)}
        if args.w_task > 0:
            task = clip_loss(student.image, student.text, student.logit_scale, student.rows)
            losses["task_loss"] = args.w_task * task
        if args.w_dist > 0:
            fused, fraction, corr = self.fused_teacher(teacher, states)
            kappa = teacher.logit_scale.exp().clamp(max=MAX_SCALE)
            student_logits = contrastive_logits(student.image, student.text, student.logit_scale)
            losses["dist_loss"] = args.w_dist * bidirectional_kl(
                kappa * fused, student_logits, args.temperature, rows=student.rows
            )
            report["fused_pairs"] = fraction
            report["fusion_dual_corr"] = corr
        if args.w_feat > 0:
            image_target, text_target = teacher.image, teacher.text
            if self.use_fusion_features:
                image_target, text_target = self.fused_features(teacher, states)
            image = project_to_teacher(student.image, self.image_proj)
            text = project_to_teacher(student.text, self.text_proj)
            feat = feature_mse(image, image_target, student.rows) + feature_mse(text, text_target, student.rows)
            losses["feat_loss"] = args.w_feat * feat
        return MethodOutput(losses=losses, report=report)
