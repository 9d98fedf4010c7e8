"""DCD: its loss (entropy shares, MSE or KL distillation, self-learning BCE) and the method
(candidate mining, per-batch read-outs, teacher scale) against naive re-implementations."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from clipdistill.distill.base import MethodConfigError
from clipdistill.distill.losses import dcd_loss, entropy_shares
from fusion_method_fixtures import B, D, FusionFakeTeacher, build, features, make_batch, make_student

# ---------------------------------------------------------------- the loss


def test_entropy_shares_sum_to_one_and_follow_the_formula() -> None:
    logits = torch.tensor([[3.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, 0.2, -1.0], [10.0, -10.0, -10.0]])
    shares = entropy_shares(logits)
    assert float(shares.sum()) == pytest.approx(1.0, abs=1e-6)
    negative_entropies = []
    for row in logits.tolist():
        p = [math.exp(x) / sum(math.exp(y) for y in row) for x in row]
        negative_entropies.append(sum(q * math.log(q) for q in p))
    for share, value in zip(shares.tolist(), negative_entropies, strict=True):
        assert share == pytest.approx(value / sum(negative_entropies), rel=1e-5, abs=1e-7)
    assert int(shares.argmax()) == 1  # the uniform (least certain) row weighs most
    one_hot = torch.tensor([[1e4, 0.0], [1e4, 0.0]])
    assert entropy_shares(one_hot).tolist() == [0.5, 0.5]


def naive_dcd(teacher: torch.Tensor, student: torch.Tensor, alpha: float, per_sample: bool) -> tuple[float, float]:
    """(distill, self) of one DCD direction, by loops."""
    rows = teacher.tolist()
    neg_ent = [sum(p * math.log(p) for p in [math.exp(x) / sum(math.exp(y) for y in r) for x in r]) for r in rows]
    shares = [v / sum(neg_ent) for v in neg_ent]
    mse = [
        sum((a - b) ** 2 for a, b in zip(t, s, strict=True)) / len(t)
        for t, s in zip(rows, student.tolist(), strict=True)
    ]
    if per_sample:
        exps = [math.exp((1 - e) ** 2) for e in shares]
        weights = [x / sum(exps) for x in exps]
        distill = sum(w * m for w, m in zip(weights, mse, strict=True))
    else:
        distill = sum(mse) / len(mse)
    self_learning = 0.0
    for share, s in zip(shares, student.tolist(), strict=True):
        bce = [math.log(1 + math.exp(-x)) if k == 0 else math.log(1 + math.exp(x)) for k, x in enumerate(s)]
        self_learning += share * sum(bce) / len(bce)
    return distill, self_learning


@pytest.mark.parametrize("per_sample", [False, True])
def test_dcd_loss_against_naive(per_sample: bool) -> None:
    g = torch.Generator().manual_seed(2)
    teacher, student = torch.randn(5, 8, generator=g) * 3, torch.randn(5, 8, generator=g) * 3
    out = dcd_loss(teacher, student, alpha=0.2, per_sample_kd_weight=per_sample)
    distill, self_learning = naive_dcd(teacher, student, 0.2, per_sample)
    assert float(out["distill"]) == pytest.approx(distill, rel=1e-5)
    assert float(out["self"]) == pytest.approx(self_learning, rel=1e-5)
    assert float(out["loss"]) == pytest.approx(0.2 * distill + 0.8 * self_learning, rel=1e-5)
    assert float(out["shares"].sum()) == pytest.approx(1.0, abs=1e-6)


def test_dcd_kl_distillation_against_naive_and_blind_to_a_teacher_shift() -> None:
    """``distill="kl"`` (ours): T²·KL(softmax(z/T) ‖ softmax(s/T)) per query, batch mean; a
    constant added to a query's teacher scores changes nothing, unlike the MSE."""
    g = torch.Generator().manual_seed(5)
    teacher, student = torch.randn(5, 8, generator=g) * 3, torch.randn(5, 8, generator=g) * 3
    out = dcd_loss(teacher, student, distill="kl", temperature=2.0)
    expected = 0.0
    for z, s in zip(teacher.tolist(), student.tolist(), strict=True):
        p = [math.exp(v / 2.0) for v in z]
        q = [math.exp(v / 2.0) for v in s]
        p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
        expected += 4.0 * sum(a * math.log(a / b) for a, b in zip(p, q, strict=True)) / 5
    assert float(out["distill"]) == pytest.approx(expected, rel=1e-5)
    shift = torch.arange(5.0)[:, None] * 4.0
    shifted = dcd_loss(teacher, student, distill="kl", temperature=2.0, distill_targets=teacher + shift)
    torch.testing.assert_close(shifted["distill"], out["distill"])
    mse = dcd_loss(teacher, student, distill_targets=teacher + shift)
    assert not torch.allclose(mse["distill"], dcd_loss(teacher, student)["distill"])
    with pytest.raises(ValueError, match="'mse', 'kl' or 'kl-negatives'"):
        dcd_loss(teacher, student, distill="l1")


