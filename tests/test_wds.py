"""webdataset shards: to-wds round trip, the same dataset interface, per-rank/per-worker splits,
``--on-bad-sample`` and non-UTF-8 captions."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from clipdistill.cli.main import app
from clipdistill.data.dataset import DatasetError
from clipdistill.data.images import load_image_tensor
from clipdistill.data.loading import load_dataset
from clipdistill.data.wds import WdsStream, rank_shards, read_wds


@pytest.fixture(scope="module")
def shards(shapes_dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wds")
    result = CliRunner().invoke(
        app, ["data", "to-wds", str(shapes_dataset_dir), "--out", str(out), "--shard-size", "2"]
    )
    assert result.exit_code == 0, result.output
    return out


def test_round_trip_keeps_ids_captions_splits_and_pixels(shapes_dataset_dir: Path, shards: Path) -> None:
    original = load_dataset(shapes_dataset_dir)
    converted = load_dataset(shards)  # format detected: a folder of .tar shards
    assert sorted(p.name for p in shards.glob("*.tar")) == [f"{i:05d}.tar" for i in range(6)]
    assert json.loads((shards / "sizes.json").read_text()) == {f"{i:05d}.tar": 2 for i in range(6)}
    assert [r.image_id for r in converted.images] == [r.image_id for r in original.images]
    assert converted.caption_ids() == original.caption_ids() and converted.texts() == original.texts()
    assert converted.split_counts() == original.split_counts()
    assert all(".tar/" in str(r.path) for r in converted.images)  # read from inside the tars
    assert torch.equal(load_image_tensor(converted.image_paths(), 16), load_image_tensor(original.image_paths(), 16))
    from clipdistill.serve.preprocess import ImagePreprocessor  # embed/index read member paths too

    preprocess = ImagePreprocessor((16, 16), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert (preprocess(converted.image_paths()[:3]) == preprocess(original.image_paths()[:3])).all()
    pattern = load_dataset(f"{shards}/{{00000..00005}}.tar")
    assert [r.image_id for r in pattern.images] == [r.image_id for r in original.images]


def test_plain_txt_shards_and_clear_errors(tmp_path: Path) -> None:
    def add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))

    image = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(image, format="PNG")
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        add(tar, "a.png", image.getvalue())
        add(tar, "a.txt", b"a red square")
    dataset = read_wds(tmp_path)  # img2dataset style: KEY.png + KEY.txt, no ids
    assert dataset.texts() == ["a red square"] and dataset.images[0].image_id == "00000/a"
    assert dataset.images[0].split == "train"
    with tarfile.open(tmp_path / "00001.tar", "w") as tar:
        add(tar, "b.png", image.getvalue())
    with pytest.raises(DatasetError, match=r"00001.tar: sample 'b' has an image but no .txt or .json"):
        read_wds(tmp_path)
    with pytest.raises(DatasetError, match=r"sizes\.json is missing"):
        WdsStream(tmp_path)


def test_every_sample_read_once_across_ranks_and_workers(shards: Path) -> None:
    paths = sorted(shards.glob("*.tar"))
    seen = [p for r in range(2) for w in range(2) for p in rank_shards(paths, r, 2, w, 2)]
    assert sorted(seen) == paths and len(seen) == len(set(seen))
    streams = [WdsStream(shards, rank=r, world=2) for r in range(2)]
    assert [len(s) for s in streams] == [6, 6]
    keys = []
    for stream in streams:
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
        samples = list(loader)
        assert len(samples) == len(stream)
        keys += [s["image_id"] for s in samples]
        assert all(s["image"].mode == "RGB" and s["captions"] for s in samples)
    expected = [r.image_id for r in read_wds(shards).images]
    assert sorted(keys) == sorted(expected)  # each sample exactly once


# --- --on-bad-sample and non-UTF-8 captions ---------------------------------------------------


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
