"""``dcd``: DCD (Rao et al., IEEE TMM 2023) — dynamic contrastive distillation.

The teacher is a (slow) pair scorer; for every query it picks the hard negatives, and the
student learns the teacher's scores on exactly those candidates. Queries where the teacher is
less certain weigh more in the student's own (self-learning) loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

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
from clipdistill.distill.common import (
    check_non_negative,
    check_positive,
    frozen_teacher,
    fusion_of,
    fusion_states,
    require_teacher,
    scale_value,
)
from clipdistill.distill.losses import MAX_SCALE, clip_loss, contrastive_logits, dcd_loss
from clipdistill.distill.registry import register_method

if TYPE_CHECKING:
    from clipdistill.models.fusion import FusionStates, FusionTeacher


def draw_negatives(valid: torch.Tensor, count: int) -> torch.Tensor:
    """(B, c) columns per row drawn uniformly without replacement from the row's ``valid``
    columns; c = ``count`` clipped to the fewest valid columns of any row, so every row gets
    the same number. Uses the global torch generator (seeded and checkpointed by the trainer)."""
    drawn = min(count, int(valid.sum(dim=1).min()))
    keys = torch.rand(valid.shape).to(valid.device).masked_fill(~valid, float("inf"))
    return keys.topk(drawn, dim=1, largest=False).indices


def keep_hard(teacher_scores: torch.Tensor, drawn: torch.Tensor, hard_negatives: int) -> torch.Tensor:
    """(B, 1 + H) candidates: the positive (column = row) first, then the H drawn columns the
    teacher scores highest (H = ``hard_negatives`` clipped to the number drawn). Only the
    diagonal and the drawn entries of ``teacher_scores`` are read."""
    positives = torch.arange(drawn.shape[0], device=drawn.device)[:, None]
    hard = min(hard_negatives, drawn.shape[1])
    if hard == 0:
        return positives
    by_teacher = teacher_scores.gather(1, drawn).topk(hard, dim=1).indices
    return torch.cat([positives, drawn.gather(1, by_teacher)], dim=1)


def fusion_scores(fusion: FusionTeacher, states: FusionStates, drawn: list[torch.Tensor]) -> torch.Tensor:
    """(images, texts) fusion logits at the pairs DCD reads (positives and every drawn
    negative of both directions, in one call of the pair head); NaN elsewhere."""
    n = drawn[0].shape[0]
    device = drawn[0].device
    needed = torch.eye(n, dtype=torch.bool, device=device)
    rows = torch.arange(n, device=device)[:, None]
    needed[rows.expand_as(drawn[0]), drawn[0]] = True  # image → text draws
    if len(drawn) > 1:
        needed[drawn[1], rows.expand_as(drawn[1])] = True  # text → image draws
    image_index, text_index = needed.nonzero(as_tuple=True)
    logits = torch.full((n, n), float("nan"), device=device)
    logits[image_index, text_index] = fusion.pair_logits(states, image_index, text_index).float()
    return logits


@torch.no_grad()
def best_bce_bias(scores: list[torch.Tensor], iterations: int = 20) -> torch.Tensor:
    """The bias c minimising the mean BCE of ``scores`` + c against [1, 0, …, 0] per row (each
    (B, K), column 0 the positive): a 1-D convex problem, solved by Newton's method from the
    midpoint of the mean positive and mean negative score. This is the value a learned bias
    (SigLIP's) converges to; computed per batch it is there from the first step."""
    values = torch.cat([part.float() for part in scores])
    targets = torch.zeros_like(values)
    targets[:, 0] = 1.0
    bias = -0.5 * (values[:, 0].mean() + values[:, 1:].mean())
    for _ in range(iterations):
        probability = torch.sigmoid(values + bias)
        gradient = (probability - targets).mean()
        curvature = (probability * (1 - probability)).mean().clamp_min(1e-6)
        step = (gradient / curvature).clamp(-5.0, 5.0)
        bias = bias - step
        if float(step.abs()) < 1e-5:
            break
    return bias


@register_method
class DCDMethod(DistillMethod):
    """DCD on teacher-mined candidates, both retrieval directions, plus the task loss.

    - Candidates: for each image, its own caption plus ``random_negatives`` (63, the paper's
      Flickr setting) captions drawn at random from the batch, of which the teacher keeps the
      ``hard_negatives`` (7) it scores highest: 8 candidates. *[ours]* Negatives come from the
      batch only (the student must score every candidate, and only the batch's captions are
      encoded), so they are clipped to B − 1; captions with the same text as the query's own
      are not negatives (``exclude_same_text``, true). ``symmetric`` (true, *[ours]*: the
      paper's code is image→text) does the same caption→image and averages the directions.
    - Teacher score z: the fusion teacher's match logit when key ``teacher.fusion`` is set,
      else the dual teacher's κ_T·cos (report ``fusion`` 1/0). *[ours, for a dual-encoder
      student]* (``student_affine``, true): the MSE fits the student's κ_S·cos to the teacher's
      scores mapped onto the student's scale, (z − b)/a with a = σ_z/σ_s and b = μ_z − a·μ_s the
      first two moments of the batch's candidate scores (no gradient), i.e. only the teacher's
      shape; DCD's cross-encoder student scores with its own ITM head, which our dual-encoder
      student lacks. The map is fitted on the teacher's side, per batch, in closed form: raw
      scores pull the student's positive cosines toward any constant offset of the teacher's
      (our fusion head's logits sit below the dual teacher's); a learned affine moves by about
      lr per step and stays near its init in a short run; an affine on the student's side either
      holds the student to its first spread or scales the distillation gradient by a², which the
      gradient clip then takes from the task loss (docs/results.md, "DCD"). The fit reads the whole
      batch's scores (every process holds all features), so it is the same in every process of a
      distributed run, and it has no state to checkpoint. ``student_affine: false`` compares raw
      scores.
    - Self-learning read-out κ_S·cos + c *[ours]* (``self_bias``, true): c the bias that
      minimises the batch's BCE (:func:`best_bce_bias`), what SigLIP's learned bias converges
      to: the BCE's 0 targets for hard negatives then ask "below c", not "cos → −1" (which
      pushes the captions most like the query to the far side of the sphere against the
      contrastive geometry).
    - Per direction (:func:`~clipdistill.distill.losses.dcd_loss`): entropy shares e_b,
      d = T²·MSE(z/T, s/T), n = Σ_b e_b·BCEWithLogits(s_b, [1, 0, …, 0]), loss = α·d + (1−α)·n,
      α 0.2, T 1 (T cancels in the MSE: a ``temperature`` other than 1 is refused with it, and acts
      only on the KLs below). *[ours]* ``distill: kl`` replaces the MSE by T²·KL(softmax(z/T) ‖ softmax(s/T))
      over each query's candidates: the teacher's ranking of its hard negatives, not their score
      values. The MSE is the term that pulls the student below scratch: the teacher's near-ties
      on its hardest negatives ask the student to narrow exactly the margins its task loss widens
      (docs/results.md, "DCD"); ``tuned`` says which the val sweep picked. *[ours]* ``distill:
      kl-negatives`` leaves the positive out of the KL (both sides renormalised over the
      negatives; decoupled KD's non-target term): it separates what the teacher's mass on the
      positive costs the student from what its ranking of the hard negatives costs
      (``benchmarks/dcd_terms.py``; it is the ranking: docs/results.md, "DCD"). *[ours]*
      ``teacher_scale`` k (1) multiplies the distillation targets: with the KL, the teacher's
      distribution over the candidates at temperature 1/k, so k > 1 sharpens a teacher whose own
      logit scale is low for the number of candidates (a LiT teacher's κ_T against 1 + 31
      candidates); the mining and the entropy shares read the unscaled scores.
      ``per_sample_kd_weight: false`` is the released code (its KD weights are a no-op); ``true``
      the paper's per-sample r_b = softmax_b((1 − e_b)²) on the distillation.
    - Terms: ``dcd_distill_loss`` = w_dcd·α·d, ``dcd_self_loss`` = w_dcd·(1−α)·n (their sum is
      the DCD loss), ``task_loss`` = w_task · the student's clip loss on the whole batch.

    Report: ``logit_scale``, ``fusion``, ``candidates`` (1 + negatives kept), ``max_share``,
    ``score_scale``/``score_bias`` (a, b) with ``student_affine``, ``bce_bias`` (c) with ``self_bias``."""

    name = "dcd"
    summary = "DCD: teacher-mined hard negatives, score distillation + entropy-weighted self-learning"
    # The paper's score MSE narrows the margins the task loss widens; a KL over the candidates
    # (ours) compares rankings only. The KL is shift-invariant, so it needs no affine: with
    # student_affine false it fits the teacher's own sharpness.
    tuned = TunedArgs(
        {"distill": "kl", "alpha": 0.8, "student_affine": False, "hard_negatives": 31},
        chosen_by="benchmarks/results/methods_sweep_dcd_comkd.json "
        "(val; the KL over the MSE in benchmarks/results/methods_dcd_lite0.json)",
    )
    needs = frozenset({"teacher_embeddings"})
    optional_needs = frozenset({"fusion_scores"})

    @dataclass(frozen=True)
    class Args(MethodArgs):
        """Defaults (the paper's): α 0.2, T 1, 63 random → 7 hard negatives, released KD
        weighting (``per_sample_kd_weight`` false), score MSE (``distill`` mse); ours: w_task 1,
        w_dcd 1, symmetric, exclude_same_text, student_affine and self_bias (fitted per batch),
        teacher_scale 1."""

        w_task: float = 1.0
        w_dcd: float = 1.0
        alpha: float = 0.2
        temperature: float = 1.0
        random_negatives: int = 63
        hard_negatives: int = 7
        per_sample_kd_weight: bool = False
        symmetric: bool = True
        exclude_same_text: bool = True
        student_affine: bool = True
        self_bias: bool = True
        distill: str = "mse"
        teacher_scale: float = 1.0

        def __post_init__(self) -> None:
            check_non_negative(self, "w_task", "w_dcd")
            check_positive(self, "temperature", "teacher_scale")
            if self.distill not in ("mse", "kl", "kl-negatives"):
                raise MethodConfigError(
                    f"key 'method_args.distill' must be 'mse', 'kl' or 'kl-negatives', got {self.distill!r}"
                )
            if self.distill == "mse" and self.temperature != 1.0:
                raise MethodConfigError(
                    f"key 'method_args.temperature' ({self.temperature!r}) acts only with distill 'kl' or "
                    "'kl-negatives': the paper's T²·MSE(z/T, s/T) equals MSE(z, s) at every T"
                )
            if not 0.0 <= self.alpha <= 1.0:
                raise MethodConfigError(f"key 'method_args.alpha' must be in [0, 1], got {self.alpha!r}")
            for key in ("random_negatives", "hard_negatives"):
                if getattr(self, key) < 1:
                    raise MethodConfigError(f"key 'method_args.{key}' must be >= 1, got {getattr(self, key)!r}")
            if self.hard_negatives > self.random_negatives:
                raise MethodConfigError(
                    f"key 'method_args.hard_negatives' ({self.hard_negatives}) must not exceed "
                    f"'method_args.random_negatives' ({self.random_negatives}): hard negatives are kept from them"
                )
            if self.w_task == self.w_dcd == 0:
                raise MethodConfigError("keys 'method_args.w_task' and 'method_args.w_dcd' are both 0")

    def __init__(self, student_dim: int, teacher: TeacherSource | None, args: Args) -> None:
        super().__init__(student_dim, require_teacher(self.name, teacher), args)
        self.args: DCDMethod.Args = args

    @torch.no_grad()
    def fit_read_outs(
        self, teacher_scores: list[torch.Tensor], student_scores: list[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The batch's read-outs (see the class docstring) from its candidates' scores, per
        direction (B, K) with column 0 the positive: ``score_scale`` a and ``score_bias`` b with
        ``student_affine``, ``bce_bias`` c with ``self_bias``; detached."""
        z = torch.cat([scores.flatten() for scores in teacher_scores]).float()
        student = torch.cat([scores.flatten() for scores in student_scores]).float()
        fitted: dict[str, torch.Tensor] = {}
        if self.args.student_affine:
            scale = z.std() / student.std().clamp_min(1e-6)
            fitted["score_scale"] = scale
            fitted["score_bias"] = z.mean() - scale * student.mean()
        if self.args.self_bias and student_scores[0].shape[1] > 1:
            fitted["bce_bias"] = best_bce_bias(student_scores)
        return fitted

    def forward(self, batch: Batch, student: StudentFeatures) -> MethodOutput:
        args = self.args
        losses: dict[str, torch.Tensor] = {}
        fusion = fusion_of(self.teacher)
        report = {"logit_scale": scale_value(student.logit_scale), "fusion": float(fusion is not None)}
        if args.w_task > 0:
            task = clip_loss(student.image, student.text, student.logit_scale, student.rows)
            losses["task_loss"] = args.w_task * task
        if args.w_dcd == 0:
            return MethodOutput(losses=losses, report=report)

        raw = self.teacher_outputs(batch)
        teacher = frozen_teacher(raw, like=student.image)
        n = student.image.shape[0]
        device = student.image.device
        valid = ~torch.eye(n, dtype=torch.bool, device=device)
        if args.exclude_same_text:
            distinct: dict[str, int] = {}
            text_ids = torch.tensor([distinct.setdefault(text, len(distinct)) for text in batch.texts], device=device)
            valid &= text_ids[:, None] != text_ids[None, :]
        # Under distributed.local_loss the student scores only this process's query rows (b × B,
        # each direction); negatives are drawn and mined for the whole batch, identically in
        # every process (same RNG stream), so the candidates are the one-process candidates.
        rows = student.rows
        query = slice(None) if rows is None else rows
        if rows is None:
            full = contrastive_logits(student.image, student.text, student.logit_scale)
            student_directions = [full, full.t()]
        else:
            scale = student.logit_scale.exp().clamp(max=MAX_SCALE)
            student_directions = [scale * student.image[rows] @ student.text.t()]
            student_directions.append(scale * student.text[rows] @ student.image.t())
        masks = [valid, valid.t()] if args.symmetric else [valid]
        drawn = [draw_negatives(mask, args.random_negatives) for mask in masks]
        if fusion is None:
            z = contrastive_logits(teacher.image, teacher.text, teacher.logit_scale)  # κ_T·cos
        else:
            z = fusion_scores(fusion, fusion_states(self.name, raw), drawn).to(student.image)
        directions = [(z, student_directions[0], drawn[0])]
        if args.symmetric:
            directions.append((z.t(), student_directions[1], drawn[1]))
        mined = [keep_hard(scores, columns, args.hard_negatives) for scores, _, columns in directions]
        if rows is None:
            full = student_directions[0].detach()
        else:  # the whole batch's student scores for the fit (each process holds all features)
            with torch.no_grad():
                full = contrastive_logits(student.image, student.text, student.logit_scale)
        pairs = list(zip(directions, [full, full.t()][: len(mined)], mined, strict=True))
        read_outs = self.fit_read_outs(
            [scores.gather(1, candidates) for (scores, _, _), _, candidates in pairs],
            [logits.gather(1, candidates) for _, logits, candidates in pairs],
        )
        scale, bias = read_outs.get("score_scale"), read_outs.get("score_bias")
        bce_bias = read_outs.get("bce_bias")
        results = []
        for (scores, logits, _), candidates in zip(directions, mined, strict=True):
            teacher_scores = scores.gather(1, candidates)
            targets = teacher_scores if scale is None or bias is None else (teacher_scores - bias) / scale
            results.append(
                dcd_loss(
                    teacher_scores,
                    logits.gather(1, candidates[query]),
                    alpha=args.alpha,
                    temperature=args.temperature,
                    per_sample_kd_weight=args.per_sample_kd_weight,
                    rows=rows,
                    distill_targets=targets * args.teacher_scale,
                    self_bias=0.0 if bce_bias is None else bce_bias.to(logits),
                    distill=args.distill,
                )
            )
        distill = torch.stack([r["distill"] for r in results]).mean()
        self_learning = torch.stack([r["self"] for r in results]).mean()
        losses["dcd_distill_loss"] = args.w_dcd * args.alpha * distill
        losses["dcd_self_loss"] = args.w_dcd * (1.0 - args.alpha) * self_learning
        report["candidates"] = float(mined[0].shape[1])
        report["max_share"] = float(max(float(r["shares"].max()) for r in results))
        report.update({name: float(value) for name, value in read_outs.items()})
        return MethodOutput(losses=losses, report=report)
