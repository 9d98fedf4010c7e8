"""CoNaCLIP: the edge graph (each edge removable, invalid edges named), its extras, and its
similarity-distillation and InfoNCE terms computed with loops."""

from __future__ import annotations

import math

import pytest
import torch

from clipdistill.distill.base import MethodConfigError, build_method_args
from clipdistill.distill.methods import get_method
from clipdistill.distill.methods.conaclip import EDGE_TYPES, default_edges
from method_fixtures import EXPECTED_TERMS, TEACHER_DIM, B, build, check_gradients, make_student, run


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
