"""`student.init`: a student that starts from an open_clip checkpoint's architecture and weights."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

from clipdistill.config import ConfigError, TrainConfig, from_dict
from clipdistill.models.lit import LiTConfig, LiTModel
from clipdistill.models.student_init import init_student
from clipdistill.models.students import load_student
from clipdistill.train.trainer import train


def _config(tmp_path: Path, data: Path, name: str, lr: float = 1e-3, **student: object) -> TrainConfig:
    raw = {
        "name": name,
        "out_dir": str(tmp_path / "runs"),
        "method": "clip",
        "data": {"path": str(data), "image_size": 32},
        "optim": {"epochs": 2, "batch_size": 3, "lr": lr, "warmup_steps": 1},
        "student": student,
    }
    return from_dict(TrainConfig, raw)


@pytest.fixture(scope="module")
def source_run(shapes_dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tmp_path = tmp_path_factory.mktemp("source")
    config = _config(tmp_path, shapes_dataset_dir, "source")
    summary = train(config, progress=False)
    return config.run_dir / "model", summary


def test_init_at_zero_lr_keeps_the_source_student(source_run, shapes_dataset_dir: Path, tmp_path: Path) -> None:
    source_dir, _ = source_run
    config = _config(tmp_path, shapes_dataset_dir, "again", lr=1e-12, init=f"local-dir:{source_dir}")
    train(config, progress=False)
    source = load_student(source_dir).model.state_dict()
    trained = load_student(config.run_dir / "model").model.state_dict()
    assert source.keys() == trained.keys()
    for name, value in source.items():
        if "running_" in name or "num_batches" in name:
            continue  # BatchNorm statistics follow the data in train mode, whatever the lr
        torch.testing.assert_close(trained[name], value, atol=1e-6, rtol=0, msg=name)
    # Its val recall is not compared: the BatchNorm statistics it kept following moved it by one
    # rank of the 3 val images (rsum 483.3 against 466.7), which says nothing about the weights.
    saved = json.loads((config.run_dir / "model" / "open_clip_config.json").read_text())
    assert saved == json.loads((source_dir / "open_clip_config.json").read_text())
    open_clip.create_model(f"local-dir:{config.run_dir / 'model'}")  # still a plain open_clip folder


def test_init_keeps_the_checkpoints_pixel_statistics(source_run, tmp_path: Path) -> None:
    source_dir, _ = source_run
    folder = tmp_path / "custom"
    folder.mkdir()
    raw = json.loads((source_dir / "open_clip_config.json").read_text())
    raw["preprocess_cfg"] = {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    (folder / "open_clip_config.json").write_text(json.dumps(raw))
    (folder / "open_clip_model.safetensors").write_bytes((source_dir / "open_clip_model.safetensors").read_bytes())
    student = init_student(f"local-dir:{folder}")
    assert student.image_mean == (0.5, 0.5, 0.5) and student.image_std == (0.25, 0.25, 0.25)
    from clipdistill.models.students import save_student

    save_student(student, tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "open_clip_config.json").read_text())
    assert saved["preprocess_cfg"]["mean"] == [0.5, 0.5, 0.5] and saved["preprocess_cfg"]["std"] == [0.25] * 3


def test_zoo_architecture_carries_its_config() -> None:
    student = init_student("openclip:RN50")  # no tag: open_clip's architecture with random weights
    assert student.model_cfg == open_clip.get_model_config("RN50")


def test_init_refusals_name_the_key(source_run, shapes_dataset_dir: Path, tmp_path: Path) -> None:
    source_dir, _ = source_run
    with pytest.raises(ConfigError, match=r"student\.init.*student\.model_config"):
        _config(tmp_path, shapes_dataset_dir, "both", init=f"local-dir:{source_dir}", model_config="x.json")
    with pytest.raises(ConfigError, match=r"student\.init.*does not exist"):
        train(_config(tmp_path, shapes_dataset_dir, "missing", init=f"local-dir:{tmp_path / 'nope'}"), progress=False)
    lit = tmp_path / "lit"
    LiTModel(LiTConfig(image_model="test_convnext", image_size=32)).save(lit)
    with pytest.raises(ConfigError, match=r"student\.init.*open_clip"):
        train(_config(tmp_path, shapes_dataset_dir, "lit", init=f"run:{lit}"), progress=False)
