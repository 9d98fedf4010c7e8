"""Four defects a seed method can have, each a test that fails if its method has it.

- MCAD: the image target v̂ depending on which caption of the image is in the batch, and g, h
  unnormalised (then cos(v̂, v^T) is 0.45 in the demo);
- DCD: a constant shift of the teacher's logits moving the student's cosines (MSE on κ_S·cos);
- ComKD: EduAttention with C = √d on unit vectors, which is uniform (entropy ≈ log B);
- ComKD: IFAlign without an ``align_reduction`` knob (its summed L1 sets the global gradient clip).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from clipdistill.distill.base import (
    Batch,
    MethodConfigError,
    StudentFeatures,
    TeacherOutputs,
    TeacherSource,
    build_method_args,
)
from clipdistill.distill.losses import moment_alignment
from clipdistill.distill.methods import get_method
from clipdistill.models.fusion import FusionConfig, FusionEncoder, FusionStates, FusionTeacher


def build(name: str, student_dim: int, teacher: TeacherSource, raw_args: dict | None = None):
    cls = get_method(name)
    return cls(student_dim, teacher, build_method_args(cls, raw_args))


def make_batch(n: int, texts: list[str] | None = None) -> Batch:
    return Batch(
        unit_pixels=torch.zeros(n, 3, 4, 4),
        texts=texts or [f"caption {i}" for i in range(n)],
        image_ids=[str(i) for i in range(n)],
        caption_ids=[f"{i}_0" for i in range(n)],
        aug_ids=torch.zeros(n, dtype=torch.int64),
    )


class FixedTeacher(TeacherSource):
    """Fixed teacher outputs (and optionally a fusion teacher with fixed states)."""

    def __init__(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        log_scale: float,
        fusion: object | None = None,
        states: FusionStates | None = None,
    ) -> None:
        self.embed_dim = int(image.shape[1])
        self.spec = "fake:teacher"
        self.image, self.text = image, text
        self.log_scale = torch.tensor(log_scale)
        self.fusion = fusion  # type: ignore[assignment]
        self.states = states

    def __call__(self, batch: Batch) -> TeacherOutputs:
        return TeacherOutputs(image=self.image, text=self.text, logit_scale=self.log_scale, fusion=self.states)


def clustered(n: int, dim: int, concepts: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-like unit features: images and captions of ``concepts`` shared concepts, each its
    own noisy view (matched cosines about 0.3-0.5, unmatched about 0, as a trained CLIP teacher's)."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(concepts, dim, generator=g), dim=-1)
    concept = torch.arange(n) % concepts
    image = F.normalize(centres[concept] + noise * F.normalize(torch.randn(n, dim, generator=g), dim=-1), dim=-1)
    text = F.normalize(centres[concept] + noise * F.normalize(torch.randn(n, dim, generator=g), dim=-1), dim=-1)
    return image, text


# ---------------------------------------------------------------- MCAD
def test_mcad_image_target_ignores_the_caption_and_is_a_bounded_nudge() -> None:
    """Rows 0 and 1 are one image with two captions: their image targets must agree, and every
    target stays within cos >= 0.9 of the dual teacher's feature even with large heads."""
    n, dim = 4, 8
    g = torch.Generator().manual_seed(3)
    image = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    image[1] = image[0]
    text = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    tokens = torch.randn(n, 3, 8, generator=g)
    tokens[1] = tokens[0]  # the same image's states
    mask = torch.ones(n, 4, dtype=torch.bool)
    states = FusionStates(
        image=tokens, image_global=image, text=torch.randn(n, 4, 8, generator=g), text_mask=mask, text_global=text
    )
    config = FusionConfig(
        dual_spec="fake:teacher", image_token_dim=5, image_tokens=3, text_token_dim=7, embed_dim=dim, width=8, heads=2
    )
    torch.manual_seed(0)
    encoder = FusionEncoder(config)
    with torch.no_grad():  # heads far larger than the unit features (as the demo's: |g| ≈ 7.9)
        torch.nn.init.normal_(encoder.itm.weight)  # a trained logit: methods refuse an untrained head
        encoder.image_head.weight.mul_(50.0)
        encoder.text_head.weight.mul_(50.0)
    teacher = FixedTeacher(image, text, math.log(20.0), FusionTeacher(encoder, spec="fusion:fake"), states)
    method = build("mcad", dim, teacher, {"w_task": 0.0, "w_dist": 0.0, "w_feat": 1.0})
    assert method.use_fusion_features
    # Read the targets off the feature loss's gradient at a zero student: d/ds mean((s − y)²) = 2(s − y)/(n·dim).
    student_image = torch.zeros(n, dim, requires_grad=True)
    student_text = torch.zeros(n, dim, requires_grad=True)
    out = method(make_batch(n), StudentFeatures(image=student_image, text=student_text, logit_scale=torch.tensor(0.0)))
    out.total().backward()
    assert student_image.grad is not None and student_text.grad is not None
    v_hat = -student_image.grad * n * dim / 2
    t_hat = -student_text.grad * n * dim / 2
    assert float(F.cosine_similarity(v_hat[0], v_hat[1], dim=0)) > 0.999
    assert float(F.cosine_similarity(v_hat, image, dim=-1).min()) >= 0.9
    assert float(F.cosine_similarity(t_hat, text, dim=-1).min()) >= 0.9
    assert float((v_hat - image).norm(dim=-1).max()) > 1e-3  # the nudge is not nothing


