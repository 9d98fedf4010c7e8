"""The method registry and what it holds every method to: names and needs, ``method_args``
checked like every config key (each error names the key), defaults, the YAML files under
``configs/methods``, and for each baseline its loss terms and gradient flow (to the student and
trainable extras, never to the teacher)."""

from __future__ import annotations

import math

import pytest

from clipdistill.config import load_config
from clipdistill.distill.base import MethodConfigError, build_method_args
from clipdistill.distill.methods import get_method, list_methods
from clipdistill.distill.methods.conaclip import default_edges
from method_fixtures import EXPECTED_TERMS, TEACHER_DIM, build, check_gradients, make_student, run

# ---------------------------------------------------------------- names, needs and args


def test_list_methods_contains_the_four() -> None:
    assert {"clip", "openclip", "clipkd", "conaclip"} <= set(list_methods())


def test_all_seven_methods_are_registered_with_their_needs() -> None:
    assert {"clip", "openclip", "clipkd", "conaclip", "mcad", "dcd", "comkd"} <= set(list_methods())
    assert get_method("mcad").needs == {"teacher_embeddings", "fusion_scores"}
    assert get_method("dcd").needs == {"teacher_embeddings"} and "fusion_scores" in get_method("dcd").optional_needs
    assert get_method("comkd").needs == {"teacher_embeddings"}


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


@pytest.mark.parametrize("method", ["mcad", "dcd", "comkd"])
def test_method_yaml_files_load(method: str) -> None:
    config = load_config(["configs/emoji.yaml", f"configs/methods/{method}.yaml"])
    assert config.method == method
    build_method_args(get_method(method), config.method_args)
    assert (config.teacher.fusion == "fusion:runs/fusion") == (method == "mcad")


# ---------------------------------------------------------------- every baseline


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