def test_dcd_kl_over_negatives_ignores_the_positive_and_matches_naive() -> None:
    """``distill="kl-negatives"`` (ours): the KL of :func:`dcd_loss`'s ``kl`` over columns 1..
    only; the positive's score, on either side, does not enter it (the BCE still reads it)."""
    g = torch.Generator().manual_seed(7)
    teacher, student = torch.randn(5, 8, generator=g) * 3, torch.randn(5, 8, generator=g) * 3
    out = dcd_loss(teacher, student, distill="kl-negatives", temperature=2.0)
    naive = dcd_loss(teacher[:, 1:], student[:, 1:], distill="kl", temperature=2.0)
    torch.testing.assert_close(out["distill"], naive["distill"])
    moved = teacher.clone(), student.clone()
    moved[0][:, 0] += 10.0
    moved[1][:, 0] -= 10.0
    again = dcd_loss(*moved, distill="kl-negatives", temperature=2.0, distill_targets=moved[0])
    torch.testing.assert_close(again["distill"], out["distill"])
    assert not torch.allclose(
        dcd_loss(*moved, distill="kl")["distill"], dcd_loss(teacher, student, distill="kl")["distill"]
    )
    assert not torch.allclose(again["self"], out["self"])
    with pytest.raises(MethodConfigError, match="kl-negatives"):
        build("dcd", D, FusionFakeTeacher(with_fusion=False), {"distill": "kl-neg"})


def test_dcd_weighting_variants_differ_exactly_in_the_distillation_term() -> None:
    g = torch.Generator().manual_seed(3)
    teacher, student = torch.randn(5, 8, generator=g) * 3, torch.randn(5, 8, generator=g)
    released = dcd_loss(teacher, student, per_sample_kd_weight=False)
    paper = dcd_loss(teacher, student, per_sample_kd_weight=True)
    assert torch.equal(released["self"], paper["self"])  # the self-learning term is weighted the same
    assert torch.equal(released["shares"], paper["shares"])
    assert not torch.allclose(released["distill"], paper["distill"])  # unequal shares: per-sample weights matter
    assert torch.allclose(released["kd_weights"], torch.full((5,), 0.2))  # released: a no-op
    # Rows with equal teacher entropy get equal shares, so the per-sample weights are uniform too.
    same_entropy = torch.stack([teacher[0].roll(i) for i in range(5)])
    a = dcd_loss(same_entropy, student, per_sample_kd_weight=False)
    b = dcd_loss(same_entropy, student, per_sample_kd_weight=True)
    torch.testing.assert_close(a["distill"], b["distill"])


# ---------------------------------------------------------------- the method


