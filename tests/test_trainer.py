"""The trainer on a tiny dataset: outputs, exact resume, refusals that name the key."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

from clipdistill.config import ConfigError, TrainConfig, from_dict
from clipdistill.distill.base import MethodConfigError
from clipdistill.models.lit import LiTConfig, LiTModel
from clipdistill.train.checkpoint import CheckpointError, prune_finished
from clipdistill.train.trainer import Trainer, train


def interrupt_after_steps(trainer: Trainer, steps: int) -> None:
    """Run ``trainer.fit()`` and kill it (KeyboardInterrupt, as Ctrl-C) once ``steps`` steps are done."""
    original_step = trainer.train_step

    def crash_after(*args: object, **kwargs: object) -> dict[str, float]:
        if trainer.global_step == steps:
            raise KeyboardInterrupt
        return original_step(*args, **kwargs)

    trainer.train_step = crash_after  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("teacher")
    LiTModel(LiTConfig(image_model="test_convnext", image_size=32)).save(folder)
    return f"run:{folder}"


def _config(tmp_path: Path, data: Path, **overrides: object) -> TrainConfig:
    raw: dict = {
        "name": "t",
        "out_dir": str(tmp_path / "runs"),
        "method": "clip",
        "data": {"path": str(data), "image_size": 32},
        "optim": {"epochs": 2, "batch_size": 3, "lr": 1e-3, "warmup_steps": 1},
        "log_every": 1,
    }
    for key, value in overrides.items():
        section, _, leaf = key.partition("__")
        if leaf:
            raw.setdefault(section, {})[leaf] = value
        else:
            raw[key] = value
    return from_dict(TrainConfig, raw)


def test_clip_run_writes_every_artifact(shapes_dataset_dir: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, shapes_dataset_dir)
    summary = train(config, progress=False)
    run = config.run_dir
    for name in (
        "config.yaml",
        "log.jsonl",
        "results.jsonl",
        "summary.json",
        "checkpoints/latest.pt",
        "model/open_clip_config.json",
        "model/open_clip_model.safetensors",
    ):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest.pt"]  # keep_checkpoints: latest
    steps = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]  # 6 train images / batch 3 = 2 steps x 2 epochs
    assert {"task_loss", "total_loss", "lr", "grad_norm", "seconds"} <= set(steps[0])
    results = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in results] == [1, 2] and "rsum" in results[0]["val"]
    assert summary["best_epoch"] in (1, 2) and summary["model"] == f"local-dir:{run / 'model'}"
    plain = open_clip.create_model(f"local-dir:{run / 'model'}")  # loads with plain open_clip
    assert sum(p.numel() for p in plain.parameters()) > 0


def test_the_trainer_records_each_epoch_s_terms(shapes_dataset_dir: Path, tmp_path: Path, tiny_teacher: str) -> None:
    config = _config(tmp_path, shapes_dataset_dir, method="openclip", teacher__spec=tiny_teacher)
    summary = train(config, progress=False)
    results = [json.loads(line) for line in (config.run_dir / "results.jsonl").read_text().splitlines()]
    assert [sorted(r["terms"]) for r in results] == [["distill_loss", "task_loss"]] * 2
    distill = summary["terms"]["distill_loss"]
    assert distill["measured"] == 2 and distill["grad_ratio"] > 0 and -1 <= distill["cos_task"] <= 1
    steps = [json.loads(line) for line in (config.run_dir / "log.jsonl").read_text().splitlines()]
    assert not [s for s in steps if "terms" in s]  # the step log keeps its flat floats


def test_importing_clipdistill_asks_mkl_for_alignment_independent_results() -> None:
    """Exact resume needs it on Intel CPUs: without it MKL's kernels depend on buffer alignment."""
    import os

    import clipdistill  # noqa: F401  (sets the variable at import)

    assert os.environ.get("MKL_CBWR", "").endswith("STRICT")


