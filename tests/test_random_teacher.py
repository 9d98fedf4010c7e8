"""A teacher without trained weights is refused unless the user says so (``allow_random``,
``--allow-random-teacher``): one line naming the spec, why, and how to fix it."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from clipdistill.models.teachers import RandomTeacherError, check_teacher_weights, load_teacher, random_weights_reason

runner = CliRunner()


def _flat(output: str) -> str:
    return " ".join(output.split())


@pytest.fixture(scope="module")
def weightless_student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny open_clip student folder with its weights file removed: open_clip builds it random."""
    from clipdistill.models.students import WEIGHTS_FILE, build_student, save_student, student_config

    folder = save_student(build_student(student_config("tiny", image_size=32)), tmp_path_factory.mktemp("s") / "m")
    (folder / WEIGHTS_FILE).unlink()
    return folder


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("openclip:RN50", "without a pretrained tag"),
        ("openclip:ViT-B-32", "without a pretrained tag"),
        ("lit:efficientnet-lite0@64", "untrained LiT architecture"),
    ],
)
def test_random_specs_are_refused_in_one_line(spec: str, why: str) -> None:
    with pytest.raises(RandomTeacherError) as info:
        load_teacher(spec)  # refused from the spec alone: nothing is built
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"teacher {spec!r} would have random weights")
    assert why in message and "--allow-random-teacher" in message and "@TAG" in message and "run:" in message


def test_pretrained_and_path_specs_are_not_random(tmp_path: Path, weightless_student: Path) -> None:
    assert random_weights_reason("openclip:RN50@openai") is None
    assert random_weights_reason("hf-hub:timm/ViT-B-16-SigLIP") is None
    assert random_weights_reason("hf:openai/clip-vit-base-patch32") is None
    assert random_weights_reason("run:/no/such/run") is None  # the loader names the missing folder
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    assert random_weights_reason(f"openclip:RN50@{weights}") is None
    assert "holds no weights file" in str(random_weights_reason(f"local-dir:{weightless_student}"))


def test_allow_random_loads_it(weightless_student: Path) -> None:
    spec = f"local-dir:{weightless_student}"
    with pytest.raises(RandomTeacherError, match="holds no weights file"):
        load_teacher(spec)
    teacher = load_teacher(spec, allow_random=True)
    assert teacher.spec == spec
    check_teacher_weights("openclip:RN50", allow_random=True)  # no error


def test_cache_build_refuses_then_accepts_with_the_flag(
    weightless_student: Path, shapes_dataset_dir: Path, tmp_path: Path
) -> None:
    from clipdistill.cli.cache_cmd import cache_app
    from clipdistill.data.loading import load_dataset
    from clipdistill.distill.cache import build_cache

    args = ["build", "--data", str(shapes_dataset_dir), "--out", str(tmp_path / "c"), "--image-size", "32"]
    refused = runner.invoke(cache_app, [*args, "--teacher", "openclip:RN50"])
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert "would have random weights" in _flat(refused.output) and "--allow-random-teacher" in _flat(refused.output)
    with pytest.raises(RandomTeacherError):
        build_cache("lit:efficientnet-lite0", load_dataset(shapes_dataset_dir), tmp_path / "lib", progress=False)
    spec = f"local-dir:{weightless_student}"
    accepted = runner.invoke(cache_app, [*args, "--teacher", spec, "--allow-random-teacher"])
    assert accepted.exit_code == 0, accepted.output
    assert (tmp_path / "c" / "manifest.json").is_file()


def test_train_fusion_refuses_a_random_dual_teacher(shapes_dataset_dir: Path, tmp_path: Path) -> None:
    from clipdistill.cli.main import app
    from clipdistill.data.loading import load_dataset
    from clipdistill.train.fusion import train_fusion_teacher

    args = ["teacher", "train-fusion", "--data", str(shapes_dataset_dir), "--out", str(tmp_path / "f")]
    result = runner.invoke(app, [*args, "--teacher", "lit:efficientnet-lite0@64", "--no-progress"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "would have random weights" in _flat(result.output) and "--allow-random-teacher" in _flat(result.output)
    with pytest.raises(RandomTeacherError):
        train_fusion_teacher("openclip:RN50", load_dataset(shapes_dataset_dir), tmp_path / "g", progress=False)
    assert not (tmp_path / "f").exists() and not (tmp_path / "g").exists()
