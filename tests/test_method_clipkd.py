"""CLIP-KD: its args, the projector and learned cross scale only when needed, and its terms
(feature, interactive contrastive, contrastive KD) computed by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipdistill.distill.base import MethodConfigError, build_method_args
from clipdistill.distill.methods import get_method
from method_fixtures import TEACHER_DIM, B, build, check_gradients, make_student, run


def test_build_method_args_names_each_clipkd_key() -> None:
    cls = get_method("clipkd")
    for key in ("w_fd", "w_icl", "w_ckd"):
        with pytest.raises(MethodConfigError, match=rf"method_args\.{key}"):
            build_method_args(cls, {key: -2})
    with pytest.raises(MethodConfigError, match=r"method_args\.cross_scale_init"):
        build_method_args(cls, {"cross_scale_init": 0})
    assert build_method_args(cls, {"w_fd": 1000}).w_fd == 1000.0  # ints accepted for floats


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
