"""Names the serve side reads from one file and opens as another stay inside their folder:
``resolve_inside`` itself, ``export.json`` / ``tokenizer_config.json`` names when an index
copies its encoders, the tokenizer file, embedding shard names, and thumbnails (checked at
open, read without following links); the index's recorded checksums and counts at open.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from clipdistill.paths import UnsafePathError, check_relative, resolve_inside
from clipdistill.serve.app import create_app
from clipdistill.serve.index import IndexBuildError
from test_export import ensure_export
from test_service import assert_error, ensure_service_index, rerecord_metadata


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory, shapes_dataset_dir: Path) -> Path:
    return ensure_service_index(tmp_path_factory.getbasetemp(), shapes_dataset_dir)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory, shapes_dataset_dir: Path) -> Path:
    return ensure_export(tmp_path_factory.getbasetemp() / "deploy", shapes_dataset_dir)


def copy_index(index_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "index"
    shutil.copytree(index_dir, copy, symlinks=True)
    return copy


# ----------------------------------------------------------------------------- resolve_inside


def test_resolve_inside_refuses_absolute_dotdot_and_links_out(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.txt").write_text("a")
    (tmp_path / "secret.txt").write_text("s")
    assert resolve_inside(folder, "sub/a.txt", what="x") == (folder / "sub" / "a.txt").resolve()
    for name, needle in [
        ("/etc/passwd", "absolute"),
        (str(tmp_path / "secret.txt"), "absolute"),
        ("C:\\windows\\win.ini", "absolute"),
        ("\\\\server\\share", "absolute"),
        ("../secret.txt", "'..'"),
        ("sub/../../secret.txt", "'..'"),
        ("sub\\..\\..\\secret.txt", "'..'"),
        ("", "not a file name"),
        (None, "not a file name"),
        ("a\x00b", "NUL"),
    ]:
        with pytest.raises(UnsafePathError, match=needle) as caught:
            resolve_inside(folder, name, what="conf.json: file")
        assert str(caught.value).startswith("conf.json: file: ")
    (folder / "out").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(UnsafePathError, match="symbolic link"):
        resolve_inside(folder, "out", what="conf.json: file")
    (folder / "dir-out").symlink_to(tmp_path)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        resolve_inside(folder, "dir-out/secret.txt", what="conf.json: file")
    (folder / "inside").symlink_to(folder / "sub" / "a.txt")  # a link that stays inside is fine
    assert resolve_inside(folder, "inside", what="x") == (folder / "sub" / "a.txt").resolve()
    with pytest.raises(IndexBuildError, match="absolute"):  # the caller's own error type
        check_relative("/x", "what", IndexBuildError)


# ----------------------------------------------------------------------------- export / tokenizer / shards


def _edit_json(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("where", "name", "needle"),
    [
        ("files", "/etc/passwd", "absolute"),
        ("files", "../../outside.onnx", "'..'"),
        ("tokenizer", "/etc/passwd", "absolute"),
        ("tokenizer", "../outside.txt.gz", "'..'"),
    ],
)
def test_copy_encoders_refuses_names_leaving_the_export(
    tmp_path: Path, export_dir: Path, where: str, name: str, needle: str
) -> None:
    from clipdistill.serve.index import _copy_encoders

    export = tmp_path / "export"
    shutil.copytree(export_dir, export)
    if where == "files":
        _edit_json(export / "export.json", lambda d: d["files"].__setitem__(name, {"sha256": "0" * 64}))
        field = "export.json: files key"
    else:
        _edit_json(export / "tokenizer_config.json", lambda d: d.__setitem__("file", name))
        field = "tokenizer_config.json: file"
    with pytest.raises(IndexBuildError, match=needle) as caught:
        _copy_encoders(export, tmp_path / "target")
    assert field in str(caught.value) and str(export) in str(caught.value)


def test_copy_encoders_refuses_a_symlinked_file(tmp_path: Path, export_dir: Path) -> None:
    from clipdistill.serve.index import _copy_encoders

    export = tmp_path / "export"
    shutil.copytree(export_dir, export)
    (tmp_path / "elsewhere.onnx").write_bytes(b"not yours")
    (export / "image_encoder.onnx").unlink()
    (export / "image_encoder.onnx").symlink_to(tmp_path / "elsewhere.onnx")
    with pytest.raises(IndexBuildError, match="symbolic link"):
        _copy_encoders(export, tmp_path / "target")
    assert not (tmp_path / "target" / "image_encoder.onnx").exists()


def test_tokenizer_file_stays_inside_the_export(tmp_path: Path, export_dir: Path) -> None:
    from clipdistill.serve.encoders import ExportError, OnnxEncoders
    from clipdistill.serve.tokenize import load_tokenizer

    export = tmp_path / "export"
    shutil.copytree(export_dir, export)
    config = json.loads((export / "tokenizer_config.json").read_text())
    for name, needle in [("/etc/passwd", "absolute"), ("../../x.gz", "'..'")]:
        _edit_json(export / "tokenizer_config.json", lambda d, n=name: d.__setitem__("file", n))
        with pytest.raises(UnsafePathError, match=needle) as caught:
            load_tokenizer(export)
        assert "tokenizer_config.json: file" in str(caught.value)
        with pytest.raises(ExportError, match=r"tokenizer_config\.json: file"):  # what the CLI reports
            OnnxEncoders(export)
    _edit_json(export / "tokenizer_config.json", lambda d: d.__setitem__("file", config["file"]))
    real = export / config["file"]
    shutil.move(real, tmp_path / "moved")
    real.symlink_to(tmp_path / "moved")
    with pytest.raises(UnsafePathError, match="symbolic link"):
        load_tokenizer(export)


def test_embedding_shard_names_stay_inside_the_folder(tmp_path: Path) -> None:
    from clipdistill.serve.index_chunks import image_shards

    emb = tmp_path / "emb"
    (emb / "img_emb").mkdir(parents=True)
    np.save(tmp_path / "outside.npy", np.ones((2, 4), dtype=np.float32))
    manifest = {"shards": [{"img_emb/../../outside.npy": None}]}
    with pytest.raises(IndexBuildError, match=r"embeddings.json: shard 0: .*'\.\.'"):
        image_shards(emb, manifest)
    (emb / "img_emb" / "img_emb_0000.npy").symlink_to(tmp_path / "outside.npy")
    with pytest.raises(IndexBuildError, match="symbolic link"):
        image_shards(emb, {"shards": [{"img_emb/img_emb_0000.npy": None}]})
    np.save(emb / "img_emb" / "img_emb_0001.npy", np.ones((2, 4), dtype=np.float32))
    assert image_shards(emb, {"shards": [{"img_emb/img_emb_0001.npy": "ab"}]}) == [
        ((emb / "img_emb" / "img_emb_0001.npy").resolve(), "ab")
    ]


# ----------------------------------------------------------------------------- the index at open


def test_recorded_checksums_are_verified_at_open(tmp_path: Path, index_dir: Path) -> None:
    copy = copy_index(index_dir, tmp_path)
    metadata = pd.read_parquet(copy / "metadata.parquet")
    metadata.loc[0, "caption"] = "edited"
    metadata.to_parquet(copy / "metadata.parquet", index=False)
    with pytest.raises(IndexBuildError, match=r"metadata.parquet: sha256 differs from metadata_sha256"):
        create_app({"t": copy}, warmup=False)
    shutil.copyfile(index_dir / "metadata.parquet", copy / "metadata.parquet")
    with open(copy / "index.faiss", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(IndexBuildError, match=r"index.faiss: sha256 differs from index_sha256"):
        create_app({"t": copy}, warmup=False)


def test_metadata_rows_must_match_the_vectors(tmp_path: Path, index_dir: Path) -> None:
    copy = copy_index(index_dir, tmp_path)
    pd.read_parquet(copy / "metadata.parquet").iloc[:10].to_parquet(copy / "metadata.parquet", index=False)
    rerecord_metadata(copy)  # a consistent checksum: the row count is what is wrong
    with pytest.raises(IndexBuildError, match=r"12 vectors, metadata.parquet 10 rows .* count 12"):
        create_app({"t": copy}, warmup=False)


@pytest.mark.parametrize(
    ("thumbnail", "needle"),
    [
        ("/etc/passwd", "absolute"),
        ("thumbs/../manifest.json", "'..'"),
        ("../index/thumbs/0000000.jpg", "'..'"),
        ("encoders/export.json", "not under thumbs/"),
    ],
)
def test_thumbnail_entries_outside_the_store_stop_the_index(
    tmp_path: Path, index_dir: Path, thumbnail: str, needle: str
) -> None:
    copy = copy_index(index_dir, tmp_path)
    metadata = pd.read_parquet(copy / "metadata.parquet")
    metadata.loc[3, "thumbnail"] = thumbnail
    metadata.to_parquet(copy / "metadata.parquet", index=False)
    rerecord_metadata(copy)
    with pytest.raises(IndexBuildError, match=needle) as caught:
        create_app({"t": copy}, warmup=False)
    assert "metadata.parquet: row 3, field thumbnail" in str(caught.value)


def test_a_symlinked_thumbs_folder_stops_the_index(tmp_path: Path, index_dir: Path) -> None:
    """``thumbs -> /``: every thumbs/... entry would count as inside the store if the store
    were resolved itself; the index refuses to open instead."""
    copy = copy_index(index_dir, tmp_path)
    shutil.rmtree(copy / "thumbs")
    (copy / "thumbs").symlink_to("/")
    with pytest.raises(IndexBuildError, match="thumbs is a symbolic link"):
        create_app({"t": copy}, warmup=False)


def test_thumbnails_are_read_without_following_links(tmp_path: Path, index_dir: Path) -> None:
    """Links planted (or swapped in after start-up) are 404s: O_NOFOLLOW on every component."""
    copy = copy_index(index_dir, tmp_path)
    client = TestClient(create_app({"t": copy}, warmup=False, caption_search=False))
    metadata = pd.read_parquet(copy / "metadata.parquet")
    ids = [str(i) for i in metadata["id"]]
    names = list(metadata["thumbnail"])
    assert client.get(f"/images/{ids[0]}").status_code == 200
    (copy / names[0]).unlink()
    (copy / names[0]).symlink_to("/etc/passwd")  # a file link out of the index
    assert_error(client.get(f"/images/{ids[0]}"), 404, "no thumbnail")
    (copy / names[1]).unlink()
    (copy / names[1]).symlink_to(copy / "manifest.json")  # a link that stays inside: refused too
    assert_error(client.get(f"/images/{ids[1]}"), 404, "no thumbnail")
    (copy / names[2]).unlink()
    os.mkfifo(copy / names[2])  # not a regular file (and must not block the open)
    assert_error(client.get(f"/images/{ids[2]}"), 404, "no thumbnail")
    (copy / "thumbs").rename(copy / "thumbs-real")  # the store swapped for a link after start-up
    (copy / "thumbs").symlink_to(copy / "thumbs-real")
    assert_error(client.get(f"/images/{ids[3]}"), 404, "no thumbnail")
    (copy / "thumbs").unlink()
    (copy / "thumbs-real").rename(copy / "thumbs")
    response = client.get(f"/images/{ids[3]}")
    assert response.status_code == 200 and response.content == (copy / names[3]).read_bytes()
