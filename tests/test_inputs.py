"""Inputs and artifacts: Karpathy's own file names, webdataset bad samples, temp files
left by a kill anywhere, one process per run folder, and permissions that follow the umask."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from clipdistill.data.dataset import DatasetError
from clipdistill.data.loading import detect_format, load_dataset
from clipdistill.data.wds import WdsStream, read_wds
from clipdistill.io import atomic_write_json, atomic_write_text, orphaned_temp_files

# --- Karpathy's own files in a folder ------------------------------------------------------------


def _karpathy(folder: Path, file_name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for index, split in enumerate(["train", "val", "test"]):
        Image.new("RGB", (8, 8), (index * 80, 0, 0)).save(folder / f"{index}.jpg")
        sentences = [{"raw": f"c {index}"}]
        images.append({"filename": f"{index}.jpg", "imgid": index, "split": split, "sentences": sentences})
    (folder / file_name).write_text(json.dumps({"dataset": file_name, "images": images}), encoding="utf-8")


@pytest.mark.parametrize("file_name", ["dataset_coco.json", "dataset_flickr30k.json", "dataset_flickr8k.json"])
def test_a_folder_with_karpathys_own_file_is_read_as_karpathy(tmp_path: Path, file_name: str) -> None:
    _karpathy(tmp_path / "data", file_name)
    assert detect_format(tmp_path / "data") == "karpathy"  # not an image folder
    dataset = load_dataset(tmp_path / "data")
    assert dataset.split_counts() == {"train": 1, "val": 1, "test": 1}
    assert dataset.source == str(tmp_path / "data" / file_name)


def test_two_karpathy_files_in_one_folder_are_refused_naming_both(tmp_path: Path) -> None:
    _karpathy(tmp_path, "dataset_coco.json")
    _karpathy(tmp_path, "dataset_flickr30k.json")
    with pytest.raises(DatasetError, match=r"dataset_coco\.json, dataset_flickr30k\.json.*FOLDER/FILE\.json"):
        load_dataset(tmp_path)


# --- webdataset: --on-bad-sample and non-UTF-8 captions ---------------------------------------------


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


@pytest.fixture
def bad_shards(tmp_path: Path) -> Path:
    image = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(image, format="PNG")
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        _add(tar, "a.png", image.getvalue())
        _add(tar, "a.txt", b"a red square")
        _add(tar, "b.png", image.getvalue())
        _add(tar, "b.txt", b"caf\xe9 latin-1")  # not UTF-8
        _add(tar, "c.png", image.getvalue())  # no caption at all
        _add(tar, "d.png", b"not a png")  # caption fine, image broken
        _add(tar, "d.txt", b"a broken image")
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 4}), encoding="utf-8")
    return tmp_path


def test_wds_non_utf8_caption_is_an_error_naming_shard_and_member(bad_shards: Path) -> None:
    with pytest.raises(DatasetError, match=r"00000\.tar: member b\.txt is not valid UTF-8 \(byte 0xe9 at offset 3\)"):
        read_wds(bad_shards)
    with pytest.raises(DatasetError, match=r"00000\.tar: member b\.txt is not valid UTF-8"):
        load_dataset(bad_shards, on_bad_sample="error")
    with pytest.raises(DatasetError, match=r"member b\.txt is not valid UTF-8"):
        list(WdsStream(bad_shards, on_bad_sample="error"))


def test_wds_honours_on_bad_sample_skip(bad_shards: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = load_dataset(bad_shards, on_bad_sample="skip")
    assert dataset.texts() == ["a red square"]
    assert dataset.skipped is not None
    reasons = [sample.message() for sample in dataset.skipped.samples]
    assert any("member b.txt is not valid UTF-8" in r for r in reasons), reasons
    assert any("sample 'c' has an image but no .txt or .json member" in r for r in reasons), reasons
    assert any("d.png" in r and "cannot be decoded" in r for r in reasons), reasons  # the image check
    streamed = list(WdsStream(bad_shards, on_bad_sample="skip"))
    assert [s["captions"] for s in streamed] == [["a red square"]]
    err = capsys.readouterr().err
    assert "b.txt is not valid UTF-8" in err and "cannot decode image" in err  # skipped, never silently


# --- temp files left by a kill, wherever artifacts are written ----------------------------------------


def test_a_temp_file_left_by_a_killed_writer_is_removed_by_the_next_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real SIGKILL between the temp write and the rename (failpoint), in an index-like folder
    (no run folder involved): the next process writing there removes the orphan and says so."""
    target = tmp_path / "index" / "metadata.json"
    code = f"from clipdistill.io import atomic_write_json; atomic_write_json({str(target)!r}, {{'v': 1}})"
    env = {**os.environ, "CLIPDISTILL_FAILPOINT": "atomic:metadata.json@1"}
    killed = subprocess.run([sys.executable, "-c", code], env=env, check=False)
    assert killed.returncode == -9
    orphans = list(target.parent.glob(".metadata.json.*.tmp"))
    assert len(orphans) == 1 and not target.exists()
    assert orphaned_temp_files(target.parent) == orphans
    live = target.parent / f".other.json.{orphans[0].name.split('.')[3]}.{os.getppid()}-x.tmp"
    live.write_bytes(b"a live writer's temp file")  # same host, a running process: kept
    atomic_write_json(target.parent / "other.json", {"v": 2})
    assert not orphans[0].exists() and live.exists()
    assert f"removed {orphans[0]}, left by a write that was killed" in capsys.readouterr().err


# --- one process per run folder -------------------------------------------------------------------------


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


# --- permissions follow the umask --------------------------------------------------------------------------


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_artifacts_get_the_permissions_the_umask_allows(tmp_path: Path, umask: int, mode: int) -> None:
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == mode  # mkstemp alone gives 0600
