"""The trainer with MCAD, DCD and ComKD on a tiny dataset: the same losses from the cache as
online, config errors that name the key (``teacher.fusion``), and a ComKD student exported as
the same open_clip model as a plainly trained one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clipdistill.config import ConfigError, TrainConfig, from_dict
from clipdistill.models.lit import LiTConfig, LiTModel


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("teacher")
    LiTModel(LiTConfig(image_model="test_vit", image_size=32)).save(folder)
    return f"run:{folder}"


@pytest.fixture(scope="module")
def tiny_fusion(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: str, shapes_dataset_dir: Path) -> str:
    from clipdistill.data.loading import load_dataset
    from clipdistill.train.fusion import FusionTrainConfig, train_fusion_teacher

    out = tmp_path_factory.mktemp("fusion")
    config = FusionTrainConfig(epochs=1, batch_size=4, width=16, heads=2, mine_top=4, negatives=2)
    train_fusion_teacher(tiny_teacher, load_dataset(shapes_dataset_dir), out, config, progress=False)
    return f"fusion:{out}"


def _config(tmp_path: Path, data: Path, **overrides: object) -> TrainConfig:
    raw: dict = {
        "name": "t",
        "out_dir": str(tmp_path / "runs"),
        "data": {"path": str(data), "image_size": 32},
        "optim": {"epochs": 1, "batch_size": 3, "lr": 1e-3, "warmup_steps": 1},
        "log_every": 1,
    }
    for key, value in overrides.items():
        section, _, leaf = key.partition("__")
        if leaf:
            raw.setdefault(section, {})[leaf] = value
        else:
            raw[key] = value
    return from_dict(TrainConfig, raw)


@pytest.mark.parametrize(
    ("method", "args", "fusion"),
    [("mcad", {}, True), ("mcad", {"fusion_pairs": "topk", "topk": 2}, True), ("dcd", {}, True), ("comkd", {}, False)],
)
def test_cached_and_online_teacher_give_the_same_losses(
    shapes_dataset_dir: Path,
    tmp_path: Path,
    tiny_teacher: str,
    tiny_fusion: str,
    method: str,
    args: dict,
    fusion: bool,
) -> None:
    from clipdistill.data.loading import load_dataset
    from clipdistill.distill.cache import build_cache
    from clipdistill.train.trainer import Trainer, epoch_plan

    cache = build_cache(
        tiny_teacher,
        load_dataset(shapes_dataset_dir),
        tmp_path / "cache",
        k_augmentations=2,
        image_size=32,
        progress=False,
        fusion=tiny_fusion if fusion else None,
    )
    common: dict = {"method": method, "method_args": args, "teacher__spec": tiny_teacher, "augment": {"k": 2}}
    if fusion:
        common["teacher__fusion"] = tiny_fusion
    online = Trainer(_config(tmp_path / "on", shapes_dataset_dir, **common), progress=False)
    cached = Trainer(_config(tmp_path / "off", shapes_dataset_dir, **common, teacher__cache=str(cache)), progress=False)
    cached.student.load_state_dict(online.student.state_dict())
    cached.method.load_state_dict(online.method.state_dict())
    plan = epoch_plan(online.caption_counts, 2, 0, 0)
    torch.manual_seed(5)  # DCD draws its random negatives from the global generator
    first = online.train_step(*online._batch(plan, 0))
    torch.manual_seed(5)
    second = cached.train_step(*cached._batch(plan, 0))
    loss_terms = [key for key in first if key.endswith("_loss")]
    assert len(loss_terms) >= 3 and loss_terms == [key for key in second if key.endswith("_loss")]
    for key in loss_terms:
        assert second[key] == pytest.approx(first[key], rel=1e-4, abs=1e-6), key


def test_trainer_config_errors_name_the_key(
    shapes_dataset_dir: Path, tmp_path: Path, tiny_teacher: str, tiny_fusion: str
) -> None:
    from clipdistill.distill.cache import CacheMismatchError, build_cache
    from clipdistill.train.trainer import Trainer

    with pytest.raises(ConfigError, match=r"needs fusion_scores: set key 'teacher\.fusion'"):
        Trainer(_config(tmp_path, shapes_dataset_dir, method="mcad", teacher__spec=tiny_teacher), progress=False)
    with pytest.raises(ConfigError, match=r"'teacher\.fusion' is set but method 'clipkd'.*mcad"):
        Trainer(
            _config(
                tmp_path, shapes_dataset_dir, method="clipkd", teacher__spec=tiny_teacher, teacher__fusion=tiny_fusion
            ),
            progress=False,
        )
    with pytest.raises(ConfigError, match=r"key 'teacher\.fusion'.*names a dual encoder"):
        Trainer(
            _config(
                tmp_path, shapes_dataset_dir, method="dcd", teacher__spec=tiny_teacher, teacher__fusion=tiny_teacher
            ),
            progress=False,
        )
    from clipdistill.data.loading import load_dataset

    plain = build_cache(tiny_teacher, load_dataset(shapes_dataset_dir), tmp_path / "c", image_size=32, progress=False)
    with pytest.raises(CacheMismatchError, match=r"fusion=None.*--fusion"):
        Trainer(
            _config(
                tmp_path,
                shapes_dataset_dir,
                method="dcd",
                teacher__spec=tiny_teacher,
                teacher__fusion=tiny_fusion,
                teacher__cache=str(plain),
            ),
            progress=False,
        )


def test_comkd_exports_the_same_student_as_plain_training(
    shapes_dataset_dir: Path, tmp_path: Path, tiny_teacher: str
) -> None:
    import open_clip

    from clipdistill.train.trainer import train

    folders = {}
    for method in ("clip", "comkd"):
        config = _config(tmp_path / method, shapes_dataset_dir, method=method, teacher__spec=tiny_teacher)
        if method == "clip":
            config = _config(tmp_path / method, shapes_dataset_dir, method=method)
        train(config, progress=False)
        folders[method] = config.run_dir / "model"
    configs = [json.loads((folder / "open_clip_config.json").read_text()) for folder in folders.values()]
    assert configs[0] == configs[1]
    models = [open_clip.create_model(f"local-dir:{folder}") for folder in folders.values()]
    states = [model.state_dict() for model in models]
    assert list(states[0]) == list(states[1])
    assert all(states[0][key].shape == states[1][key].shape for key in states[0])
    assert repr(models[0]) == repr(models[1])  # the same module graph, nothing of the method in it
    assert not any(word in key for key in states[1] for word in ("attention_fc", "edu_alpha", "image_proj.weight"))
    assert any(not torch.equal(states[0][k], states[1][k]) for k in states[0])  # really trained differently
