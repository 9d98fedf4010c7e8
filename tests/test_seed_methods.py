"""MCAD, DCD and ComKD: each loss against a naive re-implementation on small hand-built tensors,
the methods' terms, config errors that name the key, export of a ComKD student, and the same
losses from the cache as online (through the trainer)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clipdistill.config import ConfigError, TrainConfig, from_dict, load_config
from clipdistill.distill.base import (
    Batch,
    MethodConfigError,
    StudentFeatures,
    TeacherOutputs,
    TeacherSource,
    build_method_args,
)
from clipdistill.distill.losses import (
    attend,
    dcd_loss,
    entropy_shares,
    fused_similarity,
    moment_alignment,
    topk_pair_mask,
)
from clipdistill.distill.methods import get_method, list_methods
from clipdistill.models.fusion import FusionConfig, FusionEncoder, FusionStates, FusionTeacher
from clipdistill.models.lit import LiTConfig, LiTModel

B, D = 6, 8


# ---------------------------------------------------------------- fixtures: a teacher with a fusion head
class FusionFakeTeacher(TeacherSource):
    """Fixed unit embeddings + fixed fusion states; ``fusion`` a real (random) fusion head."""

    def __init__(self, seed: int = 0, with_fusion: bool = True, dual_spec: str = "fake:teacher") -> None:
        g = torch.Generator().manual_seed(seed)
        self.embed_dim = D
        self.spec = "fake:teacher"
        self.image = F.normalize(torch.randn(B, D, generator=g), dim=-1).requires_grad_(True)
        self.text = F.normalize(torch.randn(B, D, generator=g), dim=-1).requires_grad_(True)
        self.logit_scale = torch.tensor(math.log(20.0), requires_grad=True)
        config = FusionConfig(
            dual_spec=dual_spec, image_token_dim=5, image_tokens=3, text_token_dim=7, embed_dim=D, width=8, heads=2
        )
        torch.manual_seed(seed)
        encoder = FusionEncoder(config)
        torch.nn.init.normal_(encoder.itm.weight)  # untrained it would only repeat the dual score
        self.fusion = FusionTeacher(encoder, spec="fusion:fake") if with_fusion else None
        mask = torch.tensor([[True] * n + [False] * (4 - n) for n in (4, 2, 3, 1, 4, 2)])
        self.states = FusionStates(
            image=torch.randn(B, 3, 8, generator=g),
            image_global=self.image.detach(),
            text=torch.randn(B, 4, 8, generator=g) * mask[..., None],
            text_mask=mask,
            text_global=self.text.detach(),
        )

    def __call__(self, batch: Batch) -> TeacherOutputs:
        return TeacherOutputs(
            image=self.image,
            text=self.text,
            logit_scale=self.logit_scale,
            fusion=self.states if self.fusion is not None else None,
        )

    def tensors(self) -> list[torch.Tensor]:
        return [self.image, self.text, self.logit_scale]


def make_batch(texts: list[str] | None = None) -> Batch:
    return Batch(
        unit_pixels=torch.zeros(B, 3, 4, 4),
        texts=texts or [f"caption {i}" for i in range(B)],
        image_ids=[str(i) for i in range(B)],
        caption_ids=[f"{i}_0" for i in range(B)],
        aug_ids=torch.zeros(B, dtype=torch.int64),
    )


def make_student(dim: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, dim, generator=g).requires_grad_(True),
        torch.randn(B, dim, generator=g).requires_grad_(True),
        torch.tensor(math.log(1 / 0.07), requires_grad=True),
    )


def features(raw: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> StudentFeatures:
    return StudentFeatures(image=F.normalize(raw[0], dim=-1), text=F.normalize(raw[1], dim=-1), logit_scale=raw[2])


def build(name: str, student_dim: int, teacher: TeacherSource, raw_args: dict | None = None):
    cls = get_method(name)
    return cls(student_dim, teacher, build_method_args(cls, raw_args))


def naive_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, t: float = 1.0) -> torch.Tensor:
    """½[KL rows + KL columns], written out per row."""
    total = 0.0
    for a, b in ((teacher_logits, student_logits), (teacher_logits.t(), student_logits.t())):
        rows = []
        for i in range(a.shape[0]):
            p = torch.softmax(a[i] / t, 0)
            rows.append((p * (torch.log(p) - torch.log_softmax(b[i] / t, 0))).sum())
        total = total + torch.stack(rows).mean() * t * t
    return total / 2


def naive_clip(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    logits = scale.exp().clamp(max=100) * image @ text.t()
    labels = torch.arange(len(image))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


# ---------------------------------------------------------------- pure losses vs naive
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


# ---------------------------------------------------------------- registry and config errors
def test_all_seven_methods_are_registered_with_their_needs() -> None:
    assert {"clip", "openclip", "clipkd", "conaclip", "mcad", "dcd", "comkd"} <= set(list_methods())
    assert get_method("mcad").needs == {"teacher_embeddings", "fusion_scores"}
    assert get_method("dcd").needs == {"teacher_embeddings"} and "fusion_scores" in get_method("dcd").optional_needs
    assert get_method("comkd").needs == {"teacher_embeddings"}


@pytest.mark.parametrize(
    ("name", "args", "key"),
    [
        ("mcad", {"fusion_pairs": "some"}, "method_args.fusion_pairs"),
        ("mcad", {"fusion_standardise": "z"}, "method_args.fusion_standardise"),
        ("mcad", {"topk": 0}, "method_args.topk"),
        ("mcad", {"mu": -1.0}, "method_args.mu"),
        ("dcd", {"alpha": 1.5}, "method_args.alpha"),
        ("dcd", {"hard_negatives": 9, "random_negatives": 8}, "method_args.hard_negatives"),
        ("dcd", {"per_sample_kd_weight": "yes"}, "method_args.per_sample_kd_weight"),
        ("comkd", {"attention_c": 0.0}, "method_args.attention_c"),
        ("comkd", {"w_ref": -1.0}, "method_args.w_ref"),
        ("comkd", {"w_taks": 1.0}, "method_args.w_taks"),
    ],
)
def test_bad_method_args_name_the_key(name: str, args: dict, key: str) -> None:
    with pytest.raises(MethodConfigError, match=key.replace(".", r"\.")):
        build_method_args(get_method(name), args)


def test_mcad_refuses_a_missing_or_foreign_fusion_teacher() -> None:
    with pytest.raises(MethodConfigError, match=r"teacher\.fusion"):
        build("mcad", D, FusionFakeTeacher(with_fusion=False))
    foreign = FusionFakeTeacher(dual_spec="run:/some/other/teacher")
    with pytest.raises(MethodConfigError, match=r"teacher\.spec.*use_fusion_features=false"):
        build("mcad", D, foreign)
    method = build("mcad", D, foreign, {"use_fusion_features": False})  # then v^T, t^T are distilled
    assert not method.use_fusion_features


# ---------------------------------------------------------------- MCAD
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


# ---------------------------------------------------------------- DCD
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


# ---------------------------------------------------------------- ComKD
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


# ---------------------------------------------------------------- through the trainer
@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("teacher")
    LiTModel(LiTConfig(image_model="test_vit", image_size=32)).save(folder)
    return f"run:{folder}"


@pytest.fixture(scope="module")
def tiny_fusion(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: str, shapes_dataset_dir: Path) -> str:
    from clipdistill.data.loading import load_dataset
    from clipdistill.train.fusion import FusionTrainConfig, train_fusion_teacher

    out = tmp_path_factory.mktemp("fusion")
    config = FusionTrainConfig(epochs=1, batch_size=4, width=16, heads=2, mine_top=4, negatives=2)
    train_fusion_teacher(tiny_teacher, load_dataset(shapes_dataset_dir), out, config, progress=False)
    return f"fusion:{out}"


def _config(tmp_path: Path, data: Path, **overrides: object) -> TrainConfig:
    raw: dict = {
        "name": "t",
        "out_dir": str(tmp_path / "runs"),
        "data": {"path": str(data), "image_size": 32},
        "optim": {"epochs": 1, "batch_size": 3, "lr": 1e-3, "warmup_steps": 1},
        "log_every": 1,
    }
    for key, value in overrides.items():
        section, _, leaf = key.partition("__")
        if leaf:
            raw.setdefault(section, {})[leaf] = value
        else:
            raw[key] = value
    return from_dict(TrainConfig, raw)


@pytest.mark.parametrize(
    ("method", "args", "fusion"),
    [("mcad", {}, True), ("mcad", {"fusion_pairs": "topk", "topk": 2}, True), ("dcd", {}, True), ("comkd", {}, False)],
)
def test_cached_and_online_teacher_give_the_same_losses(
    shapes_dataset_dir: Path,
    tmp_path: Path,
    tiny_teacher: str,
    tiny_fusion: str,
    method: str,
    args: dict,
    fusion: bool,
) -> None:
    from clipdistill.data.loading import load_dataset
    from clipdistill.distill.cache import build_cache
    from clipdistill.train.trainer import Trainer, epoch_plan

    cache = build_cache(
        tiny_teacher,
        load_dataset(shapes_dataset_dir),
        tmp_path / "cache",
        k_augmentations=2,
        image_size=32,
        progress=False,
        fusion=tiny_fusion if fusion else None,
    )
    common: dict = {"method": method, "method_args": args, "teacher__spec": tiny_teacher, "augment": {"k": 2}}
    if fusion:
        common["teacher__fusion"] = tiny_fusion
    online = Trainer(_config(tmp_path / "on", shapes_dataset_dir, **common), progress=False)
    cached = Trainer(_config(tmp_path / "off", shapes_dataset_dir, **common, teacher__cache=str(cache)), progress=False)
    cached.student.load_state_dict(online.student.state_dict())
    cached.method.load_state_dict(online.method.state_dict())
    plan = epoch_plan(online.caption_counts, 2, 0, 0)
    torch.manual_seed(5)  # DCD draws its random negatives from the global generator
    first = online.train_step(*online._batch(plan, 0))
    torch.manual_seed(5)
    second = cached.train_step(*cached._batch(plan, 0))
    loss_terms = [key for key in first if key.endswith("_loss")]
    assert len(loss_terms) >= 3 and loss_terms == [key for key in second if key.endswith("_loss")]
    for key in loss_terms:
        assert second[key] == pytest.approx(first[key], rel=1e-4, abs=1e-6), key


def test_trainer_config_errors_name_the_key(
    shapes_dataset_dir: Path, tmp_path: Path, tiny_teacher: str, tiny_fusion: str
) -> None:
    from clipdistill.distill.cache import CacheMismatchError, build_cache
    from clipdistill.train.trainer import Trainer

    with pytest.raises(ConfigError, match=r"needs fusion_scores: set key 'teacher\.fusion'"):
        Trainer(_config(tmp_path, shapes_dataset_dir, method="mcad", teacher__spec=tiny_teacher), progress=False)
    with pytest.raises(ConfigError, match=r"'teacher\.fusion' is set but method 'clipkd'.*mcad"):
        Trainer(
            _config(
                tmp_path, shapes_dataset_dir, method="clipkd", teacher__spec=tiny_teacher, teacher__fusion=tiny_fusion
            ),
            progress=False,
        )
    with pytest.raises(ConfigError, match=r"key 'teacher\.fusion'.*names a dual encoder"):
        Trainer(
            _config(
                tmp_path, shapes_dataset_dir, method="dcd", teacher__spec=tiny_teacher, teacher__fusion=tiny_teacher
            ),
            progress=False,
        )
    from clipdistill.data.loading import load_dataset

    plain = build_cache(tiny_teacher, load_dataset(shapes_dataset_dir), tmp_path / "c", image_size=32, progress=False)
    with pytest.raises(CacheMismatchError, match=r"fusion=None.*--fusion"):
        Trainer(
            _config(
                tmp_path,
                shapes_dataset_dir,
                method="dcd",
                teacher__spec=tiny_teacher,
                teacher__fusion=tiny_fusion,
                teacher__cache=str(plain),
            ),
            progress=False,
        )


def test_comkd_exports_the_same_student_as_plain_training(
    shapes_dataset_dir: Path, tmp_path: Path, tiny_teacher: str
) -> None:
    import open_clip

    from clipdistill.train.trainer import train

    folders = {}
    for method in ("clip", "comkd"):
        config = _config(tmp_path / method, shapes_dataset_dir, method=method, teacher__spec=tiny_teacher)
        if method == "clip":
            config = _config(tmp_path / method, shapes_dataset_dir, method=method)
        train(config, progress=False)
        folders[method] = config.run_dir / "model"
    configs = [json.loads((folder / "open_clip_config.json").read_text()) for folder in folders.values()]
    assert configs[0] == configs[1]
    models = [open_clip.create_model(f"local-dir:{folder}") for folder in folders.values()]
    states = [model.state_dict() for model in models]
    assert list(states[0]) == list(states[1])
    assert all(states[0][key].shape == states[1][key].shape for key in states[0])
    assert repr(models[0]) == repr(models[1])  # the same module graph, nothing of the method in it
    assert not any(word in key for key in states[1] for word in ("attention_fc", "edu_alpha", "image_proj.weight"))
    assert any(not torch.equal(states[0][k], states[1][k]) for k in states[0])  # really trained differently


@pytest.mark.parametrize("method", ["mcad", "dcd", "comkd"])
def test_method_yaml_files_load(method: str) -> None:
    config = load_config(["configs/emoji.yaml", f"configs/methods/{method}.yaml"])
    assert config.method == method
    build_method_args(get_method(method), config.method_args)
    assert (config.teacher.fusion == "fusion:runs/fusion") == (method == "mcad")