@pytest.mark.parametrize("student", [None, {"preset": "lite0", "image_size": 32, "frozen_stages": 5}])
def test_resume_after_interruption_is_bitwise_identical(
    shapes_dataset_dir: Path, tmp_path: Path, tiny_teacher: str, student: dict | None
) -> None:
    """Also with frozen student stages: each trainer keeps their rows in its own memo, so the
    resumed trainer computes its rows afresh."""
    extra = {"student": student} if student else {}
    straight = _config(tmp_path / "a", shapes_dataset_dir, method="openclip", teacher__spec=tiny_teacher, **extra)
    train(straight, progress=False)
    expected = torch.load(straight.run_dir / "checkpoints" / "latest.pt", weights_only=True)["student"]

    interrupted = _config(
        tmp_path / "b", shapes_dataset_dir, method="openclip", teacher__spec=tiny_teacher, save_every=1, **extra
    )
    interrupt_after_steps(Trainer(interrupted, progress=False), 3)
    with pytest.raises(ConfigError, match=r"already holds a run.*--resume latest"):
        Trainer(interrupted, progress=False).fit()
    Trainer(interrupted, progress=False).fit(resume="latest")
    resumed = torch.load(interrupted.run_dir / "checkpoints" / "latest.pt", weights_only=True)["student"]
    assert resumed.keys() == expected.keys()
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key
    steps = [json.loads(line)["step"] for line in (interrupted.run_dir / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # no duplicated lines after the resume


def test_resume_with_a_different_config_is_refused(shapes_dataset_dir: Path, tmp_path: Path) -> None:
    train(_config(tmp_path, shapes_dataset_dir, optim={"epochs": 1, "batch_size": 3}), progress=False)
    changed = _config(tmp_path, shapes_dataset_dir, optim={"epochs": 1, "batch_size": 3, "lr": 0.5})
    with pytest.raises(CheckpointError, match=r"config differs in key.*optim"):
        Trainer(changed, progress=False).fit(resume="latest")


def test_a_finished_run_keeping_no_checkpoint_is_not_trained_over(shapes_dataset_dir: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, shapes_dataset_dir, keep_checkpoints="none", optim={"epochs": 1, "batch_size": 3})
    train(config, progress=False)
    assert not list((config.run_dir / "checkpoints").iterdir())
    assert (config.run_dir / "model" / "open_clip_model.safetensors").is_file()
    for resume in (None, "latest"):
        with pytest.raises(ConfigError, match=r"kept no checkpoint.*choose another 'name'"):
            Trainer(config, progress=False).fit(resume=resume)
    assert (config.run_dir / "summary.json").is_file() and (config.run_dir / "results.jsonl").is_file()


@pytest.mark.parametrize(
    ("keep", "left"),
    [("all", ["best.pt", "latest.prev.pt", "latest.pt"]), ("latest", ["latest.pt"]), ("none", [])],
)
def test_prune_finished_keeps_what_was_asked(tmp_path: Path, keep: str, left: list[str]) -> None:
    for name in ("best.pt", "latest.prev.pt", "latest.pt"):
        (tmp_path / name).write_bytes(b"x")
    prune_finished(tmp_path, keep)
    assert sorted(p.name for p in tmp_path.iterdir()) == left
    with pytest.raises(ConfigError, match="keep_checkpoints"):
        _config(tmp_path, tmp_path, keep_checkpoints="best")


def test_a_checkpoint_with_another_optimiser_layout_is_refused(shapes_dataset_dir: Path, tmp_path: Path) -> None:
    trainer = Trainer(_config(tmp_path, shapes_dataset_dir), progress=False)
    state = trainer.state_dict()
    state["optimizer"]["param_groups"] = state["optimizer"]["param_groups"][:2]  # before scalars had a group
    with pytest.raises(CheckpointError, match="2 optimiser parameter groups"):
        trainer.load_state_dict(state)


def test_method_needs_are_checked_before_work(shapes_dataset_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"needs a teacher: set key 'teacher.spec'"):
        Trainer(_config(tmp_path, shapes_dataset_dir, method="openclip"), progress=False)
    with pytest.raises(MethodConfigError, match=r"unknown method 'clipp'.*did you mean 'clip'"):
        Trainer(_config(tmp_path, shapes_dataset_dir, method="clipp"), progress=False)
    with pytest.raises(MethodConfigError, match=r"method_args\.nope"):
        Trainer(_config(tmp_path, shapes_dataset_dir, method_args={"nope": 1}), progress=False)


@pytest.mark.e2e
def test_cli_train_and_python_module_entry(shapes_dataset_dir: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    import yaml
    from typer.testing import CliRunner

    from clipdistill.cli.main import app

    config_path = tmp_path / "c.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "data": {"path": str(shapes_dataset_dir), "image_size": 32},
                "out_dir": str(tmp_path / "runs"),
                "optim": {"epochs": 1, "batch_size": 3},
            }
        )
    )
    result = CliRunner().invoke(app, ["train", str(config_path), "--set", "name=cli", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "cli" / "model" / "open_clip_config.json").is_file()
    bad = CliRunner().invoke(app, ["train", str(config_path), "--set", "optim.lrr=1"])
    assert bad.exit_code == 2 and "unknown config key 'optim.lrr'" in bad.output
    module = subprocess.run(
        [sys.executable, "-m", "clipdistill.train", str(config_path), "--set", "name=mod", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert module.returncode == 0, module.stderr[-2000:]
    assert (tmp_path / "runs" / "mod" / "summary.json").is_file()


@pytest.mark.parametrize("method", ["openclip", "clipkd", "conaclip"])
def test_cached_and_online_teacher_give_the_same_losses(
    shapes_dataset_dir: Path, tmp_path: Path, tiny_teacher: str, method: str
) -> None:
    from clipdistill.data.loading import load_dataset
    from clipdistill.distill.cache import build_cache
    from clipdistill.train.trainer import epoch_plan

    cache = build_cache(
        tiny_teacher,
        load_dataset(shapes_dataset_dir),
        tmp_path / "cache",
        k_augmentations=3,
        image_size=32,
        progress=False,
    )
    common = {"method": method, "teacher__spec": tiny_teacher, "augment": {"k": 3}}
    online = Trainer(_config(tmp_path / "on", shapes_dataset_dir, **common), progress=False)
    cached = Trainer(_config(tmp_path / "off", shapes_dataset_dir, **common, teacher__cache=str(cache)), progress=False)
    cached.student.load_state_dict(online.student.state_dict())
    cached.method.load_state_dict(online.method.state_dict())
    plan = epoch_plan(online.caption_counts, 3, 0, 0)
    assert len(set(plan.aug_ids.tolist())) > 1  # the batch really replays several augmentations
    batch, tokens = online._batch(plan, 0)
    first = online.train_step(batch, tokens)
    second = cached.train_step(*cached._batch(plan, 0))
    loss_terms = [key for key in first if key.endswith("_loss")]
    assert loss_terms == [key for key in second if key.endswith("_loss")]
    for key in loss_terms:
        assert second[key] == pytest.approx(first[key], rel=1e-5, abs=1e-6), key
