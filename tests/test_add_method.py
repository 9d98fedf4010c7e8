"""Adding a method is one file plus one registry line.

The test writes a throwaway method into a file of its own, registers it with one import line
(what ``distill/methods/__init__.py`` holds for every seed method) and runs
``clipdistill demo --methods clip,<it>`` through training, the report and the plots: nothing
else in the package is told about it. Its report line, its tuned weights and whether it gets
the fusion teacher all come from the class's metadata.
"""

from __future__ import annotations

import importlib
import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clipdistill.cli.main import app
from clipdistill.distill.methods import fusion_methods, get_method, list_methods
from clipdistill.distill.registry import unregister_method
from clipdistill.io import read_jsonl
from test_demo import TINY, write_scenes_dataset

NAME = "throwaway"
SUMMARY = "Throwaway: the task loss plus a feature MSE to the dual teacher (a test's method)"
METHOD_FILE = f'''
"""A method that exists only in a test: the student's clip loss plus a feature MSE to the teacher."""

from __future__ import annotations

from dataclasses import dataclass

from clipdistill.distill.base import (
    Batch, DistillMethod, MethodArgs, MethodOutput, StudentFeatures, TeacherSource, TunedArgs,
)
from clipdistill.distill.common import (
    check_non_negative, frozen_teacher, make_projector, project_to_teacher, require_teacher, scale_value,
)
from clipdistill.distill.losses import clip_loss, feature_mse
from clipdistill.distill.registry import register_method


@register_method
class ThrowawayMethod(DistillMethod):
    name = "{NAME}"
    summary = "{SUMMARY}"
    needs = frozenset({{"teacher_embeddings"}})
    tuned = TunedArgs({{"w_mse": 500.0}}, chosen_by="tests/test_add_method.py (not tuned: a test value)")

    @dataclass(frozen=True)
    class Args(MethodArgs):
        w_task: float = 1.0
        w_mse: float = 2000.0

        def __post_init__(self) -> None:
            check_non_negative(self, "w_task", "w_mse")

    def __init__(self, student_dim: int, teacher: TeacherSource | None, args: Args) -> None:
        super().__init__(student_dim, require_teacher(self.name, teacher), args)
        self.image_proj = make_projector(student_dim, int(self.teacher.embed_dim))

    def forward(self, batch: Batch, student: StudentFeatures) -> MethodOutput:
        teacher = frozen_teacher(self.teacher_outputs(batch), like=student.image)
        image = project_to_teacher(student.image, self.image_proj)
        return MethodOutput(
            losses={{
                "task_loss": self.args.w_task * clip_loss(student.image, student.text, student.logit_scale),
                "mse_loss": self.args.w_mse * feature_mse(image, teacher.image),
            }},
            report={{"logit_scale": scale_value(student.logit_scale)}},
        )
'''


@pytest.fixture
def throwaway_method(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The method's file, written beside the test's data, and its one registry line."""
    package = tmp_path / "extra_methods"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / f"{NAME}.py").write_text(textwrap.dedent(METHOD_FILE))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module(f"extra_methods.{NAME}")  # the registry line
    try:
        yield NAME
    finally:
        unregister_method(NAME)
        for module in [m for m in sys.modules if m == "extra_methods" or m.startswith("extra_methods.")]:
            del sys.modules[module]


def test_registered_method_is_listed_with_its_metadata(throwaway_method: str) -> None:
    assert list_methods()[-1] == throwaway_method
    cls = get_method(throwaway_method)
    assert cls.summary == SUMMARY and cls.teachers() == {"dual"}
    assert throwaway_method not in fusion_methods()


def test_registration_checks_the_metadata(throwaway_method: str) -> None:
    from dataclasses import replace

    from clipdistill.distill.base import TunedArgs
    from clipdistill.distill.registry import register_method

    cls = get_method(throwaway_method)
    stale = type("Stale", (cls,), {"name": "stale", "tuned": replace(cls.tuned, values={"w_msee": 1.0})})
    with pytest.raises(ValueError, match=r"method_args\.w_msee.*did you mean 'w_mse'"):
        register_method(stale)
    unsourced = type("Unsourced", (cls,), {"name": "unsourced", "tuned": TunedArgs({"w_mse": 1.0}, chosen_by="")})
    with pytest.raises(ValueError, match="chosen_by"):
        register_method(unsourced)
    with pytest.raises(ValueError, match="summary"):
        register_method(type("Silent", (cls,), {"name": "silent", "summary": ""}))
    with pytest.raises(ValueError, match="one scratch row"):
        register_method(type("Second", (cls,), {"name": "second", "baseline": True}))
    assert not {"stale", "unsourced", "silent", "second"} & set(list_methods())


@pytest.mark.e2e
def test_demo_runs_a_method_added_in_one_file(
    throwaway_method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    from clipdistill.report import curves_by_method
    from clipdistill.run_config import run_config_yaml

    scenes = write_scenes_dataset(tmp_path / "scenes")
    # A preset file at a budget smaller still than test_demo.py's e2e test's: what is checked here is
    # the wiring, not the numbers.
    preset = tmp_path / "one-epoch.yaml"
    one_epoch = replace(TINY, teacher=replace(TINY.teacher, epochs=1), optim=replace(TINY.optim, epochs=1))
    preset.write_text(run_config_yaml(one_epoch))
    out = tmp_path / "demo"
    args = ["demo", "--data", str(scenes), "--images", str(scenes.parent / "pictures"), "--out", str(out)]
    args += ["--preset", str(preset)]
    result = CliRunner().invoke(app, [*args, "--methods", f"clip,{throwaway_method}"])
    assert result.exit_code == 0, result.output

    report = json.loads((out / "report.json").read_text())
    assert [s["method"] for s in report["students"]] == ["clip", throwaway_method]
    assert report["fusion_teacher"] is None  # its metadata says it reads the dual teacher only
    student = report["students"][1]
    assert student["method_args"] == {"w_mse": 500.0}  # its tuned weights, from its class
    log = read_jsonl(Path(student["run_dir"]) / "log.jsonl")
    assert log and all(record["mse_loss"] > 0 for record in log)  # trained with its own loss term
    markdown = (out / "report.md").read_text()
    assert f"| `{throwaway_method}` |" in markdown
    assert f"- `{throwaway_method}`: {SUMMARY}; variant `tuned`: w_mse=500.0" in markdown
    assert set(curves_by_method(report)) == {"clip", throwaway_method}  # the curves plot draws it
    for name in ("pareto.png", "curves.png", "examples.png"):
        assert (out / name).stat().st_size > 0, name
