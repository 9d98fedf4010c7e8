"""Run-folder and checkpoint rules around a resume (fast, in-process; the real SIGKILL tests
are in test_crash_resume.py): a damaged ``latest`` falls back to the one before it, a run
killed before its first save starts again, a folder holding another run is refused, temp
files a kill left behind are removed, and RNG states round-trip exactly."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from clipdistill.config import ConfigError, TrainConfig, from_dict
from clipdistill.train.checkpoint import (
    LATEST,
    PREVIOUS,
    CheckpointError,
    find_resume_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from clipdistill.train.state import prepare_run_folder


def _config(tmp_path: Path, data: Path, **extra: object) -> TrainConfig:
    raw = {
        "name": "r",
        "out_dir": str(tmp_path / "runs"),
        "data": {"path": str(data), "image_size": 32},
        "optim": {"epochs": 1, "batch_size": 3, "lr": 1e-3},
    }
    return from_dict(TrainConfig, {**raw, **extra})


def test_latest_keeps_the_previous_checkpoint_and_a_damaged_latest_falls_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "checkpoints"
    save_checkpoint(folder / LATEST, {"step": 1}, keep_previous=True)
    assert not (folder / PREVIOUS).exists()
    save_checkpoint(folder / LATEST, {"step": 2}, keep_previous=True)
    assert torch.load(folder / PREVIOUS, weights_only=True) == {"step": 1}
    path, state = find_resume_checkpoint(folder, "latest")  # type: ignore[misc]
    assert (path.name, state) == (LATEST, {"step": 2})
    data = (folder / LATEST).read_bytes()
    (folder / LATEST).write_bytes(data[: len(data) // 2])  # a copy cut short, a bad sector
    path, state = find_resume_checkpoint(folder, "latest")  # type: ignore[misc]
    assert (path.name, state) == (PREVIOUS, {"step": 1})
    assert f"cannot load checkpoint {folder / LATEST}" in capsys.readouterr().err
    (folder / PREVIOUS).unlink()
    with pytest.raises(CheckpointError, match=r"cannot load checkpoint .*latest\.pt"):
        find_resume_checkpoint(folder, "latest")
    with pytest.raises(CheckpointError, match=r"checkpoint .*nope\.pt does not exist"):
        find_resume_checkpoint(folder, str(tmp_path / "nope.pt"))


def test_resume_latest_before_any_checkpoint_starts_from_step_zero(shapes_dataset_dir: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, shapes_dataset_dir)
    assert find_resume_checkpoint(config.run_dir / "checkpoints", "latest") is None
    config.run_dir.mkdir(parents=True)
    (config.run_dir / "log.jsonl").write_text('{"step": 1}\n')  # from a run killed before its first save
    assert prepare_run_folder(config, "latest") is None
    assert not (config.run_dir / "log.jsonl").exists() and (config.run_dir / "config.yaml").is_file()
    assert prepare_run_folder(config, None) is None  # same config, still no checkpoint: a plain restart


def test_a_folder_that_holds_another_run_is_refused(shapes_dataset_dir: Path, tmp_path: Path) -> None:
    prepare_run_folder(_config(tmp_path, shapes_dataset_dir), None)
    other = _config(tmp_path, shapes_dataset_dir, method="clipkd", seed=3)
    with pytest.raises(
        ConfigError,
        match=r"holds a different run .*config\.yaml differs in method \('clip' there, 'clipkd' now\), seed",
    ):
        prepare_run_folder(other, None)


def test_resume_names_each_differing_key_with_both_values(shapes_dataset_dir: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, shapes_dataset_dir)
    prepare_run_folder(config, None)
    save_checkpoint(config.run_dir / "checkpoints" / LATEST, {"config": {**_as_dict(config), "seed": 0}})
    changed = _config(tmp_path, shapes_dataset_dir, optim={"epochs": 1, "batch_size": 3, "lr": 0.5})
    with pytest.raises(CheckpointError, match=r"differs in key\(s\) optim\.lr \(0\.001 there, 0\.5 now\)"):
        prepare_run_folder(changed, "latest")
    with pytest.raises(ConfigError, match=r"already holds a run .*--resume latest"):
        prepare_run_folder(config, None)


def _as_dict(config: TrainConfig) -> dict:
    from clipdistill.config import to_dict

    return to_dict(config)


def test_temp_files_left_by_a_kill_are_removed(
    shapes_dataset_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, shapes_dataset_dir)
    orphan = config.run_dir / "checkpoints" / ".latest.pt.abc123.tmp"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"half a checkpoint")
    prepare_run_folder(config, "latest")
    assert not orphan.exists() and "left by a write that was killed" in capsys.readouterr().err


def test_rng_states_round_trip_exactly_through_a_checkpoint(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    save_checkpoint(tmp_path / "rng.pt", {"rng": rng_state()})
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected


def test_sigterm_finishes_the_step_saves_latest_and_restores_handlers(shapes_dataset_dir: Path, tmp_path: Path) -> None:
    import os
    import signal

    from clipdistill.train.state import TrainingStopped
    from clipdistill.train.trainer import Trainer

    before = signal.getsignal(signal.SIGTERM)
    trainer = Trainer(_config(tmp_path, shapes_dataset_dir, optim={"epochs": 2, "batch_size": 2}), progress=False)
    original_step = trainer.train_step

    def step_then_preempted(*args: object, **kwargs: object) -> dict[str, float]:
        record = original_step(*args, **kwargs)
        if trainer.global_step == 2:  # the 3rd step is in flight when the notice arrives
            os.kill(os.getpid(), signal.SIGTERM)
        return record

    trainer.train_step = step_then_preempted  # type: ignore[method-assign]
    with pytest.raises(
        TrainingStopped, match=r"stopped by SIGTERM after step 3; checkpoint saved to .*--resume latest"
    ):
        trainer.fit()
    saved = torch.load(trainer.run_dir / "checkpoints" / LATEST, weights_only=True)
    assert saved["position"] == {"epoch": 0, "step_in_epoch": 3, "global_step": 3}  # before the epoch-end eval
    assert signal.getsignal(signal.SIGTERM) is before
