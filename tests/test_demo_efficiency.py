"""The demo's efficiency stage: one ONNX timing run per set of networks, students grouped by network.

The timing itself (``onnx_timing.onnx_efficiency``) is tested in test_onnx_timing.py and end to
end in test_demo.py; here it is replaced by a recorder, so these tests check which models the
stage times, how their figures reach the report and when the memo in efficiency.json is reused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

import clipdistill.eval.onnx_timing as onnx_timing
import clipdistill.models.teachers as teachers
from clipdistill.eval.demo_efficiency import EFFICIENCY_FILE, add_onnx_efficiency, group_networks, network_key
from clipdistill.models.students import CONFIG_FILE, WEIGHTS_FILE, student_config


def _student_folder(root: Path, name: str, image_size: int, weights: bytes = b"w0") -> str:
    """A saved student as the trainer writes it (``RUN/model``): config + weights file."""
    directory = root / name / "model"
    directory.mkdir(parents=True)
    config = student_config("tiny", image_size=image_size)
    preprocess = {"size": image_size, "mean": [0.5] * 3, "std": [0.5] * 3}
    (directory / CONFIG_FILE).write_text(json.dumps({"model_cfg": config, "preprocess_cfg": preprocess}))
    (directory / WEIGHTS_FILE).write_bytes(weights)
    return f"local-dir:{directory}"


def _lit_teacher(root: Path, weights: bytes = b"teacher") -> str:
    """A LiT teacher folder (not an open_clip one): keyed by spec + weights fingerprint."""
    from clipdistill.models.lit import MODEL_FILE
    from clipdistill.models.lit import WEIGHTS_FILE as LIT_WEIGHTS

    directory = root / "teacher"
    directory.mkdir(exist_ok=True)
    (directory / MODEL_FILE).write_text(json.dumps({"kind": "lit"}))
    (directory / LIT_WEIGHTS).write_bytes(weights)
    return f"run:{directory}"


class Recorder:
    """Stands in for ``onnx_efficiency``: records each call's models; a student's figures are
    derived from its input size and the call's number, so they can be told apart."""

    def __init__(self) -> None:
        self.calls: list[dict[str, str]] = []

    def __call__(self, models: Mapping[str, Any], **kwargs: Any) -> dict[str, Any]:
        assert kwargs["repeats"] >= 30 and tuple(kwargs["batch_sizes"]) == (1, 64)
        self.calls.append(dict(models))
        rows = {}
        for name, spec in models.items():
            size = 0 if name == "teacher" else network_key(spec.removeprefix("model<")[:-1])["image_size"]
            base = 10.0 if name == "teacher" else size / 16 + len(self.calls) / 100  # 32 px: 2.01 in call 1
            ms = {"image_b1": base, "text_b1": base / 2, "image_b64": base / 4, "text_b64": base / 8}
            rows[name] = {
                "onnx_ms": ms,
                "flops": {"image": int(base * 1e6), "text": int(base * 1e5)},
                "gflops_per_s": dict.fromkeys(ms, 1.0),
                "peak_share": dict.fromkeys(ms, 0.5),
            }
        return {"matmul_peak_gflops": 50.0, "threads": kwargs["threads"], "repeats": kwargs["repeats"], "models": rows}


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    """No exports and no timing: models are their specs, the measurement is recorded."""
    recorder = Recorder()
    monkeypatch.setattr(onnx_timing, "onnx_efficiency", recorder)
    monkeypatch.setattr(teachers, "load_model", lambda spec: f"model<{spec}>")
    return recorder


def _report(teacher: str, specs: list[str]) -> dict[str, Any]:
    students = [
        {"method": f"m{i}", "seed": 0, "spec": spec, "latency_ms": {"image_b1": 9.0}} for i, spec in enumerate(specs)
    ]
    return {"teacher": {"spec": teacher, "latency_ms": {"image_b1": 99.0}}, "students": students}


def test_students_are_grouped_by_open_clip_config_and_input_size(tmp_path: Path) -> None:
    """Seeds and methods with one architecture are one network whatever their weights; another
    input size is another network; ``run:RUN`` and ``local-dir:RUN/model`` are the same one."""
    a = _student_folder(tmp_path, "clip-s0", 32, b"seed 0")
    b = _student_folder(tmp_path, "clip-s1", 32, b"seed 1")
    c = _student_folder(tmp_path, "dcd-s0", 48)
    d = _student_folder(tmp_path, "conaclip-s0", 32, b"other method")
    groups = group_networks([a, b, c, d])
    assert list(groups.values()) == [[a, b, d], [c]]
    assert network_key(f"run:{tmp_path / 'clip-s0'}") == network_key(a)
    assert network_key(a)["image_size"] == 32 and network_key(a)["open_clip"]["vision_cfg"]["image_size"] == 32
    teacher = _lit_teacher(tmp_path)
    assert network_key(teacher)["spec"] == teacher and len(network_key(teacher)["fingerprint"]) == 64


