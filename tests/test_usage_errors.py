"""Bad configuration and usage: each is one clear error naming the key or file (and the fix),
raised before data is decoded or anything is written; untrusted files never run code.

Cases already covered elsewhere and not repeated here: unknown/mistyped config keys and wrong
types (test_config), unknown method and method args, unmet teacher needs (test_trainer), an
unknown model schema or zoo name (test_models), a cache built for another teacher, dataset or
augmentation (test_cache), an index or embeddings made with other encoders (test_index,
test_search), a folder holding another run and a resume with another config (test_resume).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from clipdistill.cli.main import app
from clipdistill.config import ConfigError, TrainConfig, from_dict
from clipdistill.device import DeviceError, resolve_device
from clipdistill.train.checkpoint import CheckpointError, find_resume_checkpoint, load_checkpoint
from clipdistill.train.trainer import Trainer


def _config(tmp_path: Path, **extra: object) -> TrainConfig:
    raw = {
        "name": "u",
        "out_dir": str(tmp_path / "runs"),
        "data": {"path": str(tmp_path / "no-such-data"), "image_size": 32},
        "optim": {"epochs": 1, "batch_size": 3},
    }
    return from_dict(TrainConfig, {**raw, **extra})


def test_an_absent_device_is_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match=r"'cuda' requested but CUDA is not available .*use --device cpu"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match=r"'cuda:0' requested but CUDA is not available"):
        Trainer(_config(tmp_path, device="cuda:0"), progress=False)  # before the (missing) data is read
    assert not (tmp_path / "runs").exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match=r"'cuda:3' requested but only 1 CUDA device\(s\) exist"):
        resolve_device("cuda:3")
    with pytest.raises(DeviceError, match=r"unknown device 'gpu'; use cpu, cuda or cuda:N"):
        resolve_device("gpu")
    with pytest.raises(DeviceError, match=r"device type 'meta' is not supported"):
        resolve_device("meta")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"teacher": {"spec": "opneclip:RN50"}}, r"key 'teacher\.spec': unknown model schema 'opneclip'"),
        ({"teacher": {"spec": "run:/no/such/teacher"}}, r"key 'teacher\.spec': .*does not exist"),
        ({"student": {"preset": "tinny"}}, r"key 'student\.preset': unknown student preset 'tinny'.*'tiny'"),
    ],
)
def test_unknown_teacher_or_student_names_the_key_before_reading_data(
    tmp_path: Path, extra: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        Trainer(_config(tmp_path, **extra), progress=False)  # the data path does not even exist


def test_bad_on_bad_sample_value_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"key 'data\.on_bad_sample' has value 'ignore'; valid: error, skip"):
        _config(tmp_path, data={"path": "x", "on_bad_sample": "ignore"})


def test_cli_errors_print_brackets_in_paths_and_fields_verbatim(tmp_path: Path) -> None:
    """rich markup must not eat ``[train]`` or ``[bold]`` out of a user's path or a field name."""
    missing = tmp_path / "[train]" / "[bold]data.json"
    result = CliRunner().invoke(
        app, ["eval", "--model", "run:x", "--data", str(missing), "--out", str(tmp_path / "m.json")]
    )
    assert result.exit_code == 2
    assert f"dataset path {missing} does not exist" in " ".join(result.output.split())


def test_cli_unknown_policy_is_a_usage_error() -> None:
    result = CliRunner().invoke(app, ["--on-bad-sample", "ignore", "eval", "--help"])
    assert result.exit_code == 2 and "'ignore'; valid: error, skip" in result.output


# --- untrusted files ----------------------------------------------------------------------------


class _Payload:
    """A pickle that runs code when unpickled: what a malicious 'checkpoint' looks like."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "latest.pt"
    torch.save({"student": _Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match=r"cannot load checkpoint .*latest\.pt"):
        load_checkpoint(evil)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"cannot load checkpoint"):
        find_resume_checkpoint(tmp_path, "latest")  # what `--resume latest` does with it
    assert not marker.exists()


def test_no_loader_in_clipdistill_can_unpickle_a_file() -> None:
    """Every file clipdistill reads comes from a user; none may be read with pickle. Checks the
    source for the loaders that can run code unless told not to."""
    import re

    source = Path(__file__).resolve().parents[1] / "src" / "clipdistill"
    risky = {
        r"torch\.load\((?![^)]*weights_only=True)": "torch.load without weights_only=True",
        r"\bpickle\.loads?\(|\bdill\.|\bjoblib\.load": "pickle",
        r"allow_pickle\s*=\s*True": "numpy allow_pickle=True",
        r"yaml\.(?:unsafe_)?load\((?![^)]*SafeLoader)": "yaml.load (not safe_load)",
        r"weights_only\s*=\s*False": "weights_only=False",
    }
    found = []
    for path in sorted(source.rglob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            for pattern, what in risky.items():
                if re.search(pattern, line):
                    found.append(f"{path.relative_to(source)}:{number}: {what}")
    assert not found, found
    assert "weights_only=True" in (source / "train" / "checkpoint.py").read_text()


def _user_facing_errors() -> list[tuple[type[Exception], type[Exception]]]:
    """Every error of ours that is the user's to fix, with the built-in base it always had."""
    from clipdistill.demo import DemoError
    from clipdistill.distill.base import MethodConfigError
    from clipdistill.models.spec import ModelSpecError
    from clipdistill.models.students import StudentConfigError
    from clipdistill.models.text_minilm import TextModelMissingError
    from clipdistill.train.distributed import DistributedError

    return [
        (ConfigError, ValueError),
        (MethodConfigError, ValueError),
        (DemoError, ValueError),
        (ModelSpecError, ValueError),
        (StudentConfigError, ValueError),
        (CheckpointError, ValueError),
        (DistributedError, ValueError),
        (DeviceError, RuntimeError),
        (TextModelMissingError, RuntimeError),
    ]


def test_user_errors_share_one_base_and_keep_their_own() -> None:
    """One base for the CLI to catch; each error is still the ValueError or RuntimeError that
    code catching those saw before the base existed (and no RuntimeError became a ValueError)."""
    from clipdistill.errors import UserError

    for error, builtin in _user_facing_errors():
        assert issubclass(error, UserError) and issubclass(error, builtin), error
        assert builtin is ValueError or not issubclass(error, ValueError), error


def test_the_cli_reports_any_user_error_in_one_line() -> None:
    """A new user error needs no entry in the CLI: subclassing UserError is enough."""
    import typer

    from clipdistill.cli.common import reports_user_errors
    from clipdistill.errors import UserError

    class NewError(UserError, ValueError):
        pass

    @reports_user_errors
    def command() -> None:
        raise NewError("key 'x.y' is wrong")

    with pytest.raises(typer.Exit) as stopped:
        command()
    assert stopped.value.exit_code == 2

    @reports_user_errors
    def buggy() -> None:
        raise KeyError("a bug keeps its traceback")

    with pytest.raises(KeyError):
        buggy()