def naive_dcd_candidates(
    z: torch.Tensor, s: torch.Tensor, valid: torch.Tensor, keys: torch.Tensor, k: int, h: int
) -> tuple[list[list[float]], list[list[float]]]:
    """One direction's candidate scores by loops (teacher rows, student rows): random K of the
    valid columns (smallest keys), keep the teacher's top H, positive first."""
    z, s = z.detach(), s.detach()
    teacher_rows, student_rows = [], []
    k = min(k, int(valid.sum(1).min()))
    h = min(h, k)
    for i in range(z.shape[0]):
        drawn = sorted((j for j in range(z.shape[1]) if valid[i, j]), key=lambda j: float(keys[i, j]))[:k]
        hard = sorted(drawn, key=lambda j: -float(z[i, j]))[:h]
        teacher_rows.append([float(z[i, i])] + [float(z[i, j]) for j in hard])
        student_rows.append([float(s[i, i])] + [float(s[i, j]) for j in hard])
    return teacher_rows, student_rows


def naive_read_outs(directions: list[tuple[list[list[float]], list[list[float]]]]) -> tuple[float, float, float]:
    """(a, b, c) of DCD's per-batch read-outs, by loops over both directions' candidates."""
    z = [x for teacher, _ in directions for row in teacher for x in row]
    s = [x for _, student in directions for row in student for x in row]
    a = statistics.stdev(z) / statistics.stdev(s)
    rows = [row for _, student in directions for row in student]

    def mean_bce(c: float) -> float:
        terms = [
            math.log1p(math.exp(-(x + c))) if k == 0 else math.log1p(math.exp(x + c))
            for row in rows
            for k, x in enumerate(row)
        ]
        return sum(terms) / len(terms)

    low, high = -100.0, 100.0  # the convex mean BCE's minimiser, by ternary search
    for _ in range(200):
        left, right = low + (high - low) / 3, high - (high - low) / 3
        low, high = (low, right) if mean_bce(left) < mean_bce(right) else (left, high)
    return a, statistics.mean(z) - a * statistics.mean(s), (low + high) / 2


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("with_fusion", [False, True])
def test_dcd_method_against_naive(per_sample: bool, with_fusion: bool) -> None:
    teacher = FusionFakeTeacher(with_fusion=with_fusion)
    texts = ["a", "b", "c", "a", "d", "e"]  # captions 0 and 3 share a text: never each other's negative
    method = build("dcd", D, teacher, {"random_negatives": 3, "hard_negatives": 2, "per_sample_kd_weight": per_sample})
    raw = make_student(D)
    torch.manual_seed(7)
    out = method(make_batch(texts), features(raw))
    torch.manual_seed(7)
    keys = [torch.rand(B, B), torch.rand(B, B)]  # the method's two draws, in order

    assert set(out.losses) == {"task_loss", "dcd_distill_loss", "dcd_self_loss"}
    assert out.report["fusion"] == float(with_fusion) and out.report["candidates"] == 3.0
    s = features(raw)
    student_logits = s.logit_scale.exp() * s.image @ s.text.t()
    if with_fusion:
        assert teacher.fusion is not None
        z = teacher.fusion.score_matrix(teacher.states)
    else:
        z = 20.0 * teacher.image.detach() @ teacher.text.detach().t()
    valid = ~torch.eye(B, dtype=torch.bool)
    valid[0, 3] = valid[3, 0] = False
    directions = [
        naive_dcd_candidates(z, student_logits, valid, keys[0], 3, 2),
        naive_dcd_candidates(z.t(), student_logits.t(), valid, keys[1], 3, 2),
    ]
    a, b, c = naive_read_outs(directions)
    assert (out.report["score_scale"], out.report["score_bias"], out.report["bce_bias"]) == pytest.approx(
        (a, b, c), rel=1e-4, abs=1e-5
    )
    distill, self_learning = [], []
    for teacher_rows, student_rows in directions:
        mapped = [[(x - b) / a for x in row] for row in teacher_rows]  # the teacher on the student's scale
        shifted = torch.tensor([[x + c for x in row] for row in student_rows])
        per_query = [
            sum((t - x) ** 2 for t, x in zip(tr, sr, strict=True)) / len(tr)
            for tr, sr in zip(mapped, student_rows, strict=True)
        ]
        if per_sample:  # the KD weights come from the raw teacher rows' entropy shares
            rows = torch.tensor(teacher_rows)
            shares = dcd_loss(rows, rows, per_sample_kd_weight=True)["kd_weights"].tolist()
            distill.append(sum(w * q for w, q in zip(shares, per_query, strict=True)))
        else:
            distill.append(sum(per_query) / len(per_query))
        self_learning.append(naive_dcd(torch.tensor(teacher_rows), shifted, 0.2, per_sample)[1])
    assert float(out.losses["dcd_distill_loss"].detach()) == pytest.approx(0.2 * sum(distill) / 2, rel=1e-4)
    assert float(out.losses["dcd_self_loss"].detach()) == pytest.approx(0.8 * sum(self_learning) / 2, rel=1e-4)
    out.total().backward()
    assert raw[0].grad is not None and all(t.grad is None for t in teacher.tensors())


