"""`clipdistill distill`: one run config resolved from a preset, files, flags and --set; methods
as NAME[:VARIANT]; the resolved OUT/config.yaml reruns the same job; any teacher spec and a
split-less CSV in one command."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from clipdistill.cli.main import app
from clipdistill.config import ConfigError
from clipdistill.demo import DemoError, run_distill
from clipdistill.distill.base import MethodConfigError
from clipdistill.distill.methods import method_variants, resolve_method_entry, tuned_method_args
from clipdistill.run_config import RunConfig, RunDataConfig, resolve_run_config, run_config_yaml
from test_demo import TINY, write_scenes_dataset
from test_splits import _write_csv

# The wiring is under test, not quality: one epoch of everything.
ONE_EPOCH = replace(
    TINY,
    teacher=replace(TINY.teacher, epochs=1),
    optim=replace(TINY.optim, epochs=1, warmup_steps=1),
)


def _print_config(*args: str) -> dict:
    result = CliRunner().invoke(app, ["distill", "--print-config", *args])
    assert result.exit_code == 0, result.output
    return yaml.safe_load(result.output)


def test_print_config_resolves_preset_flags_and_set_in_order() -> None:
    quick = _print_config()
    assert quick["teacher"]["spec"] == "lit:efficientnet-lite0" and quick["student"]["preset"] == "lite0"
    assert quick["optim"]["epochs"] == 2 and quick["seeds"] == 1 and quick["default_variant"] == "paper"
    # every method's paper variant, and the tuned variants as rows of their own
    from clipdistill.distill.methods import list_methods, method_variants

    tuned = [f"{name}:tuned" for name in list_methods() if "tuned" in method_variants(name)]
    assert tuned and quick["methods"] == [*list_methods(), *tuned]
    assert _print_config("--preset", "full")["seeds"] == 3
    big = _print_config("--preset", "big")  # a ladder of two sizes under the mpnet teacher
    assert big["teacher"]["spec"] == "lit:efficientnet-lite0+mpnet" and big["seeds"] == 3
    assert big["teacher"]["text_proj"] == "linear"  # the map that lifts the mpnet teacher above `full`'s
    assert big["students"] == [{"image_size": 64}, {"image_size": 96}] and big["methods"] == [
        "clip",
        "clipkd",
        "conaclip",
    ]
    given = _print_config(
        "--teacher", "openclip:ViT-B-32@laion2b_s34b_b79k", "--student", "tiny", "--methods", "clip,dcd:tuned",
        "--set", "optim.epochs=5", "--set", "student.image_size=80", "--data", "table.csv", "--split-seed", "3",
    )  # fmt: skip
    assert given["teacher"]["spec"] == "openclip:ViT-B-32@laion2b_s34b_b79k"
    assert given["methods"] == ["clip", "dcd:tuned"] and given["optim"]["epochs"] == 5
    # --student replaces the preset's whole student (its inits were for lite0); --set still applies on top.
    assert given["student"]["preset"] == "tiny" and given["student"]["image_init"] == "random"
    assert given["student"]["image_size"] == 80
    assert given["data"]["path"] == "table.csv" and given["data"]["split_seed"] == 3
    assert (
        _print_config("--student", "local-dir:/models/mobileclip")["student"]["init"] == "local-dir:/models/mobileclip"
    )


def test_a_config_file_layers_over_the_preset_and_flags_over_it(tmp_path: Path) -> None:
    config = tmp_path / "mine.yaml"
    config.write_text("optim:\n  epochs: 7\nseeds: 2\nmethods: clip,conaclip\n")
    resolved = _print_config("--config", str(config), "--seeds", "4")
    assert resolved["optim"]["epochs"] == 7 and resolved["optim"]["lr"] == 0.002  # the rest is the preset's
    assert resolved["seeds"] == 4 and resolved["methods"] == ["clip", "conaclip"]


def test_bad_run_configs_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.epoch' \(did you mean 'optim.epochs'\?\)"):
        resolve_run_config(overrides=["optim.epoch=3"])
    with pytest.raises(ConfigError, match="key 'seeds' must be an integer"):
        resolve_run_config(overrides=["seeds=two"])
    with pytest.raises(ConfigError, match=r"unknown preset 'quik'.*did you mean 'quick'"):
        resolve_run_config(preset="quik")
    result = CliRunner().invoke(app, ["distill", "--print-config", "--set", "teacher.epocs=2"])
    assert result.exit_code == 2 and "teacher.epochs" in result.output


def test_methods_are_named_with_their_variants() -> None:
    tuned = tuned_method_args()
    assert "dcd" in tuned and method_variants("dcd") == {"paper": {}, "tuned": tuned["dcd"]}
    assert resolve_method_entry("dcd") == ("dcd", "paper", {})
    assert resolve_method_entry("dcd:tuned") == ("dcd", "tuned", tuned["dcd"])
    assert resolve_method_entry("dcd", "tuned") == ("dcd", "tuned", tuned["dcd"])
    assert resolve_method_entry("clip", "tuned") == ("clip", "paper", {})  # no sweep chose otherwise for clip
    with pytest.raises(MethodConfigError, match=r"method 'clip' has no variant 'tuned'.*its variants: paper"):
        resolve_method_entry("clip:tuned")


def test_a_method_that_needs_a_fusion_teacher_it_cannot_get_is_refused_first(tmp_path: Path) -> None:
    config = replace(
        TINY,
        data=RunDataConfig(path=str(tmp_path / "never-read.csv")),
        teacher=replace(TINY.teacher, spec="openclip:ViT-B-32@laion2b_s34b_b79k"),
        methods=["clip", "mcad"],
    )
    with pytest.raises(DemoError, match=r"mcad need a fusion teacher.*--fusion fusion:PATH"):
        run_distill(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before any stage wrote anything


@pytest.mark.e2e
def test_the_resolved_config_reruns_the_same_job(tmp_path: Path) -> None:
    """OUT/config.yaml is complete: `distill --config OUT/config.yaml --out NEW` gives the same
    report metrics (teacher and students) on the same machine."""
    scenes = write_scenes_dataset(tmp_path / "scenes")
    config = replace(
        ONE_EPOCH,
        data=RunDataConfig(path=str(scenes), images=str(scenes.parent / "pictures")),
        methods=["clip", "conaclip"],
    )
    first = run_distill(config, tmp_path / "a")
    written = tmp_path / "a" / "config.yaml"
    assert yaml.safe_load(written.read_text()) == yaml.safe_load(
        run_config_yaml(replace(config, methods=["clip", "conaclip"]))
    )
    assert first["config"]["methods"] == ["clip", "conaclip"]

    result = CliRunner().invoke(app, ["distill", "--config", str(written), "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    again = json.loads((tmp_path / "b" / "report.json").read_text())
    assert again["config"] == first["config"]
    assert again["teacher"]["metrics"] == first["teacher"]["metrics"]
    assert [(s["method"], s["metrics"]) for s in again["students"]] == [
        (s["method"], s["metrics"]) for s in first["students"]
    ]
    assert "clipdistill serve" in result.output and "clipdistill search" in result.output


def test_the_quick_preset_is_what_the_demo_trains() -> None:
    """`make demo` trains the quick preset: its student and budget, read from one file."""
    quick = resolve_run_config(preset="quick")
    assert isinstance(quick, RunConfig) and quick.data.path is None  # the builtin emoji data
    assert (quick.cache.image_size, quick.augment.k, quick.optim.epochs, quick.optim.lr) == (128, 2, 2, 0.002)
    assert (quick.student.preset, quick.student.image_size, quick.student.frozen_stages) == ("lite0", 96, 5)


@pytest.mark.parametrize("example", sorted((Path(__file__).parents[1] / "configs" / "examples").glob("*.yaml")))
def test_every_example_run_config_resolves(example: Path) -> None:
    """The shipped example configs use only keys and values the run config knows (they cannot be
    run here: their teachers need the hub)."""
    resolved = resolve_run_config(configs=[example])
    assert resolved.teacher.spec != "lit:efficientnet-lite0"  # each example brings its own teacher


# A ViT teacher as users bring them (open_clip's architecture, patch tokens, a causal text
# transformer), small enough for a test; its weights are random but saved, as a trained one's are.
TINY_VIT = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def _scenes_csv(root: Path) -> Path:
    """The scenes as open_clip's CSV (filepath, title), with no split column."""
    scenes = write_scenes_dataset(root)
    records = json.loads(scenes.read_text())["images"]
    rows = [
        {"filepath": f"pictures/{record['filename']}", "title": sentence["raw"]}
        for record in records
        for sentence in record["sentences"]
    ]
    return _write_csv(root / "pairs.csv", rows)