def test_a_folder_without_model_cfg_is_refused_by_name(tmp_path: Path) -> None:
    spec = _student_folder(tmp_path, "broken", 32)
    path = Path(spec.removeprefix("local-dir:")) / CONFIG_FILE
    path.write_text(json.dumps({"preprocess_cfg": {"size": 32}}))
    with pytest.raises(ValueError, match=f"{path}: no 'model_cfg'"):
        network_key(spec)


def test_one_run_times_the_teacher_and_one_student_per_network(tmp_path: Path, recorder: Recorder) -> None:
    teacher = _lit_teacher(tmp_path)
    specs = [_student_folder(tmp_path, name, size) for name, size in (("a", 32), ("b", 32), ("c", 48))]
    report = _report(teacher, specs)
    add_onnx_efficiency(tmp_path, report, repeats=30, threads=2, say=lambda message: None)

    (models,) = recorder.calls
    assert models["teacher"] == f"model<{teacher}>"
    assert sorted(spec for name, spec in models.items() if name != "teacher") == [
        f"model<{specs[0]}>",
        f"model<{specs[2]}>",
    ]
    assert report["teacher"]["onnx_ms"] == {"image_b1": 10.0, "text_b1": 5.0, "image_b64": 2.5, "text_b64": 1.25}
    assert report["teacher"]["flops_per_item"] == {"image": 10_000_000, "text": 1_000_000}
    assert report["teacher"]["peak_share"]["image_b64"] == 0.5
    a, b, c = report["students"]
    assert a["onnx_ms"] == b["onnx_ms"] and a["onnx_ms"]["image_b1"] == pytest.approx(2.01)
    assert c["onnx_ms"]["image_b1"] == pytest.approx(3.01)
    assert a["latency_ms"] == {"image_b1": 9.0}  # the eager figures stay
    assert set(report["efficiency"]) >= {"matmul_peak_gflops", "threads", "repeats", "measured_utc"}
    assert report["efficiency"]["threads"] == 2 and report["efficiency"]["repeats"] == 30


def test_the_measurement_is_memoised_until_the_networks_change(tmp_path: Path, recorder: Recorder) -> None:
    """A rerun reuses efficiency.json (same figures, no timing); another seed of a timed network
    changes nothing; a student of a new architecture or a retrained teacher re-times all, in one run."""
    teacher = _lit_teacher(tmp_path)
    specs = [_student_folder(tmp_path, "a", 32), _student_folder(tmp_path, "b", 48)]
    first = _report(teacher, specs)
    add_onnx_efficiency(tmp_path, first, repeats=30, threads=2, say=lambda message: None)
    memo = tmp_path / EFFICIENCY_FILE
    stamp = memo.stat().st_mtime_ns
    assert len(recorder.calls) == 1

    stages: list[tuple[str, bool]] = []
    again = _report(teacher, [*specs, _student_folder(tmp_path, "a-s1", 32, b"another seed")])
    add_onnx_efficiency(tmp_path, again, repeats=30, threads=2, stage=lambda *a: stages.append(a) or True)
    assert len(recorder.calls) == 1 and memo.stat().st_mtime_ns == stamp
    assert stages == [("efficiency (ONNX Runtime: teacher + 2 student network(s), 30 repeats)", True)]
    assert again["students"][2]["onnx_ms"] == again["students"][0]["onnx_ms"] == first["students"][0]["onnx_ms"]
    assert again["efficiency"] == first["efficiency"]

    said: list[str] = []
    add_onnx_efficiency(
        tmp_path, _report(teacher, [*specs, _student_folder(tmp_path, "c", 64)]), threads=2, say=said.append
    )
    assert len(recorder.calls) == 2 and len(recorder.calls[1]) == 4  # teacher + three networks, together
    assert said == [f"{memo} was measured for other networks or settings; measuring again"]

    _lit_teacher(tmp_path, weights=b"retrained")
    add_onnx_efficiency(tmp_path, _report(teacher, specs), threads=2, say=said.append)
    assert len(recorder.calls) == 3

    add_onnx_efficiency(tmp_path, _report(teacher, specs), threads=1, say=said.append)  # other settings
    assert len(recorder.calls) == 4