def test_dcd_teacher_scale_sharpens_only_the_distillation_targets() -> None:
    """``teacher_scale`` k on a teacher of logit scale 20 distils the targets a teacher of scale
    20·k gives (same mined candidates: a positive scale keeps the ranking), while the entropy
    shares, and so the self-learning term, still read the teacher's own scores."""
    args = {"distill": "kl", "student_affine": False, "random_negatives": 4, "hard_negatives": 3}
    outputs = {}
    for label, teacher_scale, log_scale in (("k", 3.0, math.log(20.0)), ("sharp", 1.0, math.log(60.0))):
        teacher = FusionFakeTeacher(with_fusion=False)
        with torch.no_grad():
            teacher.logit_scale.fill_(log_scale)
        method = build("dcd", D, teacher, {**args, "teacher_scale": teacher_scale})
        torch.manual_seed(5)
        outputs[label] = method(make_batch(), features(make_student(D))).losses
    plain = build("dcd", D, FusionFakeTeacher(with_fusion=False), args)
    torch.manual_seed(5)
    unscaled = plain(make_batch(), features(make_student(D))).losses
    scaled = outputs["k"]["dcd_distill_loss"].detach().item()
    assert scaled == pytest.approx(outputs["sharp"]["dcd_distill_loss"].detach().item(), rel=1e-5)
    assert scaled != pytest.approx(unscaled["dcd_distill_loss"].detach().item(), rel=1e-3)
    assert torch.equal(outputs["k"]["dcd_self_loss"], unscaled["dcd_self_loss"])
    with pytest.raises(MethodConfigError, match=r"method_args\.teacher_scale"):
        build("dcd", D, FusionFakeTeacher(with_fusion=False), {"teacher_scale": 0.0})


def test_dcd_variants_differ_only_in_the_distillation_term_through_the_method() -> None:
    teacher = FusionFakeTeacher()
    outputs = {}
    for per_sample in (False, True):
        method = build("dcd", D, teacher, {"per_sample_kd_weight": per_sample})
        torch.manual_seed(0)
        outputs[per_sample] = method(make_batch(), features(make_student(D))).losses
    assert torch.equal(outputs[False]["dcd_self_loss"], outputs[True]["dcd_self_loss"])
    assert torch.equal(outputs[False]["task_loss"], outputs[True]["task_loss"])
    assert not torch.equal(outputs[False]["dcd_distill_loss"], outputs[True]["dcd_distill_loss"])


def test_dcd_temperature_is_refused_where_it_cancels() -> None:
    """T²·MSE(z/T, s/T) = MSE(z, s): with the paper's MSE a temperature would be an option that does
    nothing, so it is refused; with the KL it changes the loss."""
    generator = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(6, 8, generator=generator), torch.randn(6, 8, generator=generator)
    torch.testing.assert_close(
        dcd_loss(teacher, student, distill="mse", temperature=3.0)["distill"], dcd_loss(teacher, student)["distill"]
    )
    with pytest.raises(MethodConfigError, match=r"method_args\.temperature"):
        build("dcd", D, FusionFakeTeacher(with_fusion=False), {"temperature": 2.0})
    build("dcd", D, FusionFakeTeacher(with_fusion=False), {"temperature": 2.0, "distill": "kl"})
    assert not torch.allclose(
        dcd_loss(teacher, student, distill="kl", temperature=3.0)["distill"],
        dcd_loss(teacher, student, distill="kl")["distill"],
    )
