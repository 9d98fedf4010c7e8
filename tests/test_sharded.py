"""Sharded work: process r builds the cache/embedding shards ≡ r (mod N), the merge verifies
every shard, refuses a missing one and gives what one process gives; the index is built from
the shards in chunks and equals the in-memory build. The torchrun launches are marked slow;
the same split is exercised in-process by calling each rank's part in turn."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from clipdistill.data.loading import load_dataset
from clipdistill.distill.cache import CacheCorruptError, build_cache, read_manifest
from clipdistill.models.lit import LiTConfig, LiTModel
from clipdistill.serve.embed import EmbedError, embed_dataset, read_embeddings
from clipdistill.serve.index import build_faiss
from test_distributed import _torchrun


@pytest.fixture(scope="module")
def teacher_spec(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("teacher")
    LiTModel(LiTConfig(image_model="test_convnext", image_size=32)).save(folder)
    return f"run:{folder}"


def _cache(teacher: str, data: Path, out: Path, **kwargs: object) -> Path:
    options = {"k_augmentations": 2, "image_size": 32, "shard_size": 5, "progress": False, **kwargs}
    return build_cache(teacher, load_dataset(data), out, **options)  # type: ignore[arg-type]


def _same_cache(left: Path, right: Path) -> None:
    mine, theirs = read_manifest(left), read_manifest(right)
    assert mine["header_hash"] == theirs["header_hash"]
    assert mine["image_ids"] == theirs["image_ids"] and mine["caption_ids"] == theirs["caption_ids"]
    for kind, entries in theirs["shards"].items():
        assert [(e["file"], e["start"], e["rows"]) for e in mine["shards"][kind]] == [
            (e["file"], e["start"], e["rows"]) for e in entries
        ]
        for entry in entries:  # the same numbers (bitwise equality would depend on the thread count)
            a, b = load_file(left / entry["file"]), load_file(right / entry["file"])
            for name, tensor in b.items():
                torch.testing.assert_close(a[name], tensor, rtol=1e-5, atol=1e-6)


def test_cache_shards_by_rank_then_verified_merge(shapes_dataset_dir: Path, tmp_path: Path, teacher_spec: str) -> None:
    single = _cache(teacher_spec, shapes_dataset_dir, tmp_path / "single")
    sharded = tmp_path / "sharded"
    _cache(teacher_spec, shapes_dataset_dir, sharded, shard_owner=(0, 2))
    assert not (sharded / "manifest.json").exists()  # a rank's part is never a usable cache
    assert sorted(p.name for p in sharded.glob("images-*")) == ["images-00000.safetensors", "images-00002.safetensors"]
    with pytest.raises(CacheCorruptError, match=r"images-00001\.safetensors are missing"):
        _cache(teacher_spec, shapes_dataset_dir, sharded, require_existing=True)  # rank 1 never ran
    _cache(teacher_spec, shapes_dataset_dir, sharded, shard_owner=(1, 2))
    _cache(teacher_spec, shapes_dataset_dir, sharded, require_existing=True)
    _same_cache(sharded, single)
    assert read_manifest(sharded)["counts"]["image_rows"] == 12


def test_embed_shards_by_rank_then_verified_merge_and_index_from_chunks(
    shapes_dataset_dir: Path, tmp_path: Path, teacher_spec: str
) -> None:
    from clipdistill.serve.index_chunks import build_faiss_chunked

    options = {"split": "all", "shard_size": 5, "progress": False}
    single = embed_dataset(teacher_spec, shapes_dataset_dir, tmp_path / "single", **options)
    sharded = tmp_path / "sharded"
    embed_dataset(teacher_spec, shapes_dataset_dir, sharded, shard_owner=(1, 2), **options)
    with pytest.raises(EmbedError, match="shard 0 is missing"):
        embed_dataset(teacher_spec, shapes_dataset_dir, sharded, require_existing=True, **options)
    embed_dataset(teacher_spec, shapes_dataset_dir, sharded, shard_owner=(0, 2), **options)
    merged = embed_dataset(teacher_spec, shapes_dataset_dir, sharded, require_existing=True, **options)
    assert merged["shards"] == single["shards"] and merged["skipped_shards"] == 3  # same files, none redone

    manifest, image, _, _ = read_embeddings(sharded)
    vectors = image / np.linalg.norm(image, axis=1, keepdims=True)
    for factory in ("Flat", "IVF2,Flat"):
        reference, _ = build_faiss(vectors, factory, nprobe=2)
        chunked, params, _ = build_faiss_chunked(sharded, manifest, factory, nprobe=2, chunk_rows=2)
        assert chunked.ntotal == 12 and params["added_in_chunks_of"] == 2
        for left, right in zip(reference.search(vectors[:4], 5), chunked.search(vectors[:4], 5), strict=True):
            np.testing.assert_allclose(left, right, rtol=1e-6, atol=1e-6)


def test_training_sample_is_the_in_memory_draw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clipdistill.serve import index_chunks
    from clipdistill.serve.checksums import file_sha256

    rng = np.random.default_rng(1)
    shards = []
    tables = [rng.normal(size=(n, 4)).astype(np.float32) for n in (3, 5, 4)]
    for number, table in enumerate(tables):
        path = tmp_path / f"img_emb_{number:04d}.npy"
        np.save(path, table)
        shards.append((path, file_sha256(path)))
    monkeypatch.setattr(index_chunks, "TRAIN_SAMPLE", 5)
    sample = index_chunks.training_sample(shards, 12, seed=0)
    everything = np.concatenate(tables)
    everything /= np.linalg.norm(everything, axis=1, keepdims=True)
    expected = everything[np.random.default_rng(0).choice(12, 5, replace=False)]
    np.testing.assert_allclose(sample, expected, rtol=1e-6)
    np.save(shards[1][0], tables[1] * 2)  # changed after embedding: refused by checksum
    with pytest.raises(ValueError, match="fails its sha256"):
        list(index_chunks.iter_unit_shards(shards, 2))


@pytest.mark.slow
def test_torchrun_cache_build_and_embed_equal_one_process(
    shapes_dataset_dir: Path, tmp_path: Path, teacher_spec: str
) -> None:
    common = ["--teacher", teacher_spec, "--data", str(shapes_dataset_dir), "--k-aug", "2", "--image-size", "32"]
    _torchrun(
        "-m", "clipdistill.cli.main", "cache", "build", *common, "--shard-size", "5", "--out", str(tmp_path / "a")
    )
    _same_cache(tmp_path / "a", _cache(teacher_spec, shapes_dataset_dir, tmp_path / "b"))

    args = ["--model", teacher_spec, "--data", str(shapes_dataset_dir), "--split", "all", "--shard-size", "5"]
    _torchrun("-m", "clipdistill.cli.main", "embed", *args, "--out", str(tmp_path / "emb"))
    embed_dataset(teacher_spec, shapes_dataset_dir, tmp_path / "emb1", split="all", shard_size=5, progress=False)
    sharded = json.loads((tmp_path / "emb" / "embeddings.json").read_text())
    assert len(sharded["shards"]) == 3 and sharded["count"] == 12
    _, image, text, metadata = read_embeddings(tmp_path / "emb")
    _, image_b, text_b, metadata_b = read_embeddings(tmp_path / "emb1")
    assert list(metadata["id"]) == list(metadata_b["id"])
    np.testing.assert_allclose(image, image_b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(text, text_b, rtol=1e-5, atol=1e-6)
