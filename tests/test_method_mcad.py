"""MCAD: its losses (top-k pair mask, fused similarity) and its terms against naive
re-implementations on a teacher with a fusion head, and its refusal of a missing or foreign
fusion teacher."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipdistill.distill.base import MethodConfigError, StudentFeatures
from clipdistill.distill.losses import fused_similarity, topk_pair_mask
from fusion_method_fixtures import B, D, FusionFakeTeacher, build, features, make_batch, make_student, naive_kl


def naive_clip(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    logits = scale.exp().clamp(max=100) * image @ text.t()
    labels = torch.arange(len(image))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


# ---------------------------------------------------------------- losses


def test_topk_pair_mask_is_row_and_column_topk() -> None:
    sim = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    mask = topk_pair_mask(sim, 2)
    for i in range(5):
        for j in range(4):
            in_row = j in sorted(range(4), key=lambda c: -sim[i, c])[:2]
            in_col = i in sorted(range(5), key=lambda r: -sim[r, j])[:2]
            assert bool(mask[i, j]) == (in_row or in_col)


@pytest.mark.parametrize("standardise", ["dual", "unit"])
def test_fused_similarity_against_naive(standardise: str) -> None:
    g = torch.Generator().manual_seed(1)
    dual, fusion = torch.rand(4, 4, generator=g), torch.randn(4, 4, generator=g) * 5
    mask = torch.rand(4, 4, generator=g) > 0.4
    fused = fused_similarity(dual, fusion, mask, mu=0.5, standardise=standardise)  # type: ignore[arg-type]
    picked = [float(fusion[i, j]) for i in range(4) for j in range(4) if mask[i, j]]
    duals = [float(dual[i, j]) for i in range(4) for j in range(4) if mask[i, j]]
    mean = sum(picked) / len(picked)
    std = math.sqrt(sum((x - mean) ** 2 for x in picked) / len(picked))
    dual_mean = sum(duals) / len(duals)
    dual_std = math.sqrt(sum((x - dual_mean) ** 2 for x in duals) / len(duals))
    for i in range(4):
        for j in range(4):
            z = (float(fusion[i, j]) - mean) / std * (dual_std if standardise == "dual" else 1.0)
            expected = float(dual[i, j]) + (0.5 * z if mask[i, j] else 0.0)
            assert float(fused[i, j]) == pytest.approx(expected, abs=1e-5)
    assert torch.equal(fused_similarity(dual, torch.full((4, 4), 3.0), mask, 0.5), dual)  # constant F adds nothing


# ---------------------------------------------------------------- the method


def test_mcad_refuses_a_missing_or_foreign_fusion_teacher() -> None:
    with pytest.raises(MethodConfigError, match=r"teacher\.fusion"):
        build("mcad", D, FusionFakeTeacher(with_fusion=False))
    foreign = FusionFakeTeacher(dual_spec="run:/some/other/teacher")
    with pytest.raises(MethodConfigError, match=r"teacher\.spec.*use_fusion_features=false"):
        build("mcad", D, foreign)
    method = build("mcad", D, foreign, {"use_fusion_features": False})  # then v^T, t^T are distilled
    assert not method.use_fusion_features


@pytest.mark.parametrize("pairs", ["all", "topk"])
def test_mcad_terms_against_naive(pairs: str) -> None:
    teacher = FusionFakeTeacher()
    student_dim = 5  # projectors needed
    method = build("mcad", student_dim, teacher, {"fusion_pairs": pairs, "topk": 2})
    raw = make_student(student_dim)
    out = method(make_batch(), features(raw))
    assert set(out.losses) == {"task_loss", "dist_loss", "feat_loss"}

    fusion = teacher.fusion
    assert fusion is not None
    dual = teacher.image.detach() @ teacher.text.detach().t()
    all_logits = fusion.score_matrix(teacher.states)
    mask = torch.ones(B, B, dtype=torch.bool) if pairs == "all" else topk_pair_mask(dual, 2)
    fused = fused_similarity(dual, all_logits, mask, 0.5, "dual")
    s = features(raw)
    student_logits = s.logit_scale.exp() * s.image @ s.text.t()
    expected_dist = naive_kl(20.0 * fused, student_logits)
    assert float(out.losses["dist_loss"].detach()) == pytest.approx(float(expected_dist.detach()), rel=1e-4)
    if pairs == "topk":  # pairs outside the mask are never scored
        assert float(out.report["fused_pairs"]) == pytest.approx(float(mask.float().mean()))
        assert float(out.report["fused_pairs"]) < 1.0

    # features: v̂ = norm(v + 0.3 norm(g_i)), g_i from image i alone, h_i from caption i against image i
    index = torch.arange(B)
    g, h = fusion.backend.pair_heads(teacher.states, index, index)
    v_hat = F.normalize(teacher.image.detach() + 0.3 * F.normalize(g, dim=-1), dim=-1)
    t_hat = F.normalize(teacher.text.detach() + 0.3 * F.normalize(h, dim=-1), dim=-1)
    projected_image = F.normalize(method.image_proj(s.image), dim=-1)
    projected_text = F.normalize(method.text_proj(s.text), dim=-1)
    expected_feat = 2000 * (((projected_image - v_hat) ** 2).mean() + ((projected_text - t_hat) ** 2).mean())
    assert float(out.losses["feat_loss"].detach()) == pytest.approx(float(expected_feat.detach()), rel=1e-4)
    assert float(out.losses["task_loss"].detach()) == pytest.approx(
        float(naive_clip(s.image, s.text, s.logit_scale).detach()), rel=1e-5
    )

    out.total().backward()
    assert all(t.grad is None for t in teacher.tensors())  # the teacher is frozen
    assert raw[0].grad is not None and method.image_proj.weight.grad is not None
    assert all(p.grad is None for p in fusion.parameters())


def test_mcad_feature_targets_are_the_fused_features() -> None:
    """A student already at v̂ = norm(v + λ·norm(g_i)), t̂ = norm(t + λ·norm(h_i)) has no feature
    loss; one at the plain teacher features has some."""
    teacher = FusionFakeTeacher()
    assert teacher.fusion is not None
    index = torch.arange(B)
    g, h = teacher.fusion.backend.pair_heads(teacher.states, index, index)
    v_hat = F.normalize(teacher.image.detach() + 0.3 * F.normalize(g, dim=-1), dim=-1)
    t_hat = F.normalize(teacher.text.detach() + 0.3 * F.normalize(h, dim=-1), dim=-1)
    method = build("mcad", D, teacher)  # same dims: no projector
    scale = torch.tensor(0.0)
    at_target = method(make_batch(), StudentFeatures(image=v_hat, text=t_hat, logit_scale=scale))
    assert float(at_target.losses["feat_loss"].detach()) == pytest.approx(0.0, abs=1e-9)
    plain = StudentFeatures(image=teacher.image.detach(), text=teacher.text.detach(), logit_scale=scale)
    assert float(method(make_batch(), plain).losses["feat_loss"].detach()) > 1.0


def test_mcad_mu_zero_is_plain_logit_distillation_and_fallback_uses_teacher_features() -> None:
    teacher = FusionFakeTeacher()
    method = build("mcad", D, teacher, {"mu": 0.0, "use_fusion_features": False})
    raw = make_student(D)
    out = method(make_batch(), features(raw))
    s = features(raw)
    dual = teacher.image.detach() @ teacher.text.detach().t()
    expected = naive_kl(20.0 * dual, s.logit_scale.exp() * s.image @ s.text.t())
    assert float(out.losses["dist_loss"].detach()) == pytest.approx(float(expected.detach()), rel=1e-4)
    expected_feat = 2000 * (((s.image - teacher.image) ** 2).mean() + ((s.text - teacher.text) ** 2).mean())
    assert float(out.losses["feat_loss"].detach()) == pytest.approx(float(expected_feat.detach()), rel=1e-4)
    assert out.report["fusion_features"] == 0.0
