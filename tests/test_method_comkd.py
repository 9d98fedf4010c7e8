"""ComKD: its losses (moment alignment, attention) and its terms (IFAlign, EduAttention
refinement on the image side and, optionally, the text side) against naive re-implementations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipdistill.distill.losses import attend, moment_alignment
from fusion_method_fixtures import B, D, FusionFakeTeacher, build, features, make_batch, make_student, naive_kl

# ---------------------------------------------------------------- losses


def test_moment_alignment_and_attention_against_naive() -> None:
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g) * 2 + 1
    expected = 0.0
    for d in range(3):
        a, b = x[:, d].tolist(), y[:, d].tolist()
        mean_a, mean_b = sum(a) / 5, sum(b) / 5
        var_a = sum((v - mean_a) ** 2 for v in a) / 5
        var_b = sum((v - mean_b) ** 2 for v in b) / 5
        expected += abs(mean_a - mean_b) + abs(var_a - var_b)
    assert float(moment_alignment(x, y)) == pytest.approx(expected, rel=1e-5)
    assert float(moment_alignment(y, y)) == 0.0
    q, k = torch.randn(2, 3, generator=g), torch.randn(4, 3, generator=g)
    out = attend(q, k, k, scale=2.0)
    for i in range(2):
        weights = torch.softmax(torch.tensor([float(q[i] @ k[j]) / 2.0 for j in range(4)]), 0)
        torch.testing.assert_close(out[i], (weights[:, None] * k).sum(0))


# ---------------------------------------------------------------- the method


def test_comkd_terms_against_naive() -> None:
    teacher = FusionFakeTeacher(with_fusion=False)
    method = build("comkd", 5, teacher, {"alpha_init": 0.5})
    raw = make_student(5)
    out = method(make_batch(), features(raw))
    assert set(out.losses) == {"task_loss", "align_loss", "ref_loss"}
    s = features(raw)
    p = F.normalize(method.image_proj(s.image), dim=-1)
    pt = F.normalize(method.text_proj(s.text), dim=-1)
    tv, tt = teacher.image.detach(), teacher.text.detach()
    expected_align = moment_alignment(p, tv) + moment_alignment(pt, tt)
    assert float(out.losses["align_loss"].detach()) == pytest.approx(float(expected_align.detach()), rel=1e-5)
    read = torch.softmax(20.0 * p @ tt.t(), dim=1) @ tt  # κ_a starts at the teacher's logit scale (20)
    f = F.normalize(p + 0.5 * method.attention_fc(read), dim=-1)
    expected_ref = naive_kl(20.0 * tv @ tt.t(), s.logit_scale.exp() * f @ tt.t())
    assert float(out.losses["ref_loss"].detach()) == pytest.approx(float(expected_ref.detach()), rel=1e-4)
    out.total().backward()
    assert method.edu_alpha.grad is not None and float(method.edu_alpha.grad.abs()) > 0
    assert all(t.grad is None for t in teacher.tensors())


def test_comkd_text_refine_mirrors_the_image_side_against_naive() -> None:
    teacher = FusionFakeTeacher(with_fusion=False)
    method = build("comkd", 5, teacher, {"alpha_init": 0.5, "text_refine": True, "w_align": 0.0})
    raw = make_student(5)
    out = method(make_batch(), features(raw))
    assert set(out.losses) == {"task_loss", "ref_loss", "text_ref_loss"}
    s = features(raw)
    q = F.normalize(method.text_proj(s.text), dim=-1)
    tv, tt = teacher.image.detach(), teacher.text.detach()
    read = torch.softmax(20.0 * q @ tv.t(), dim=1) @ tv  # the text queries the teacher's images
    g = F.normalize(q + 0.5 * method.text_attention_fc(read), dim=-1)
    expected = naive_kl(20.0 * tv @ tt.t(), s.logit_scale.exp() * tv @ g.t())
    assert float(out.losses["text_ref_loss"].detach()) == pytest.approx(float(expected.detach()), rel=1e-4)
    out.losses["text_ref_loss"].backward()  # it trains the student's text tower, not its image tower
    assert method.text_edu_alpha.grad is not None and float(method.text_edu_alpha.grad.abs()) > 0
    assert raw[1].grad is not None and float(raw[1].grad.abs().sum()) > 0
    assert raw[0].grad is None
    plain = build("comkd", 5, teacher, {"alpha_init": 0.5, "w_align": 0.0})
    assert "text_ref_loss" not in plain(make_batch(), features(make_student(5))).losses
    assert plain.text_proj is None and plain.text_attention_fc is None


def test_comkd_alpha_starts_at_zero_so_attention_starts_as_identity() -> None:
    method = build("comkd", D, FusionFakeTeacher(with_fusion=False))
    assert float(method.edu_alpha.detach()) == 0.0
    p = F.normalize(torch.randn(B, D), dim=-1)
    torch.testing.assert_close(method.refined(p, torch.randn(B, D)), p)