def test_an_unreadable_memo_is_measured_again_and_said(tmp_path: Path, recorder: Recorder) -> None:
    teacher = _lit_teacher(tmp_path)
    (tmp_path / EFFICIENCY_FILE).write_text("{not json")
    said: list[str] = []
    report = _report(teacher, [_student_folder(tmp_path, "a", 32)])
    add_onnx_efficiency(tmp_path, report, threads=2, say=said.append)
    assert len(recorder.calls) == 1 and "onnx_ms" in report["students"][0]
    assert len(said) == 1 and "is unreadable" in said[0] and "measuring again" in said[0]
    assert json.loads((tmp_path / EFFICIENCY_FILE).read_text())["request"]["threads"] == 2


@pytest.mark.slow
def test_real_timing_of_tiny_networks_reaches_the_report(tmp_path: Path) -> None:
    """Without the recorder: two seeds of one tiny student and a teacher of another size are
    exported and timed (30 repeats, batch 1 and 64); the seeds share one measured network.
    Slow (about 30 s of CPU, minutes on a loaded 2-core machine): the e2e demo test in
    test_demo.py already runs this path for real."""
    import torch

    from clipdistill.models.students import build_student, save_student

    specs = []
    for seed, size in ((0, 32), (1, 32), (2, 40)):
        torch.manual_seed(seed)
        specs.append(
            f"local-dir:{save_student(build_student(student_config('tiny', image_size=size)), tmp_path / str(seed))}"
        )
    teacher, students = specs[2], specs[:2]
    report = _report(teacher, students)
    add_onnx_efficiency(tmp_path, report, repeats=30, threads=1, say=lambda message: None)
    memo = json.loads((tmp_path / EFFICIENCY_FILE).read_text())
    assert list(memo["timed_specs"].values()) == [teacher, students[0]]
    first, second = report["students"]
    assert first["onnx_ms"] == second["onnx_ms"] and set(first["onnx_ms"]) == {
        "image_b1",
        "text_b1",
        "image_b64",
        "text_b64",
    }
    assert all(ms > 0 for ms in (*first["onnx_ms"].values(), *report["teacher"]["onnx_ms"].values()))
    # the 40 px teacher runs the same text tower and 1.56x the pixels: more image work, same text work
    assert report["teacher"]["flops_per_item"]["image"] > first["flops_per_item"]["image"]
    assert report["teacher"]["flops_per_item"]["text"] == first["flops_per_item"]["text"]
    assert report["efficiency"]["threads"] == 1 and report["efficiency"]["matmul_peak_gflops"] > 0


class _Sized:
    """A loaded model that records the input size it was set to read."""

    def __init__(self, spec: str) -> None:
        self.spec, self.size = spec, None

    def at_image_size(self, size: int) -> _Sized:
        self.size = size
        return self


def test_the_teacher_at_smaller_inputs_is_timed_with_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each smaller input is one more model in the same interleaved run, its image tower only;
    its caption figures are the teacher's (the same text tower)."""
    calls: list[tuple[dict[str, Any], Any]] = []

    def timing(models: Mapping[str, Any], **kwargs: Any) -> dict[str, Any]:
        calls.append((dict(models), kwargs.get("towers")))
        rows = {}
        for name, model in models.items():
            image = model.size / 10 if model.size else 20.0
            ms = {"image_b1": image, "image_b64": image / 4}
            if name not in (kwargs.get("towers") or {}):
                ms |= {"text_b1": 7.0, "text_b64": 3.0}
            rows[name] = {
                "onnx_ms": ms,
                "flops": {"image": int(image * 1e6)} | ({"text": 5} if "text_b1" in ms else {}),
                "gflops_per_s": dict.fromkeys(ms, 1.0),
                "peak_share": dict.fromkeys(ms, 0.5),
            }
        return {"matmul_peak_gflops": 50.0, "threads": 2, "repeats": 30, "models": rows}

    monkeypatch.setattr(onnx_timing, "onnx_efficiency", timing)
    monkeypatch.setattr(teachers, "load_model", _Sized)
    teacher, student = _lit_teacher(tmp_path), _student_folder(tmp_path, "a", 32)
    report = _report(teacher, [student])
    report["teacher"]["smaller_inputs"] = [{"image_size": 128}, {"image_size": 96}]
    add_onnx_efficiency(tmp_path, report, repeats=30, threads=2, say=lambda message: None)

    ((models, towers),) = calls
    assert towers == {"teacher@128": ("image",), "teacher@96": ("image",)}
    assert models["teacher@128"].size == 128 and models["teacher"].size is None
    first, second = report["teacher"]["smaller_inputs"]
    assert first["onnx_ms"] == {"image_b1": 12.8, "image_b64": 3.2, "text_b1": 7.0, "text_b64": 3.0}
    assert second["onnx_ms"]["image_b1"] == pytest.approx(9.6) and second["flops_per_item"]["text"] == 5
    assert report["students"][0]["network"].startswith("student-")
    assert json.loads((tmp_path / EFFICIENCY_FILE).read_text())["request"]["teacher_sizes"] == [128, 96]
