"""A failure in the middle of each writer leaves the previous version of its file readable.

Every artifact writer goes through ``clipdistill.io.atomic_path``; a failpoint there (see
``clipdistill.faults``) fires after the new bytes went to the temp file and before the
rename. The injected failure here first cuts the temp file in half (a write torn by a full
disk or a crash) and then raises. For each writer: version 1 is written, writing version 2
fails that way, and the file must still read back as version 1 with no temp file left over;
writing version 2 again then succeeds. Multi-file artifacts (index, cache, embeddings) are
also crashed mid-build: the half-built folder is refused with a clear error, and a rerun
finishes it.

``clipdistill.io`` itself: a replace that fails keeps the previous version and no temp file, a
temp file left by a killed writer is removed by the next write into its folder, and artifacts
get the permissions the umask allows.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from clipdistill import faults
from clipdistill.faults import InjectedFault
from clipdistill.io import atomic_write_json, atomic_write_text, orphaned_temp_files


@pytest.fixture
def fail_writing(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """``fail_writing("latest.pt")``: the next write of that file is torn in half and raises."""

    def arm(file_name: str) -> None:
        def hook(name: str, path: Path | None) -> None:
            if name == f"atomic:{file_name}" and path is not None:
                data = path.read_bytes()
                path.write_bytes(data[: len(data) // 2])
                raise InjectedFault(f"injected: write of {file_name} torn at {len(data) // 2} of {len(data)} bytes")

        monkeypatch.setattr(faults, "hook", hook)

    return arm


def _checkpoint(path: Path, version: int) -> None:
    from clipdistill.train.checkpoint import save_checkpoint

    save_checkpoint(path, {"version": version, "weights": torch.full((256,), float(version))}, keep_previous=True)


def _read_checkpoint(path: Path) -> Any:
    from clipdistill.train.checkpoint import load_checkpoint

    return load_checkpoint(path)["version"]


def _json(path: Path, version: int) -> None:
    from clipdistill.io import atomic_write_json

    atomic_write_json(path, {"version": version, "padding": "x" * 500})


def _config(path: Path, version: int) -> None:
    from clipdistill.config import TrainConfig, save_config

    save_config(TrainConfig(name=f"v{version}"), path)


def _read_config(path: Path) -> Any:
    from clipdistill.config import read_yaml

    return int(read_yaml(path)["name"][1:])


def _cache_shard(path: Path, version: int) -> None:
    from clipdistill.distill.cache.format import write_shard

    write_shard(path, {"image": torch.full((16, 32), float(version))}, {"version": str(version)})


def _read_cache_shard(path: Path) -> Any:
    from safetensors.torch import load_file

    return int(load_file(path)["image"][0, 0])


def _npy(path: Path, version: int) -> None:
    from clipdistill.serve.embed import _save_npy

    _save_npy(path, np.full((64, 16), version, dtype=np.float32))


def _parquet(path: Path, version: int) -> None:
    from clipdistill.serve.embed import _save_parquet

    _save_parquet(path, [{"image_id": f"img{i}", "version": version} for i in range(50)])


def _read_parquet(path: Path) -> Any:
    import pandas as pd

    return int(pd.read_parquet(path)["version"].iloc[0])


def _plot(path: Path, version: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clipdistill.report import _save

    figure, axis = plt.subplots(figsize=(2, 2))
    axis.plot([0, 1], [0, version])
    axis.set_title(f"v{version}")
    _save(figure, path)


def _read_plot(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as image:
        image.load()  # a torn PNG fails here
    return path.stat().st_size


_STUDENT: list[Any] = []


def _student(path: Path, version: int) -> None:
    from clipdistill.models.students import build_student, save_student

    if not _STUDENT:
        torch.manual_seed(0)
        _STUDENT.append(build_student("tiny"))  # built once: only the weights change per version
    student = _STUDENT[0]
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.fill_(float(version))
    save_student(student, path.parent)


def _read_student(path: Path) -> Any:
    from safetensors.torch import load_file

    return sum(float(tensor.float().abs().sum()) for tensor in load_file(path).values())


def _karpathy(path: Path, version: int) -> None:
    from clipdistill.data import Caption, ImageRecord, make_dataset
    from clipdistill.data.karpathy import write_karpathy

    records = [
        ImageRecord(f"i{k}", path.parent / f"{k}.png", "train", (Caption(f"c{k}", f"v{version}"),)) for k in range(40)
    ]
    write_karpathy(make_dataset("d", records), path)


def _read_karpathy(path: Path) -> Any:
    from clipdistill.data.karpathy import read_karpathy

    return read_karpathy(path).texts()[0]


def _log_truncation(path: Path, version: int) -> None:
    from clipdistill.io import append_jsonl
    from clipdistill.train.trainer import _truncate_log

    path.unlink(missing_ok=True)
    for step in range(1, 30):
        append_jsonl(path, {"step": step, "version": version})
    path.write_text("".join(json.dumps({"step": s, "version": version}) + "\n" for s in range(1, 30)))
    _truncate_log(path, "step", 10 + version)


def _read_log(path: Path) -> Any:
    from clipdistill.io import read_jsonl

    return len(read_jsonl(path))


WRITERS: dict[str, tuple[str, Callable[[Path, int], None], Callable[[Path], Any]]] = {
    "checkpoint": ("latest.pt", _checkpoint, _read_checkpoint),
    "json (summary, manifests, metrics)": ("summary.json", _json, lambda p: json.loads(p.read_text())["version"]),
    "run config": ("config.yaml", _config, _read_config),
    "cache shard": ("image_0000.safetensors", _cache_shard, _read_cache_shard),
    "embeddings": ("img_emb_0000.npy", _npy, lambda p: int(np.load(p)[0, 0])),
    "embedding metadata": ("metadata_0000.parquet", _parquet, _read_parquet),
    "report plot": ("pareto.png", _plot, _read_plot),
    "student weights": ("open_clip_model.safetensors", _student, _read_student),
    "dataset json": ("dataset.json", _karpathy, _read_karpathy),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_failure_mid_write_leaves_the_previous_version(
    tmp_path: Path, fail_writing: Callable[[str], None], writer: str
) -> None:
    file_name, write, read = WRITERS[writer]
    path = tmp_path / "artifact" / file_name
    write(path, 1)
    before = read(path)
    fail_writing(file_name)
    with pytest.raises(InjectedFault):
        write(path, 2)
    assert read(path) == before  # the previous version, whole
    assert not list(path.parent.glob(".*.tmp")), "the torn temp file was left behind"
    faults.hook = faults._from_environment  # disarm (monkeypatch restores it too)
    write(path, 2)
    assert read(path) != before


def test_log_truncation_after_a_resume_is_atomic(tmp_path: Path, fail_writing: Callable[[str], None]) -> None:
    path = tmp_path / "log.jsonl"
    _log_truncation(path, 1)
    assert _read_log(path) == 11
    fail_writing("log.jsonl")
    with pytest.raises(InjectedFault):
        _log_truncation(path, 2)
    assert _read_log(path) == 29  # the untruncated log, every line readable


def test_a_torn_last_log_line_is_skipped(tmp_path: Path) -> None:
    from clipdistill.io import read_jsonl

    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"ste')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"log\.jsonl: line 2 is not valid JSON"):
        read_jsonl(path)


# --- the temp file: a failed replace, a killed writer's leftover, permissions from the umask ----


def test_atomic_write_keeps_previous_version_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "manifest.json"
    atomic_write_json(target, {"version": 1})

    def crash(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "half-written")
    assert target.read_text() == '{\n  "version": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temp file left behind


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


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_artifacts_get_the_permissions_the_umask_allows(tmp_path: Path, umask: int, mode: int) -> None:
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == mode  # mkstemp alone gives 0600


# --- multi-file artifacts: crash mid-build, refuse the half-built folder, finish on a rerun ------


def test_index_build_crashing_mid_write_is_refused_then_rebuilt(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    shapes_dataset_dir: Path,
    fail_writing: Callable[[str], None],
) -> None:
    from clipdistill.serve.embed import embed_dataset
    from clipdistill.serve.index import IndexBuildError, build_index
    from clipdistill.serve.search import Searcher
    from test_export import ensure_export

    export = ensure_export(tmp_path_factory.getbasetemp() / "deploy", shapes_dataset_dir)  # shared with test_index
    emb = tmp_path / "emb"
    embed_dataset(export, shapes_dataset_dir, emb, split="all", shard_size=5, batch_size=4, progress=False)
    out = tmp_path / "index"
    build_index(emb, out, factory="Flat")
    first = [hit["id"] for hit in Searcher.open(out).search(text="a red circle", k=3)]
    fail_writing("metadata.parquet")
    with pytest.raises(InjectedFault):
        build_index(emb, out, factory="Flat")
    with pytest.raises(IndexBuildError, match=r"is not a finished index: manifest\.json is missing"):
        Searcher.open(out)  # never a half-old, half-new index
    faults.hook = faults._from_environment
    build_index(emb, out, factory="Flat")
    assert [hit["id"] for hit in Searcher.open(out).search(text="a red circle", k=3)] == first
