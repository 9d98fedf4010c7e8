"""Kill a real training process with SIGKILL, resume it with ``--resume latest``, compare bitwise.

Each case runs ``python -m clipdistill.train`` in a subprocess and kills it at a different
place: right after a step's log line (between checkpoints), while ``latest.pt`` is being
written (bytes on disk, rename not done), while ``best.pt`` is written at an epoch's end,
before the first checkpoint exists, from outside at whatever moment the process is in, and
twice in a row (the resumed process is killed too). Every resumed run must end with the same
bytes as the run that was never interrupted: weights, optimiser and scheduler state, the
saved student file, and the per-step losses. A dozen process starts: ``-m e2e``, its own CI stage.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.e2e

EPOCHS, BATCH = 3, 3  # 6 train images: 2 steps per epoch, 6 steps


@pytest.fixture(scope="module")
def config_path(shapes_dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("crash")
    path = root / "config.yaml"
    config = {
        "out_dir": str(root / "runs"),
        "method": "clip",
        "save_every": 2,
        "log_every": 1,
        "data": {"path": str(shapes_dataset_dir), "image_size": 32},
        "optim": {"epochs": EPOCHS, "batch_size": BATCH, "lr": 1e-3, "warmup_steps": 2},
        "augment": {"k": 2},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _command(config_path: Path, name: str, resume: bool) -> list[str]:
    command = [sys.executable, "-m", "clipdistill.train", str(config_path), "--set", f"name={name}", "--no-progress"]
    return command + (["--resume", "latest"] if resume else [])


def _env(failpoint: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPDISTILL_FAILPOINT")}
    env["OMP_NUM_THREADS"] = "1"  # the same thread count in every process: CPU kernels stay bitwise stable
    if failpoint:
        env["CLIPDISTILL_FAILPOINT"] = failpoint
    return env


def _run(config_path: Path, name: str, *, resume: bool = False, failpoint: str | None = None) -> None:
    done = subprocess.run(
        _command(config_path, name, resume), env=_env(failpoint), capture_output=True, text=True, timeout=300
    )
    if failpoint:
        assert done.returncode == -signal.SIGKILL, f"{failpoint} did not kill the run:\n{done.stderr[-3000:]}"
    else:
        assert done.returncode == 0, done.stderr[-3000:]


def _run_dir(config_path: Path, name: str) -> Path:
    return config_path.parent / "runs" / name


def _losses(run_dir: Path) -> list[dict[str, float]]:
    lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "seconds"} for line in lines]


def _assert_same_run(run_dir: Path, reference: Path) -> None:
    got = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    want = torch.load(reference / "checkpoints" / "latest.pt", weights_only=True)
    for part in ("student", "method"):
        assert got[part].keys() == want[part].keys()
        for key in want[part]:
            assert torch.equal(got[part][key], want[part][key]), f"{part}.{key} differs after the resume"
    optimizer_got, optimizer_want = got["optimizer"]["state"], want["optimizer"]["state"]
    for group_got, group_want in zip(optimizer_got.values(), optimizer_want.values(), strict=True):
        for key in group_want:
            assert torch.equal(group_got[key], group_want[key]), f"optimizer state {key} differs"
    assert got["scheduler"] == want["scheduler"] and got["position"] == want["position"]
    model = "model/open_clip_model.safetensors"
    assert (run_dir / model).read_bytes() == (reference / model).read_bytes()
    assert _losses(run_dir) == _losses(reference)  # every step's losses, none missing, none twice
    assert not list((run_dir / "checkpoints").glob(".*.tmp")), "a temp file a kill left was not cleaned up"


@pytest.fixture(scope="module")
def reference(config_path: Path) -> Path:
    _run(config_path, "straight")
    run_dir = _run_dir(config_path, "straight")
    assert len(_losses(run_dir)) == EPOCHS * 2
    return run_dir


@pytest.mark.parametrize(
    "failpoint",
    [
        "append:log.jsonl@3",  # after step 3: latest holds step 2, step 3 is redone
        "atomic:latest.pt@2",  # mid-write of the 2nd latest (step 2's is on disk, this one is not renamed)
        "atomic:best.pt@1",  # end of epoch 1: results line written, best and latest not yet saved
        "append:log.jsonl@1",  # before any checkpoint: --resume latest starts again from step 0
    ],
)
def test_sigkill_then_resume_is_bitwise_identical(config_path: Path, reference: Path, failpoint: str) -> None:
    name = "k-" + failpoint.replace(":", "-").replace("@", "-")
    _run(config_path, name, failpoint=failpoint)
    run_dir = _run_dir(config_path, name)
    if failpoint.startswith("atomic:"):
        assert list((run_dir / "checkpoints").glob(".*.tmp")), "the kill should leave the unrenamed temp file"
    _run(config_path, name, resume=True)
    _assert_same_run(run_dir, reference)


def test_killed_twice_then_resumed(config_path: Path, reference: Path) -> None:
    _run(config_path, "twice", failpoint="append:log.jsonl@4")
    _run(config_path, "twice", resume=True, failpoint="atomic:latest.pt@1")  # the resumed run dies too
    _run(config_path, "twice", resume=True)
    _assert_same_run(_run_dir(config_path, "twice"), reference)


def test_external_sigkill_at_an_arbitrary_moment(config_path: Path, reference: Path) -> None:
    """No failpoint: the test kills the process from outside once it has logged a few steps."""
    run_dir = _run_dir(config_path, "external")
    process = subprocess.Popen(
        _command(config_path, "external", resume=False),
        env=_env(None),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    log = run_dir / "log.jsonl"
    while process.poll() is None and time.monotonic() < deadline:
        if log.is_file() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"
    _run(config_path, "external", resume=True)
    _assert_same_run(run_dir, reference)


def test_sigterm_stops_after_the_step_saves_and_resumes_exactly(config_path: Path, reference: Path) -> None:
    """A preemption notice (SIGTERM) loses nothing: the step in flight finishes, latest is saved."""
    run_dir = _run_dir(config_path, "sigterm")
    process = subprocess.Popen(
        _command(config_path, "sigterm", resume=False), env=_env(None), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    log = run_dir / "log.jsonl"
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline:
        if log.is_file() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, output.decode()[-2000:]
    assert b"stopped by SIGTERM after step" in output and b"--resume latest" in output
    saved = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)["position"]["global_step"]
    assert saved == len(log.read_text().splitlines())  # the checkpoint holds every step that was logged
    _run(config_path, "sigterm", resume=True)
    _assert_same_run(run_dir, reference)
