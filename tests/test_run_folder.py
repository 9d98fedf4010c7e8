"""One process per run folder: a second process is refused naming the holder's pid; the same
process may prepare it again, and once released the folder is free."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_two_processes_cannot_share_a_run_folder(shapes_dataset_dir: Path, tmp_path: Path) -> None:
    from clipdistill.config import TrainConfig, from_dict
    from clipdistill.train.state import LOCK_FILE, RunFolderBusy, prepare_run_folder, release_run_folder

    raw = {"name": "r", "out_dir": str(tmp_path / "runs"), "data": {"path": str(shapes_dataset_dir)}}
    config = from_dict(TrainConfig, raw)
    prepare_run_folder(config, None)
    try:
        assert (config.run_dir / LOCK_FILE).read_text().strip() == str(os.getpid())
        prepare_run_folder(config, None)  # the same process again: fine
        code = (
            "import sys; from clipdistill.config import from_dict; "
            "from clipdistill.config import TrainConfig; from clipdistill.train.state import prepare_run_folder; "
            f"prepare_run_folder(from_dict(TrainConfig, {raw!r}), None)"
        )
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
        assert other.returncode != 0
        assert f"run folder {config.run_dir} is in use by another process (pid {os.getpid()}" in other.stderr
        assert RunFolderBusy.__name__ in other.stderr
    finally:
        release_run_folder(config.run_dir)
    again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert again.returncode == 0, again.stderr  # released: the folder is free again
