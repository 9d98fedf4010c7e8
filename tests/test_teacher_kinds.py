"""The teacher-kind and export-target registries (timm's pattern): every entry is complete, the
errors list what is registered, and one entry is all a new kind or format needs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from clipdistill.export import ExportTarget, get_target, list_targets, register_target, unregister_target
from clipdistill.models.fingerprint import teacher_files
from clipdistill.models.kinds import (
    ModelSpec,
    ModelSpecError,
    TeacherKind,
    fusion_kinds,
    get_kind,
    list_kinds,
    register_kind,
    unregister_kind,
)
from clipdistill.models.spec import parse_fusion_spec, parse_spec
from clipdistill.models.teachers import load_model, random_weights_reason

KINDS = ("openclip", "hf-hub", "local-dir", "hf", "run", "lit", "blip-itm", "fusion")


def test_the_registered_kinds_in_order() -> None:
    assert list_kinds() == list(KINDS)
    assert fusion_kinds() == ["blip-itm", "fusion"]


@pytest.mark.parametrize("name", list_kinds())
def test_every_kind_is_complete(name: str) -> None:
    kind = get_kind(name)
    assert kind.name == name
    assert kind.syntax.startswith(f"{name}:") and len(kind.syntax) > len(name) + 10  # a help line, not a bare name
    assert callable(kind.load), "a loader"
    assert callable(kind.weight_files), "a fingerprint rule"
    assert callable(kind.random_weights), "a random-weights rule"


@pytest.mark.parametrize("name", list_kinds())
def test_an_unknown_schema_lists_every_kind(name: str) -> None:
    with pytest.raises(ModelSpecError, match="unknown model schema 'nosuch'") as info:
        parse_spec("nosuch:thing")
    assert get_kind(name).syntax in str(info.value)


def test_get_kind_gives_close_matches() -> None:
    with pytest.raises(ModelSpecError, match=r"unknown model schema 'locl-dir'\. Did you mean 'local-dir:'"):
        get_kind("locl-dir")


@pytest.fixture
def toy_kind(tmp_path: Path) -> Iterator[str]:
    """A throwaway kind: ``toy:NAME``, loaded as a stand-in object, one weights file per name."""

    def load(spec: ModelSpec, *, load_weights: bool = True) -> Any:
        class Toy:
            def to(self, device: object) -> Toy:
                return self

            def eval(self) -> Toy:
                self.loaded = (spec.name, load_weights)
                return self

        return Toy()

    register_kind(
        TeacherKind(
            name="toy",
            syntax="toy:NAME  (a test kind)",
            load=load,
            weight_files=lambda spec: [tmp_path / f"{spec.name}.safetensors"],
            random_weights=lambda spec: "toys are random" if spec.name == "random" else None,
        )
    )
    try:
        yield "toy"
    finally:
        unregister_kind("toy")


def test_one_entry_is_all_a_kind_needs(toy_kind: str, tmp_path: Path) -> None:
    assert parse_spec("toy:a") == ModelSpec("toy", "a")
    assert load_model("toy:a", load_weights=False).loaded == ("a", False)
    assert teacher_files("toy:a") == [tmp_path / "a.safetensors"]
    assert random_weights_reason("toy:random") == "toys are random" and random_weights_reason("toy:a") is None
    with pytest.raises(ModelSpecError, match="names a dual encoder") as info:
        parse_fusion_spec("toy:a")
    assert "toy:" not in str(info.value).partition("\n")[2]  # only the fusion kinds are offered
    with pytest.raises(ModelSpecError, match=r"toy:NAME  \(a test kind\)"):
        parse_spec("tyo:a")


def test_a_bad_entry_fails_at_registration() -> None:
    def kind(name: str, syntax: str) -> TeacherKind:
        return TeacherKind(name=name, syntax=syntax, load=lambda spec: None, weight_files=lambda spec: None)

    with pytest.raises(ValueError, match="must start with 'mine:'"):
        register_kind(kind("mine", "other:NAME"))
    with pytest.raises(ValueError, match="registered already"):
        register_kind(kind("run", "run:PATH"))
    with pytest.raises(ValueError, match="lower-case"):
        register_kind(kind("Mine", "Mine:NAME"))
    assert list_kinds() == list(KINDS)


# --- export targets ---------------------------------------------------------------------------
def _app() -> typer.Typer:
    from clipdistill.cli.deploy_cmd import export_command

    app = typer.Typer()
    app.command("export")(export_command)
    app.command("noop")(lambda: None)  # two commands keep typer's subcommand syntax
    return app


def test_the_registered_export_targets() -> None:
    assert list_targets() == ["onnx", "open_clip"]
    for name in list_targets():
        target = get_target(name)
        assert target.summary and target.title and callable(target.run)
    help_text = " ".join(CliRunner().invoke(_app(), ["export", "--help"]).output.split())
    assert "onnx (default):" in help_text and "open_clip:" in help_text


def test_one_entry_is_all_an_export_format_needs(tmp_path: Path) -> None:
    calls: list[tuple[str, Path, dict[str, Any]]] = []

    def run(spec: str, out: Path, *, stage: Any = None, **options: Any) -> dict[str, Any]:
        calls.append((spec, out, options))
        return {}

    register_target(ExportTarget(name="toy", title="toy", summary="a test format", run=run, options=("int8",)))
    try:
        runner = CliRunner()
        result = runner.invoke(_app(), ["export", "--model", "run:x", "--format", "toy", "--int8", "--out", "o"])
        assert result.exit_code == 0, result.output
        assert calls == [("run:x", Path("o"), {"int8": True})]
        refused = runner.invoke(_app(), ["export", "--model", "run:x", "--format", "toy", "--data", "d", "--out", "o"])
        assert refused.exit_code == 2
        assert "--data belongs to the ONNX export; --format toy does not take it" in " ".join(refused.output.split())
        unknown = runner.invoke(_app(), ["export", "--model", "run:x", "--format", "coreml", "--out", "o"])
        assert "valid formats are onnx, open_clip, toy" in " ".join(unknown.output.split())
    finally:
        unregister_target("toy")