@pytest.mark.e2e
def test_distill_takes_an_open_clip_vit_teacher_and_a_split_less_csv(tmp_path: Path) -> None:
    from clipdistill.models.students import build_student, save_student
    from clipdistill.serve.search import Searcher

    teacher = save_student(build_student(TINY_VIT), tmp_path / "vit")
    table = _scenes_csv(tmp_path / "scenes")
    preset = tmp_path / "one-epoch.yaml"
    preset.write_text(run_config_yaml(ONE_EPOCH))
    out = tmp_path / "run"
    args = ["distill", "--preset", str(preset), "--teacher", f"local-dir:{teacher}", "--student", "tiny"]
    result = CliRunner().invoke(app, [*args, "--data", str(table), "--methods", "clip,clipkd", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["teacher"]["spec"] == f"local-dir:{teacher}" and report["teacher"]["train_seconds"] is None
    assert not (out / "teacher" / "train_summary.json").exists()  # a given teacher is used, not trained
    assert report["fusion_teacher"] is None  # auto: no fusion head for a non-LiT teacher
    assert report["splits"]["carved_from_train"] == ["test", "val"] and report["n_images"] > 0
    assert [s["method"] for s in report["students"]] == ["clip", "clipkd"]
    assert report["config"]["teacher"]["spec"] == f"local-dir:{teacher}"
    assert f"clipdistill serve {out / 'index'}" in result.output
    hits = Searcher.open(out / "index").search(text="a red circle on the left", k=3)
    assert len(hits) == 3


@pytest.mark.e2e
def test_the_lit_teacher_as_an_open_clip_folder_teaches_the_same_students(tmp_path: Path) -> None:
    """The offline route with real weights: a trained LiT teacher exported as a plain open_clip
    folder (`export --format open_clip`) is a `local-dir:` teacher like any user's, and scores and
    teaches as the `run:` folder it came from does."""
    from clipdistill.export.open_clip import export_open_clip

    scenes = write_scenes_dataset(tmp_path / "scenes")
    config = replace(
        ONE_EPOCH,
        data=RunDataConfig(path=str(scenes), images=str(scenes.parent / "pictures")),
        methods=["clip", "clipkd"],
    )
    from_run = run_distill(config, tmp_path / "a")
    export_open_clip(f"run:{tmp_path / 'a' / 'teacher'}", tmp_path / "lit-openclip")
    teacher = f"local-dir:{tmp_path / 'lit-openclip'}"
    from_dir = run_distill(replace(config, teacher=replace(config.teacher, spec=teacher)), tmp_path / "b")
    assert from_dir["teacher"]["spec"] == teacher
    assert from_dir["teacher"]["metrics"]["rsum"] == pytest.approx(from_run["teacher"]["metrics"]["rsum"], abs=0.1)
    for a, b in zip(from_run["students"], from_dir["students"], strict=True):
        assert a["method"] == b["method"]
        assert b["metrics"]["rsum"] == pytest.approx(a["metrics"]["rsum"], abs=0.5), a["method"]
