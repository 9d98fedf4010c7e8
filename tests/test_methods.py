"""Distillation methods: registry, config validation, term names, gradient flow (to the student
and trainable extras, never to the teacher), and hand-computed checks of individual terms."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import DistillClipLoss

from clipdistill.distill.base import (
    Batch,
    DistillMethod,
    MethodConfigError,
    MethodOutput,
    StudentFeatures,
    TeacherOutputs,
    TeacherSource,
    build_method_args,
)
from clipdistill.distill.losses import clip_loss
from clipdistill.distill.methods import get_method, list_methods
from clipdistill.distill.methods.conaclip import EDGE_TYPES, default_edges

B, TEACHER_DIM = 4, 6


class FakeTeacher(TeacherSource):
    """Fixed random unit embeddings. They require grad so a test can prove none reaches them."""

    def __init__(self, embed_dim: int = TEACHER_DIM, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.embed_dim = embed_dim
        self.spec = "fake:teacher"
        self.image = F.normalize(torch.randn(B, embed_dim, generator=generator), dim=-1).requires_grad_(True)
        self.text = F.normalize(torch.randn(B, embed_dim, generator=generator), dim=-1).requires_grad_(True)
        self.logit_scale = torch.tensor(math.log(50.0), requires_grad=True)

    def __call__(self, batch: Batch) -> TeacherOutputs:
        return TeacherOutputs(image=self.image, text=self.text, logit_scale=self.logit_scale)

    def tensors(self) -> list[torch.Tensor]:
        return [self.image, self.text, self.logit_scale]


@dataclass
class Student:
    """Raw leaf tensors; ``features()`` gives the normalised StudentFeatures built from them."""

    raw_image: torch.Tensor
    raw_text: torch.Tensor
    logit_scale: torch.Tensor

    def features(self) -> StudentFeatures:
        return StudentFeatures(
            image=F.normalize(self.raw_image, dim=-1),
            text=F.normalize(self.raw_text, dim=-1),
            logit_scale=self.logit_scale,
        )


def make_student(dim: int, seed: int = 1) -> Student:
    generator = torch.Generator().manual_seed(seed)
    return Student(
        raw_image=torch.randn(B, dim, generator=generator).requires_grad_(True),
        raw_text=torch.randn(B, dim, generator=generator).requires_grad_(True),
        logit_scale=torch.tensor(math.log(1 / 0.07), requires_grad=True),
    )


def make_batch() -> Batch:
    return Batch(
        unit_pixels=torch.zeros(B, 3, 4, 4),
        texts=[f"caption {i}" for i in range(B)],
        image_ids=[str(i) for i in range(B)],
        caption_ids=[f"{i}_0" for i in range(B)],
        aug_ids=torch.zeros(B, dtype=torch.int64),
    )


def build(name: str, student_dim: int, raw_args: dict | None = None) -> tuple[DistillMethod, FakeTeacher | None]:
    cls = get_method(name)
    teacher = None if not cls.needs else FakeTeacher()
    return cls(student_dim, teacher, build_method_args(cls, raw_args)), teacher


def run(method: DistillMethod, student: Student) -> MethodOutput:
    return method(make_batch(), student.features())


def check_gradients(method: DistillMethod, teacher: FakeTeacher | None, student: Student, output: MethodOutput) -> None:
    total = output.total()
    assert torch.isfinite(total)
    total.backward()
    for tensor in (student.raw_image, student.raw_text):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0
    for name, param in method.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), f"no gradient for {name}"
        assert param.grad.abs().sum() > 0, f"zero gradient for {name}"
    if teacher is not None:
        for tensor in teacher.tensors():
            assert tensor.grad is None


EXPECTED_TERMS = {
    "clip": {"task_loss"},
    "openclip": {"task_loss", "distill_loss"},
    "clipkd": {"task_loss", "fd_loss", "icl_loss", "ckd_loss"},
    "conaclip": {"its_fd_loss", "its_sd_loss", "iss_sd_loss", "cts_infonce_loss", "cts_sd_loss", "css_infonce_loss"},
}

# ---------------------------------------------------------------- registry and args


def test_list_methods_contains_the_four() -> None:
    assert {"clip", "openclip", "clipkd", "conaclip"} <= set(list_methods())


def test_get_method_suggests_close_name() -> None:
    with pytest.raises(MethodConfigError, match="did you mean 'clip'"):
        get_method("clipp")


@pytest.mark.parametrize("name", sorted(EXPECTED_TERMS))
def test_build_method_args_rejects_unknown_key(name: str) -> None:
    with pytest.raises(MethodConfigError, match=r"method_args\.w_taks.*did you mean 'w_task'"):
        build_method_args(get_method(name), {"w_taks": 1.0})


@pytest.mark.parametrize("name", sorted(EXPECTED_TERMS))
def test_build_method_args_rejects_mistyped_and_negative(name: str) -> None:
    cls = get_method(name)
    with pytest.raises(MethodConfigError, match=r"method_args\.w_task"):
        build_method_args(cls, {"w_task": "one"})
    with pytest.raises(MethodConfigError, match=r"method_args\.w_task"):
        build_method_args(cls, {"w_task": -1.0})


def test_build_method_args_names_each_clipkd_key() -> None:
    cls = get_method("clipkd")
    for key in ("w_fd", "w_icl", "w_ckd"):
        with pytest.raises(MethodConfigError, match=rf"method_args\.{key}"):
            build_method_args(cls, {key: -2})
    with pytest.raises(MethodConfigError, match=r"method_args\.cross_scale_init"):
        build_method_args(cls, {"cross_scale_init": 0})
    assert build_method_args(cls, {"w_fd": 1000}).w_fd == 1000.0  # ints accepted for floats


def test_method_args_are_checked_like_every_config_key() -> None:
    """method_args go through the training config's type checker: a YAML 1.1 ``1e3`` (read as a
    string) is a number there as anywhere in the config, a bool is not a number, and an optional
    number is checked too."""
    clipkd = get_method("clipkd")
    assert build_method_args(clipkd, {"w_fd": "1e3"}).w_fd == 1000.0
    with pytest.raises(MethodConfigError, match=r"method_args\.w_fd' must be a number, got bool"):
        build_method_args(clipkd, {"w_fd": True})
    with pytest.raises(MethodConfigError, match=r"method_args\.attention_c' must be a number, got str"):
        build_method_args(get_method("comkd"), {"attention_c": "wide"})


def test_default_args() -> None:
    assert build_method_args(get_method("clip"), None).w_task == 1.0
    openclip = build_method_args(get_method("openclip"), None)
    assert (openclip.w_task, openclip.w_distill) == (1.0, 1.0)
    clipkd = build_method_args(get_method("clipkd"), None)
    assert (clipkd.w_task, clipkd.w_fd, clipkd.w_icl, clipkd.w_ckd) == (1.0, 2000.0, 1.0, 1.0)
    assert clipkd.cross_scale_init == pytest.approx(1 / 0.07)
    conaclip = build_method_args(get_method("conaclip"), None)
    assert conaclip.w_task == 0.0 and conaclip.edges == default_edges()
    assert (conaclip.sd_distance, conaclip.tau_sd, conaclip.tau_init) == ("kl", 0.07, 0.07)


def test_needs() -> None:
    assert get_method("clip").needs == frozenset()
    for name in ("openclip", "clipkd", "conaclip"):
        assert get_method(name).needs == {"teacher_embeddings"}
        with pytest.raises(MethodConfigError, match=r"teacher\.spec"):
            get_method(name)(TEACHER_DIM, None, build_method_args(get_method(name), None))


# ---------------------------------------------------------------- every method


@pytest.mark.parametrize("student_dim", [TEACHER_DIM, 5])
@pytest.mark.parametrize("name", sorted(EXPECTED_TERMS))
def test_method_terms_and_gradients(name: str, student_dim: int) -> None:
    method, teacher = build(name, student_dim)
    student = make_student(student_dim)
    output = run(method, student)
    assert set(output.losses) == EXPECTED_TERMS[name]
    assert all(isinstance(v, float) and math.isfinite(v) for v in output.report.values())
    assert "logit_scale" in output.report
    check_gradients(method, teacher, student, output)


def test_clip_is_task_loss_only() -> None:
    method, _ = build("clip", 5, {"w_task": 2.0})
    student = make_student(5)
    output = run(method, student)
    features = student.features()
    assert torch.allclose(
        output.losses["task_loss"], 2.0 * clip_loss(features.image, features.text, student.logit_scale)
    )


# ---------------------------------------------------------------- openclip


@pytest.mark.parametrize("student_dim", [TEACHER_DIM, 5])
def test_openclip_total_equals_open_clip(student_dim: int) -> None:
    method, teacher = build("openclip", student_dim)
    student = make_student(student_dim)
    output = run(method, student)
    features = student.features()
    assert teacher is not None
    with torch.no_grad():
        reference = DistillClipLoss(local_loss=True)(
            features.image,
            features.text,
            student.logit_scale.exp(),
            teacher.image,
            teacher.text,
            teacher.logit_scale.exp(),
        )
    assert torch.allclose(output.losses["task_loss"], reference[0], atol=1e-6)
    assert torch.allclose(output.losses["distill_loss"], reference[1], atol=1e-6)
    assert torch.allclose(output.total(), reference[0] + reference[1], atol=1e-5)
    assert output.report["teacher_logit_scale"] == pytest.approx(50.0, rel=1e-5)


# ---------------------------------------------------------------- clipkd


def test_clipkd_projector_only_when_dims_differ() -> None:
    same, _ = build("clipkd", TEACHER_DIM)
    assert same.image_proj is None and same.text_proj is None
    assert {n for n, _ in same.named_parameters()} == {"cross_logit_scale"}
    other, _ = build("clipkd", 5)
    assert isinstance(other.image_proj, torch.nn.Linear) and other.image_proj.in_features == 5
    assert other.image_proj.out_features == TEACHER_DIM
    assert float(other.cross_logit_scale.detach().exp()) == pytest.approx(1 / 0.07, rel=1e-5)
    assert run(other, make_student(5)).report["cross_logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5)


def test_clipkd_terms_by_hand() -> None:
    method, teacher = build("clipkd", TEACHER_DIM)
    assert teacher is not None
    student = make_student(TEACHER_DIM)
    out = run(method, student)
    f = student.features()
    ti, tt = teacher.image.detach(), teacher.text.detach()
    fd = 2000 * (((f.image - ti) ** 2).mean() + ((f.text - tt) ** 2).mean())
    assert torch.allclose(out.losses["fd_loss"], fd)
    labels = torch.arange(B)
    kc = 1 / 0.07
    icl = 0.5 * (F.cross_entropy(kc * f.image @ tt.t(), labels) + F.cross_entropy(kc * f.text @ ti.t(), labels))
    assert torch.allclose(out.losses["icl_loss"], icl, atol=1e-6)
    ls, lt = student.logit_scale.exp() * f.image @ f.text.t(), 50.0 * ti @ tt.t()
    ckd = 0.5 * (
        F.kl_div(ls.log_softmax(1), lt.log_softmax(1), log_target=True, reduction="batchmean")
        + F.kl_div(ls.t().log_softmax(1), lt.t().log_softmax(1), log_target=True, reduction="batchmean")
    )
    assert torch.allclose(out.losses["ckd_loss"], ckd, atol=1e-5)


def test_clipkd_zero_weight_drops_term_and_extras() -> None:
    method, teacher = build("clipkd", 5, {"w_icl": 0, "w_fd": 0})
    assert method.image_proj is None and method.cross_logit_scale is None
    student = make_student(5)
    output = run(method, student)
    assert set(output.losses) == {"task_loss", "ckd_loss"}
    check_gradients(method, teacher, student, output)


# ---------------------------------------------------------------- conaclip


def conaclip_args(edges: dict) -> dict:
    return {"edges": edges}


@pytest.mark.parametrize("removed", EDGE_TYPES)
@pytest.mark.parametrize("how", ["omit", "empty"])
def test_conaclip_each_edge_removed(removed: str, how: str) -> None:
    edges = default_edges()
    if how == "omit":
        del edges[removed]
    else:
        edges[removed] = {}
    method, teacher = build("conaclip", 5, conaclip_args(edges))
    student = make_student(5)
    output = run(method, student)
    expected = {t for t in EXPECTED_TERMS["conaclip"] if not t.startswith(removed.lower() + "_")}
    assert set(output.losses) == expected
    check_gradients(method, teacher, student, output)


def test_conaclip_default_graph_extras() -> None:
    method, _ = build("conaclip", 5)
    names = {n for n, _ in method.named_parameters()}
    # CTS has its own learned temperature; CSS uses the student's logit_scale (css_student_scale)
    assert names == {"image_proj.weight", "image_proj.bias", "text_proj.weight", "text_proj.bias", "log_scales.CTS"}
    output = run(method, make_student(5))
    assert output.report["tau_cts"] == pytest.approx(0.07, rel=1e-5)
    same, _ = build("conaclip", TEACHER_DIM)
    assert same.image_proj is None and same.text_proj is None


def test_conaclip_no_projector_without_teacher_student_edges() -> None:
    method, teacher = build("conaclip", 5, conaclip_args({"ISS": {"sd": 1}, "CSS": {"infonce": 1, "sd": 1}}))
    assert method.image_proj is None and method.text_proj is None
    student = make_student(5)
    output = run(method, student)
    assert set(output.losses) == {"iss_sd_loss", "css_infonce_loss", "css_sd_loss"}
    check_gradients(method, teacher, student, output)


@pytest.mark.parametrize("edge", ["CTS", "CSS", "ISS"])
def test_conaclip_fd_only_on_its(edge: str) -> None:
    with pytest.raises(MethodConfigError, match=rf"method_args\.edges\.{edge}: loss 'fd' is only defined on ITS"):
        build_method_args(get_method("conaclip"), conaclip_args({edge: {"fd": 1.0}}))


@pytest.mark.parametrize(
    ("edges", "pattern"),
    [
        ({"XYZ": {"sd": 1}}, r"method_args\.edges\.XYZ: unknown edge type"),
        ({"its": {"sd": 1}}, r"method_args\.edges\.its: unknown edge type.*did you mean 'ITS'"),
        ({"ITS": {"l1": 1}}, r"method_args\.edges\.ITS: unknown loss type 'l1'"),
        ({"CTS": {"sd": -1}}, r"method_args\.edges\.CTS\.sd: weight must be >= 0"),
        ({"CSS": {"infonce": "big"}}, r"method_args\.edges\.CSS\.infonce: weight must be a finite number"),
        ({"ISS": 3}, r"method_args\.edges\.ISS: must be a mapping"),
        (["ITS"], r"method_args\.edges' must map"),
        ({}, r"nothing to train"),
    ],
)
def test_conaclip_invalid_edges(edges: object, pattern: str) -> None:
    with pytest.raises(MethodConfigError, match=pattern):
        build_method_args(get_method("conaclip"), {"edges": edges})


def test_conaclip_other_invalid_args() -> None:
    cls = get_method("conaclip")
    with pytest.raises(MethodConfigError, match=r"method_args\.sd_distance"):
        build_method_args(cls, {"sd_distance": "l2"})
    with pytest.raises(MethodConfigError, match=r"method_args\.tau_sd"):
        build_method_args(cls, {"tau_sd": 0})
    with pytest.raises(MethodConfigError, match=r"method_args\.tau_init"):
        build_method_args(cls, {"tau_init": -0.1})


def test_conaclip_list_shorthand_and_zero_weights() -> None:
    args = build_method_args(
        get_method("conaclip"), conaclip_args({"ITS": ["fd", "sd"], "CTS": {"sd": 0}, "CSS": None})
    )
    assert args.edges == {"ITS": {"fd": 2000.0, "sd": 1.0}}


def test_conaclip_task_loss_optional() -> None:
    method, _ = build("conaclip", 5, {"w_task": 1.0})
    student = make_student(5)
    output = run(method, student)
    assert set(output.losses) == EXPECTED_TERMS["conaclip"] | {"task_loss"}
    # with css_student_scale (default), CSS+infonce is exactly the student's clip loss
    assert torch.allclose(output.losses["css_infonce_loss"], output.losses["task_loss"])


def test_conaclip_css_own_temperature() -> None:
    method, teacher = build("conaclip", 5, {"edges": {"CSS": {"infonce": 1}}, "css_student_scale": False})
    assert {n for n, _ in method.named_parameters()} == {"log_scales.CSS"}
    student = make_student(5)
    output = run(method, student)
    assert output.report["tau_css"] == pytest.approx(0.07, rel=1e-5)
    check_gradients(method, teacher, student, output)


def _naive_kl_rows(teacher: list[list[float]], student: list[list[float]], tau: float) -> float:
    total = 0.0
    for t_row, s_row in zip(teacher, student, strict=True):
        zt = [math.exp(x / tau) for x in t_row]
        zs = [math.exp(x / tau) for x in s_row]
        p = [x / sum(zt) for x in zt]
        q = [x / sum(zs) for x in zs]
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    return total / len(teacher)


def _cos(a: torch.Tensor, b: torch.Tensor) -> list[list[float]]:
    rows, cols = a.tolist(), b.tolist()
    return [[sum(x * y for x, y in zip(r, c, strict=True)) for c in cols] for r in rows]


def test_conaclip_sd_terms_by_hand() -> None:
    """ISS sd (diagonal dropped) and CTS sd (KL at τ_sd), and CSS sd with MSE, from loops."""
    tau = 0.1
    method, teacher = build("conaclip", TEACHER_DIM, {"edges": {"ISS": {"sd": 1}, "CTS": {"sd": 2}}, "tau_sd": tau})
    assert teacher is not None
    student = make_student(TEACHER_DIM)
    out = run(method, student)
    f = student.features()
    si, st, ti, tt = f.image.detach(), f.text.detach(), teacher.image.detach(), teacher.text.detach()

    def off_diagonal(m: list[list[float]]) -> list[list[float]]:
        return [[x for j, x in enumerate(row) if j != i] for i, row in enumerate(m)]

    iss = 0.5 * (
        _naive_kl_rows(off_diagonal(_cos(ti, ti)), off_diagonal(_cos(si, si)), tau)
        + _naive_kl_rows(off_diagonal(_cos(tt, tt)), off_diagonal(_cos(st, st)), tau)
    )
    cts = 0.5 * (_naive_kl_rows(_cos(ti, tt), _cos(si, tt), tau) + _naive_kl_rows(_cos(tt, ti), _cos(st, ti), tau))
    assert out.losses["iss_sd_loss"].item() == pytest.approx(iss, rel=1e-5)
    assert out.losses["cts_sd_loss"].item() == pytest.approx(2 * cts, rel=1e-5)

    method, _ = build("conaclip", TEACHER_DIM, {"edges": {"CSS": {"sd": 1}}, "sd_distance": "mse"})
    out = run(method, student)
    s, t = _cos(si, st), _cos(ti, tt)
    mse = sum((s[i][j] - t[i][j]) ** 2 for i in range(B) for j in range(B)) / B**2
    assert out.losses["css_sd_loss"].item() == pytest.approx(mse, rel=1e-5)


def test_conaclip_infonce_term_by_hand() -> None:
    """CTS infonce: mean over (SI, TT) and (ST, TI) of symmetric InfoNCE at the learned τ."""
    method, teacher = build("conaclip", TEACHER_DIM, {"edges": {"CTS": {"infonce": 1}}})
    assert teacher is not None
    with torch.no_grad():
        method.log_scales["CTS"].fill_(math.log(1 / 0.2))
    student = make_student(TEACHER_DIM)
    out = run(method, student)
    f = student.features()
    si, st, ti, tt = f.image.detach(), f.text.detach(), teacher.image.detach(), teacher.text.detach()

    def ce_diag(m: list[list[float]]) -> float:
        return sum(-math.log(math.exp(row[i]) / sum(math.exp(x) for x in row)) for i, row in enumerate(m)) / len(m)

    def sym(a: torch.Tensor, b: torch.Tensor) -> float:
        logits = [[x / 0.2 for x in row] for row in _cos(a, b)]
        return 0.5 * (ce_diag(logits) + ce_diag([list(c) for c in zip(*logits, strict=True)]))

    expected = 0.5 * (sym(si, tt) + sym(st, ti))
    assert out.losses["cts_infonce_loss"].item() == pytest.approx(expected, rel=1e-5)
    assert out.report["tau_cts"] == pytest.approx(0.2, rel=1e-5)
