"""Embedding shards (resumable), FAISS index build, manifest checks and refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from clipdistill.serve.embed import EmbedError, embed_dataset, read_embeddings
from clipdistill.serve.encoders import ExportError, OnnxEncoders
from clipdistill.serve.index import IndexBuildError, IndexMismatchError, build_index, check_encoders, read_manifest
from test_export import ensure_export


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory, shapes_dataset_dir: Path) -> Path:
    return ensure_export(tmp_path_factory.getbasetemp() / "deploy", shapes_dataset_dir)


@pytest.fixture(scope="module")
def emb_dir(tmp_path_factory: pytest.TempPathFactory, export_dir: Path, shapes_dataset_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("emb")
    embed_dataset(export_dir, shapes_dataset_dir, out, split="all", shard_size=5, batch_size=2, progress=False)
    return out


def test_embed_layout_and_matching_ids(emb_dir: Path) -> None:
    manifest, image, text, metadata = read_embeddings(emb_dir)
    assert manifest["count"] == 12 and len(manifest["shards"]) == 3
    assert image.shape == text.shape == (12, manifest["embed_dim"])
    assert list(metadata.columns[:3]) == ["id", "image_path", "caption"]
    assert sorted(p.name for p in (emb_dir / "img_emb").iterdir()) == [f"img_emb_000{i}.npy" for i in range(3)]
    np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1.0, atol=1e-5)


def test_embed_resumes_and_skips_finished_shards(tmp_path: Path, export_dir: Path, shapes_dataset_dir: Path) -> None:
    kwargs = {"split": "all", "shard_size": 5, "progress": False}
    embed_dataset(export_dir, shapes_dataset_dir, tmp_path, **kwargs)
    first = (tmp_path / "img_emb" / "img_emb_0000.npy").stat().st_mtime_ns
    reference = np.load(tmp_path / "img_emb" / "img_emb_0002.npy")
    (tmp_path / "metadata" / "metadata_0002.parquet").unlink()  # shard 2 "crashed" before finishing
    manifest = embed_dataset(export_dir, shapes_dataset_dir, tmp_path, **kwargs)
    assert manifest["skipped_shards"] == 2
    assert (tmp_path / "img_emb" / "img_emb_0000.npy").stat().st_mtime_ns == first
    np.testing.assert_allclose(np.load(tmp_path / "img_emb" / "img_emb_0002.npy"), reference, atol=1e-6)
    with pytest.raises(EmbedError, match="shard_size"):
        embed_dataset(export_dir, shapes_dataset_dir, tmp_path, split="all", shard_size=4, progress=False)


def test_index_manifest_and_bundled_encoders(tmp_path: Path, emb_dir: Path, export_dir: Path) -> None:
    manifest = build_index(emb_dir, tmp_path / "index", factory="Flat")
    assert read_manifest(tmp_path / "index") == manifest
    assert manifest["metric"] == "inner_product" and manifest["count"] == 12
    assert set(manifest["model"]["encoders"]) == {"fp32", "int8"}
    assert set(manifest["data"]) >= {"dataset_sha256", "embeddings_sha256", "metadata_sha256", "index_sha256"}
    assert (tmp_path / "index" / "encoders" / "image_encoder.onnx").is_file()
    assert len(list((tmp_path / "index" / "thumbs").glob("*.jpg"))) == 12
    # The graphs are linked, not copied: one file on disk for the export and the index.
    linked = tmp_path / "index" / "encoders" / "image_encoder.onnx"
    assert linked.stat().st_ino == (export_dir / "image_encoder.onnx").stat().st_ino


def test_encoders_are_copied_where_links_fail(tmp_path: Path, emb_dir: Path, export_dir: Path, monkeypatch) -> None:
    import os

    def refuse(source: object, target: object) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", refuse)
    build_index(emb_dir, tmp_path / "index", factory="Flat", thumb_size=16)
    copied = tmp_path / "index" / "encoders" / "image_encoder.onnx"
    assert copied.stat().st_ino != (export_dir / "image_encoder.onnx").stat().st_ino
    assert copied.read_bytes() == (export_dir / "image_encoder.onnx").read_bytes()


@pytest.mark.parametrize("factory", ["HNSW8", "IVF2,Flat", "IVF2,PQ8x2"])
def test_other_factories_build(tmp_path: Path, emb_dir: Path, factory: str) -> None:
    manifest = build_index(emb_dir, tmp_path / "index", factory=factory, thumb_size=16)
    assert manifest["factory"] == factory and manifest["count"] == 12


def test_bad_factory_and_too_few_vectors_are_refused(tmp_path: Path, emb_dir: Path) -> None:
    with pytest.raises(IndexBuildError, match="factory"):
        build_index(emb_dir, tmp_path / "a", factory="NoSuchIndex")
    with pytest.raises(IndexBuildError, match="at least 64 vectors"):
        build_index(emb_dir, tmp_path / "b", factory="IVF64,Flat")
    with pytest.raises(IndexBuildError, match="cannot train"):
        build_index(emb_dir, tmp_path / "c", factory="IVF2,PQ8x8")


def test_mismatched_encoders_are_refused(tmp_path: Path, emb_dir: Path, export_dir: Path) -> None:
    manifest = build_index(emb_dir, tmp_path / "index", factory="Flat")
    identity = OnnxEncoders(export_dir).identity
    check_encoders(manifest, identity)  # the right encoders pass
    with pytest.raises(IndexMismatchError, match="dim 128 does not match the index dim 256"):
        check_encoders(manifest, {**identity, "embed_dim": 128})
    with pytest.raises(IndexMismatchError, match="weights checksum"):
        check_encoders(manifest, {**identity, "weights_sha256": "0" * 64, "spec": "local-dir:other"})
    with pytest.raises(IndexMismatchError, match="text encoder checksum"):
        check_encoders(manifest, {**identity, "encoder_sha256": {"text": "f" * 64}})
    # a graph changed after export is caught by the export's own checksums
    tampered = tmp_path / "tampered"
    shutil.copytree(export_dir, tampered)
    with open(tampered / "text_encoder.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ExportError, match="checksum"):
        OnnxEncoders(tampered)


def test_torch_embeddings_need_matching_encoders(tmp_path: Path, export_dir: Path, shapes_dataset_dir: Path) -> None:
    student = export_dir.parent / "student"
    out = tmp_path / "emb"
    embed_dataset(f"local-dir:{student}", shapes_dataset_dir, out, split="test", progress=False)
    with pytest.raises(IndexMismatchError, match="--encoders"):
        build_index(out, tmp_path / "index")
    manifest = build_index(out, tmp_path / "index", encoders=export_dir, factory="Flat")
    assert manifest["model"]["embedded_with"] == "torch"
    config = json.loads((export_dir / "export.json").read_text())
    config["source"]["weights_sha256"] = "1" * 64
    other = tmp_path / "other_export"
    shutil.copytree(export_dir, other)
    (other / "export.json").write_text(json.dumps(config))
    with pytest.raises(IndexMismatchError, match="weights checksum"):
        build_index(out, tmp_path / "index2", encoders=other)


def test_thumbnails_follow_their_sources_across_rebuilds(tmp_path: Path) -> None:
    """A rebuild into the same folder rewrites a thumbnail whose source changed, keeps the
    unchanged ones, and deletes thumbnails of rows the new index does not have."""
    import os

    from PIL import Image

    from clipdistill.serve.index import _write_thumbnails

    sources = []
    for i, colour in enumerate(("red", "green", "blue")):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (40, 40), colour).save(path)
        sources.append(str(path))
    out = tmp_path / "index"

    def colour_of(name: str) -> tuple[int, ...]:
        with Image.open(out / name) as thumb:
            return thumb.convert("RGB").getpixel((5, 5))

    names = _write_thumbnails(sources, out, 16)
    assert names == ["thumbs/0000000.jpg", "thumbs/0000001.jpg", "thumbs/0000002.jpg"]
    assert colour_of(names[0])[0] > 200 and colour_of(names[2])[2] > 200
    kept = (out / names[1]).stat().st_mtime_ns
    Image.new("RGB", (40, 40), "yellow").save(sources[0])  # same path, new picture
    os.utime(sources[0], ns=(os.stat(sources[0]).st_atime_ns, os.stat(sources[0]).st_mtime_ns + 10**9))
    names = _write_thumbnails(sources[:2], out, 16)  # one row fewer
    assert names == ["thumbs/0000000.jpg", "thumbs/0000001.jpg"]
    red, green, blue = colour_of(names[0])
    assert red > 200 and green > 200 and blue < 80  # yellow now, not the old red
    assert (out / names[1]).stat().st_mtime_ns == kept  # unchanged source: reused
    assert not (out / "thumbs" / "0000002.jpg").exists()  # no row 2 any more
    assert _write_thumbnails(sources[:2], out, 24) == names and Image.open(out / names[1]).size == (24, 24)