# ---------------------------------------------------------------- DCD
class ShiftedFusion:
    """A stand-in fusion teacher whose match logits are fixed scores plus a constant."""

    def __init__(self, scores: torch.Tensor, shift: float) -> None:
        self.scores, self.shift = scores, shift

    def pair_logits(self, states: object, image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
        return self.scores[image_index, text_index] + self.shift


def _gradient_after_fitting(
    method: torch.nn.Module, loss: Callable[[], torch.Tensor], raw: torch.Tensor
) -> torch.Tensor:
    """``raw``'s gradient of ``loss`` after fitting the method's own trainable parameters to it
    (LBFGS, as training would settle them), so a test sees what the student is pushed towards."""
    params = [p for p in method.parameters() if p.requires_grad]
    if params:
        optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            value = loss()
            value.backward()
            return value

        optimizer.step(closure)
    raw.grad = None
    loss().backward()
    assert raw.grad is not None
    return raw.grad.clone()


def _dcd_against_shifted_fusion(shift: float) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """``(method, raw image, raw text)``: DCD (no task loss, all 7 negatives kept) against a
    fusion teacher whose logits are 30·cos plus ``shift``, and a fixed student's raw features
    (the image's gradient is what the tests read)."""
    n, dim = 8, 16
    image, text = clustered(n, dim, 4, 0.8, seed=5)
    states = FusionStates(
        image=torch.zeros(n, 1, 1),
        image_global=image,
        text=torch.zeros(n, 1, 1),
        text_mask=torch.ones(n, 1, dtype=torch.bool),
        text_global=text,
    )
    teacher = FixedTeacher(image, text, math.log(30.0), ShiftedFusion(30.0 * image @ text.t(), shift), states)
    method = build("dcd", dim, teacher, {"w_task": 0.0, "random_negatives": 7, "hard_negatives": 7})
    raw_image, raw_text = clustered(n, dim, 4, 1.0, seed=6)
    return method, raw_image.requires_grad_(True), raw_text.requires_grad_(True)


def _dcd_student_gradient(shift: float) -> torch.Tensor:
    """Gradient of the DCD loss on a fixed student's features against the shifted teacher,
    after fitting whatever trainable parameters the method has (none: its read-outs are
    fitted per batch)."""
    method, raw_image, raw_text = _dcd_against_shifted_fusion(shift)

    def loss() -> torch.Tensor:
        torch.manual_seed(0)  # the same candidates every call
        student = StudentFeatures(
            image=F.normalize(raw_image, dim=-1), text=F.normalize(raw_text, dim=-1), logit_scale=torch.tensor(2.0)
        )
        return method(make_batch(8), student).total()

    return _gradient_after_fitting(method, loss, raw_image)


def test_dcd_student_gradient_does_not_move_with_a_constant_teacher_shift() -> None:
    """The fusion head's logits sat about 5.7 below the dual teacher's: such a constant must be
    absorbed by the student's score affine, not pull the student's cosines."""
    base = _dcd_student_gradient(0.0)
    shifted = _dcd_student_gradient(-5.7)
    assert float(base.norm()) > 0
    assert float((shifted - base).norm()) <= 1e-3 * float(base.norm()) + 1e-6


def _dcd_step(shift: float, log_scale: float = 2.6) -> tuple[torch.Tensor, dict[str, float]]:
    """The student's gradient of one DCD step and its report, against a fusion teacher shifted
    by ``shift``, for a student whose logit scale is exp(``log_scale``)."""
    method, raw_image, raw_text = _dcd_against_shifted_fusion(shift)
    torch.manual_seed(0)
    student = StudentFeatures(
        image=F.normalize(raw_image, dim=-1),
        text=F.normalize(raw_text, dim=-1),
        logit_scale=torch.tensor(log_scale),
    )
    output = method(make_batch(8), student)
    output.total().backward()
    assert raw_image.grad is not None
    return raw_image.grad.clone(), output.report


def test_dcd_read_outs_are_fitted_to_every_batch() -> None:
    """Learned by AdamW, a, b, c moved ~lr per step and stayed at their init (1, 0, 0) for a whole
    demo run while a teacher shift of -5.7 needs b ≈ -5.7; fitted once, a held the student to its
    first spread. Fitted per batch, the very first step is blind to the shift, the BCE starts
    balanced, and a follows the student's scale (twice the logit scale: half the a)."""
    base, report = _dcd_step(0.0)
    shifted, shifted_report = _dcd_step(-5.7)
    assert shifted_report["score_bias"] == pytest.approx(report["score_bias"] - 5.7, abs=1e-4)
    assert float((shifted - base).norm()) <= 1e-4 * float(base.norm())
    assert report["bce_bias"] < -1.0  # κ_S·cos of positives and hard negatives sit well above 0
    _, sharper = _dcd_step(0.0, log_scale=2.6 + math.log(2.0))
    assert sharper["score_scale"] == pytest.approx(report["score_scale"] / 2, rel=1e-4)


# ---------------------------------------------------------------- ComKD
def test_comkd_attention_attends_on_teacher_like_features() -> None:
    """On unit teacher-like features (d = 384, B = 64) the attention's entropy is well below
    log B; the paper's fixed C = √d (kept as ``attention_c``) is uniform there: the defect."""
    n, dim = 64, 384
    image, text = clustered(n, dim, 16, 1.0, seed=1)
    teacher = FixedTeacher(image, text, math.log(1 / 0.07))
    method = build("comkd", 32, teacher)
    student = StudentFeatures(
        image=F.normalize(torch.randn(n, 32), dim=-1),
        text=F.normalize(torch.randn(n, 32), dim=-1),
        logit_scale=torch.tensor(math.log(1 / 0.07)),
    )
    out = method(make_batch(n), student)  # the first batch sets κ_a to the teacher's scale
    assert out.report["edu_scale"] == pytest.approx(1 / 0.07, rel=1e-4)
    # What the attention sees once P has learnt to map the student near the teacher's image features.
    projected = F.normalize(image + 0.5 * F.normalize(torch.randn(n, dim), dim=-1), dim=-1)

    def relative_entropy(weights: torch.Tensor) -> float:
        weights = weights.detach()
        return float(-(weights * weights.clamp_min(1e-12).log()).sum(dim=1).mean() / math.log(n))

    assert relative_entropy(method.attention_weights(projected, text)) < 0.6
    paper = build("comkd", 32, teacher, {"attention_c": math.sqrt(dim)})
    assert relative_entropy(paper.attention_weights(projected, text)) > 0.99
    out.total().backward()
    assert method.edu_log_scale.grad is not None  # κ_a is learnt


def test_comkd_align_reduction_knob() -> None:
    n, dim = 16, 12
    image, text = clustered(n, dim, 4, 1.0, seed=2)
    teacher = FixedTeacher(image, text, math.log(20.0))
    student = StudentFeatures(
        image=F.normalize(torch.randn(n, 6), dim=-1),
        text=F.normalize(torch.randn(n, 6), dim=-1),
        logit_scale=torch.tensor(2.0),
    )
    values = {}
    for reduction in ("sum", "mean"):
        torch.manual_seed(0)  # the same projectors
        method = build("comkd", 6, teacher, {"align_reduction": reduction, "w_ref": 0.0})
        values[reduction] = float(method(make_batch(n), student).losses["align_loss"].detach())
    assert values["sum"] == pytest.approx(dim * values["mean"], rel=1e-5)
    x, y = torch.randn(5, 3), torch.randn(5, 3)
    assert float(moment_alignment(x, y, "sum")) == pytest.approx(3 * float(moment_alignment(x, y, "mean")), rel=1e-6)
    with pytest.raises(MethodConfigError, match=r"method_args\.align_reduction"):
        build("comkd", 6, teacher, {"align_reduction": "max"})


@pytest.mark.parametrize(
    ("heads_input", "why"),
    [(None, "image target would carry the caption"), ("sides", "text target would carry the image")],
)
def test_a_fusion_folder_whose_heads_read_the_other_side_gives_mcad_no_fused_features(
    heads_input: str | None, why: str
) -> None:
    """A fusion config written before ``heads_input`` has pair heads (g read the caption), one
    written with ``sides`` heads has h reading the paired image: MCAD must not use them as
    targets, and says why."""
    raw = {
        "dual_spec": "fake:teacher",
        "image_token_dim": 5,
        "image_tokens": 3,
        "text_token_dim": 7,
        "embed_dim": 8,
        "width": 8,
        "heads": 2,
    }
    assert FusionConfig.from_dict(raw).heads_input == "pair"
    assert FusionConfig.from_dict({**raw, "heads_input": "sides"}).heads_input == "sides"
    old = FusionConfig.from_dict(raw if heads_input is None else {**raw, "heads_input": heads_input})
    image, text = clustered(4, 8, 2, 1.0, seed=0)
    states = FusionStates(
        image=torch.randn(4, 3, 8),
        image_global=image,
        text=torch.randn(4, 4, 8),
        text_mask=torch.ones(4, 4, dtype=torch.bool),
        text_global=text,
    )
    encoder = FusionEncoder(old)
    torch.nn.init.normal_(encoder.itm.weight)  # a trained logit: methods refuse an untrained head
    teacher = FixedTeacher(image, text, math.log(20.0), FusionTeacher(encoder, "fusion:old"), states)
    with pytest.warns(UserWarning, match=why):
        method = build("mcad", 8, teacher)
    assert not method.use_fusion_features
    assert (
        method(make_batch(4), StudentFeatures(image=image, text=text, logit_scale=torch.tensor(2.0))).report[
            "fusion_features"
        ]
        == 0.0
    )


def _dcd_self_learning_gradient(self_bias: bool) -> torch.Tensor:
    """Gradient of DCD's self-learning term alone (α 0) on a student that already ranks every
    positive first (cos ≈ 0.8 against ≈ 0.2), after fitting the method's own parameters."""
    n, dim = 8, 16
    image, text = clustered(n, dim, 4, 0.8, seed=5)
    teacher = FixedTeacher(image, text, math.log(30.0))
    args = {"w_task": 0.0, "alpha": 0.0, "random_negatives": 7, "hard_negatives": 7, "self_bias": self_bias}
    method = build("dcd", dim, teacher, args)
    generator = torch.Generator().manual_seed(3)
    shared = F.normalize(torch.randn(n, dim, generator=generator), dim=-1)
    raw_image = (shared + 0.1 * torch.randn(n, dim, generator=generator)).requires_grad_(True)
    raw_text = (shared + 0.1 * torch.randn(n, dim, generator=generator)).requires_grad_(True)

    def loss() -> torch.Tensor:
        torch.manual_seed(0)
        student = StudentFeatures(
            image=F.normalize(raw_image, dim=-1),
            text=F.normalize(raw_text, dim=-1),
            logit_scale=torch.tensor(math.log(14.0)),
        )
        return method(make_batch(n), student).total()

    return _gradient_after_fitting(method, loss, raw_image)


def test_dcd_self_learning_does_not_push_ranked_negatives_to_the_far_side() -> None:
    """Without its bias, the BCE's 0 targets on κ_S·cos are only met at cos → −1, so a student
    that already ranks every positive first keeps a large gradient; with the learned bias the
    BCE is nearly satisfied by the ranking itself."""
    with_bias = float(_dcd_self_learning_gradient(True).norm())
    without = float(_dcd_self_learning_gradient(False).norm())
    assert with_bias < 0.1 * without  # measured: 0.037 against 1.10
