"""Each loss in ``distill.losses`` against a naive reference written with explicit loops and
plain formulas on tiny tensors, plus parity with open_clip's ``DistillClipLoss``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import DistillClipLoss

from clipdistill.distill import losses

# ---------------------------------------------------------------- naive references (floats)


def _softmax(row: list[float]) -> list[float]:
    m = max(row)
    exps = [math.exp(x - m) for x in row]
    total = sum(exps)
    return [e / total for e in exps]


def _matmul_t(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    """a · bᵀ with loops."""
    return [[sum(x * y for x, y in zip(ra, rb, strict=True)) for rb in b] for ra in a]


def _transpose(m: list[list[float]]) -> list[list[float]]:
    return [list(col) for col in zip(*m, strict=True)]


def _scaled(m: list[list[float]], s: float) -> list[list[float]]:
    return [[s * x for x in row] for row in m]


def _ce_diag(logits: list[list[float]]) -> float:
    """Mean over rows of −log softmax(row)[i]."""
    return sum(-math.log(_softmax(row)[i]) for i, row in enumerate(logits)) / len(logits)


def _soft_ce(teacher: list[list[float]], student: list[list[float]]) -> float:
    total = 0.0
    for t_row, s_row in zip(teacher, student, strict=True):
        p, q = _softmax(t_row), _softmax(s_row)
        total += -sum(pi * math.log(qi) for pi, qi in zip(p, q, strict=True))
    return total / len(teacher)


def _kl(teacher: list[list[float]], student: list[list[float]]) -> float:
    total = 0.0
    for t_row, s_row in zip(teacher, student, strict=True):
        p, q = _softmax(t_row), _softmax(s_row)
        total += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))
    return total / len(teacher)


def _mse(a: list[list[float]], b: list[list[float]]) -> float:
    diffs = [(x - y) ** 2 for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
    return sum(diffs) / len(diffs)


def _unit(b: int, d: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, d, generator=generator, dtype=torch.float64), dim=-1)


def _l(t: torch.Tensor) -> list[list[float]]:
    return t.tolist()


# ---------------------------------------------------------------- tests


def test_clip_loss_matches_naive() -> None:
    image, text = _unit(4, 6, 0), _unit(4, 6, 1)
    scale = math.log(10.0)
    logits = _scaled(_matmul_t(_l(image), _l(text)), 10.0)
    expected = 0.5 * (_ce_diag(logits) + _ce_diag(_transpose(logits)))
    got = losses.clip_loss(image, text, torch.tensor(scale, dtype=torch.float64))
    assert float(got) == pytest.approx(expected, abs=1e-10)


def test_contrastive_logits_clamps_scale_at_100() -> None:
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    logits = losses.contrastive_logits(image, image, torch.tensor(math.log(500.0)))
    assert torch.allclose(logits, 100.0 * torch.eye(2))


def test_soft_cross_entropy_matches_naive() -> None:
    teacher = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    student = torch.tensor([[0.3, 0.1, 0.2], [-1.0, 2.0, 0.0], [0.5, -0.5, 2.0]], dtype=torch.float64)
    got = losses.soft_cross_entropy(teacher, student)
    assert float(got) == pytest.approx(_soft_ce(_l(teacher), _l(student)), abs=1e-10)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_divergence_matches_naive(temperature: float) -> None:
    teacher = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.0, 1.0, 3.0, 2.0], [1.0, 1.0, 1.0, 4.0]], dtype=torch.float64)
    student = torch.tensor([[0.3, 0.1, 0.2, 0.0], [-1.0, 2.0, 0.0, 1.0], [0.5, -0.5, 2.0, 0.0]], dtype=torch.float64)
    expected = _kl(_scaled(_l(teacher), 1 / temperature), _scaled(_l(student), 1 / temperature)) * temperature**2
    assert float(losses.kl_divergence(teacher, student, temperature)) == pytest.approx(expected, abs=1e-10)
    assert float(losses.kl_divergence(teacher, teacher, temperature)) == pytest.approx(0.0, abs=1e-12)


def test_bidirectional_kl_matches_naive() -> None:
    teacher = _scaled(_matmul_t(_l(_unit(4, 5, 2)), _l(_unit(4, 5, 3))), 20.0)
    student = _scaled(_matmul_t(_l(_unit(4, 5, 4)), _l(_unit(4, 5, 5))), 8.0)
    expected = 0.5 * (_kl(teacher, student) + _kl(_transpose(teacher), _transpose(student)))
    got = losses.bidirectional_kl(
        torch.tensor(teacher, dtype=torch.float64), torch.tensor(student, dtype=torch.float64)
    )
    assert float(got) == pytest.approx(expected, abs=1e-10)


def test_feature_mse_matches_naive() -> None:
    a, b = _unit(3, 4, 6), _unit(3, 4, 7)
    assert float(losses.feature_mse(a, b)) == pytest.approx(_mse(_l(a), _l(b)), abs=1e-12)
    # for unit rows: MSE = 2(1 − cos)/D averaged over rows
    cos = (a * b).sum(dim=1)
    assert float(losses.feature_mse(a, b)) == pytest.approx(float((2 * (1 - cos) / 4).mean()), abs=1e-12)


def test_info_nce_matches_naive_and_clip_loss() -> None:
    a, b = _unit(5, 3, 8), _unit(5, 3, 9)
    tau = 0.2
    logits = _scaled(_matmul_t(_l(a), _l(b)), 1 / tau)
    expected = 0.5 * (_ce_diag(logits) + _ce_diag(_transpose(logits)))
    assert float(losses.info_nce(a, b, tau)) == pytest.approx(expected, abs=1e-10)
    # τ = 1/κ gives exactly the clip loss at log scale ln κ
    clip = losses.clip_loss(a, b, torch.tensor(math.log(1 / tau), dtype=torch.float64))
    assert float(losses.info_nce(a, b, torch.tensor(tau, dtype=torch.float64))) == pytest.approx(float(clip), abs=1e-10)


def test_cross_contrastive_loss_matches_naive() -> None:
    si, st, ti, tt = _unit(4, 3, 10), _unit(4, 3, 11), _unit(4, 3, 12), _unit(4, 3, 13)
    kappa = 1 / 0.07
    expected = 0.5 * (
        _ce_diag(_scaled(_matmul_t(_l(si), _l(tt)), kappa)) + _ce_diag(_scaled(_matmul_t(_l(st), _l(ti)), kappa))
    )
    got = losses.cross_contrastive_loss(si, st, ti, tt, torch.tensor(math.log(kappa), dtype=torch.float64))
    assert float(got) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("mask_diagonal", [False, True])
def test_similarity_distance_matches_naive(mask_diagonal: bool) -> None:
    s = _matmul_t(_l(_unit(4, 3, 14)), _l(_unit(4, 3, 15)))
    t = _matmul_t(_l(_unit(4, 3, 16)), _l(_unit(4, 3, 17)))
    if mask_diagonal:
        s = [[x for j, x in enumerate(row) if j != i] for i, row in enumerate(s)]
        t_naive = [[x for j, x in enumerate(row) if j != i] for i, row in enumerate(t)]
    else:
        t_naive = t
    tau = 0.1
    expected_kl = _kl(_scaled(t_naive, 1 / tau), _scaled(s, 1 / tau))
    expected_mse = _mse(s, t_naive)
    student = torch.tensor(_matmul_t(_l(_unit(4, 3, 14)), _l(_unit(4, 3, 15))), dtype=torch.float64)
    teacher = torch.tensor(t, dtype=torch.float64)
    got_kl = losses.similarity_distance(student, teacher, "kl", tau=tau, mask_diagonal=mask_diagonal)
    got_mse = losses.similarity_distance(student, teacher, "mse", tau=tau, mask_diagonal=mask_diagonal)
    assert float(got_kl) == pytest.approx(expected_kl, abs=1e-9)
    assert float(got_mse) == pytest.approx(expected_mse, abs=1e-12)


def test_similarity_distance_rejects_unknown_distance() -> None:
    with pytest.raises(ValueError, match="unknown similarity distance"):
        losses.similarity_distance(torch.eye(2), torch.eye(2), "l1")  # type: ignore[arg-type]


def test_openclip_distill_terms_match_naive() -> None:
    si, st, ti, tt = _unit(3, 4, 18), _unit(3, 4, 19), _unit(3, 4, 20), _unit(3, 4, 21)
    ks, kt = 12.0, 60.0
    s_i2t = _scaled(_matmul_t(_l(si), _l(st)), ks)
    t_i2t = _scaled(_matmul_t(_l(ti), _l(tt)), kt)
    contrastive = 0.5 * (_ce_diag(s_i2t) + _ce_diag(_transpose(s_i2t)))
    distill = 0.5 * (_soft_ce(t_i2t, s_i2t) + _soft_ce(_transpose(t_i2t), _transpose(s_i2t)))
    got_c, got_d = losses.openclip_distill_terms(si, st, ks, ti, tt, kt)
    assert float(got_c) == pytest.approx(contrastive, abs=1e-10)
    assert float(got_d) == pytest.approx(distill, abs=1e-10)
    assert float(losses.openclip_distill_loss(si, st, ks, ti, tt, kt)) == pytest.approx(
        contrastive + distill, abs=1e-10
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_openclip_distill_loss_matches_open_clip(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    b, ds, dt = 5, 8, 12
    si = F.normalize(torch.randn(b, ds, generator=generator), dim=-1)
    st = F.normalize(torch.randn(b, ds, generator=generator), dim=-1)
    ti = F.normalize(torch.randn(b, dt, generator=generator), dim=-1)
    tt = F.normalize(torch.randn(b, dt, generator=generator), dim=-1)
    ks = torch.tensor(1 / 0.07) * (1 + torch.rand((), generator=generator))
    kt = torch.tensor(100.0) * torch.rand((), generator=generator)
    reference = DistillClipLoss(local_loss=True)(si, st, ks, ti, tt, kt)
    got = losses.openclip_distill_loss(si, st, ks, ti, tt, kt)
    assert torch.allclose(got, reference[0] + reference[1], atol=1e-5)
    terms = losses.openclip_distill_terms(si, st, ks, ti, tt, kt)
    assert torch.allclose(terms[0], reference[0], atol=1e-5)
    assert torch.allclose(terms[1], reference[1], atol=1e-5)
