"""Build a FAISS index from an embedding folder shard by shard, never holding every vector.

At 100M images × 256 dims the float32 embeddings are 100 GB; the index itself (IVF-PQ) a few
GB. So the builder reads one ``img_emb_NNNN.npy`` at a time (memory-mapped), verifies its
sha256 against ``embeddings.json``, normalises it and adds it. Factories that need training
(IVF, PQ) train first on a sample: every vector when there are at most
:data:`TRAIN_SAMPLE` of them, else :data:`TRAIN_SAMPLE` rows drawn without replacement with the
same seeded draw the in-memory :func:`~clipdistill.serve.ann.build_faiss` makes, so both paths
build the same index. Peak memory is then one shard plus the training sample plus the index.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from clipdistill.paths import resolve_inside
from clipdistill.serve.ann import TRAIN_SAMPLE, IndexBuildError, apply_search_params, new_index, train_index
from clipdistill.serve.checksums import file_sha256


def image_shards(emb_dir: Path, manifest: dict[str, Any]) -> list[tuple[Path, str | None]]:
    """``(img_emb shard path, expected sha256)`` in row order, from the embedding manifest.
    A shard the manifest lists without a checksum (a hand-built folder) is read unverified,
    at its positional name, as :func:`~clipdistill.serve.embed.read_embeddings` reads it."""
    shards: list[tuple[Path, str | None]] = []
    for number, entry in enumerate(manifest["shards"]):
        names = [name for name in entry if name.startswith("img_emb/")]
        if len(names) > 1:
            raise IndexBuildError(f"{emb_dir}/embeddings.json: shard {number} lists {len(names)} img_emb files")
        if names:  # a name read from the manifest: it must stay inside the embedding folder
            what = f"{emb_dir / 'embeddings.json'}: shard {number}"
            shards.append((resolve_inside(emb_dir, names[0], what=what, error=IndexBuildError), entry[names[0]]))
        else:
            shards.append((emb_dir / "img_emb" / f"img_emb_{number:04d}.npy", None))
    return shards


def _verified(path: Path, sha256: str | None) -> np.ndarray:
    if not path.is_file():
        raise IndexBuildError(f"embedding shard {path} is missing")
    if sha256 is not None and file_sha256(path) != sha256:
        raise IndexBuildError(f"embedding shard {path} fails its sha256 in embeddings.json (changed or corrupt)")
    return np.load(path, mmap_mode="r")


def _unit(vectors: np.ndarray, path: Path) -> tuple[np.ndarray, float]:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if (norms == 0).any():
        raise IndexBuildError(f"{path}: {int((norms == 0).sum())} embedding(s) are all zeros; cannot index them")
    return np.ascontiguousarray(vectors / norms, dtype=np.float32), float(np.abs(norms - 1).max())


def iter_unit_shards(shards: list[tuple[Path, str | None]], chunk_rows: int) -> Iterator[tuple[np.ndarray, float]]:
    """Verified, L2-normalised chunks (≤ ``chunk_rows`` rows) of every shard in order."""
    for path, sha in shards:
        table = _verified(path, sha)
        for start in range(0, len(table), chunk_rows):
            yield _unit(table[start : start + chunk_rows], path)


def training_sample(shards: list[tuple[Path, str | None]], total: int, seed: int) -> np.ndarray:
    """All rows (≤ :data:`TRAIN_SAMPLE`) or a seeded sample of that many, read shard by shard."""
    if total <= TRAIN_SAMPLE:
        return np.concatenate([chunk for chunk, _ in iter_unit_shards(shards, 1 << 20)])
    rng = np.random.default_rng(seed)
    chosen = rng.choice(total, TRAIN_SAMPLE, replace=False)
    order = np.argsort(chosen, kind="stable")
    sorted_rows = chosen[order]
    parts, offset = [], 0
    for path, sha in shards:
        table = _verified(path, sha)
        lo, hi = np.searchsorted(sorted_rows, [offset, offset + len(table)])
        if hi > lo:
            parts.append(_unit(table[sorted_rows[lo:hi] - offset], path)[0])
        offset += len(table)
    sample = np.empty((TRAIN_SAMPLE, parts[0].shape[1]), dtype=np.float32)
    sample[order] = np.concatenate(parts)  # back to the draw's order, as the in-memory path has it
    return sample


def build_faiss_chunked(
    emb_dir: Path,
    manifest: dict[str, Any],
    factory: str,
    *,
    ef_construction: int = 80,
    ef_search: int = 64,
    nprobe: int = 16,
    seed: int = 0,
    chunk_rows: int = 65536,
) -> tuple[Any, dict[str, Any], float]:
    """(trained, filled index, build parameters, largest input-norm deviation from 1)."""
    shards = image_shards(emb_dir, manifest)
    total, dim = int(manifest["count"]), int(manifest["embed_dim"])
    index, params = new_index(dim, factory, ef_construction)
    started = time.perf_counter()
    train_index(index, factory, total, lambda: training_sample(shards, total, seed), params)
    deviation = 0.0
    for chunk, chunk_deviation in iter_unit_shards(shards, chunk_rows):
        index.add(chunk)
        deviation = max(deviation, chunk_deviation)
    if index.ntotal != total:
        raise IndexBuildError(f"{emb_dir}: the shards hold {index.ntotal} vectors, embeddings.json says {total}")
    params["build_seconds"] = round(time.perf_counter() - started, 3)
    params["added_in_chunks_of"] = chunk_rows
    params |= apply_search_params(index, ef_search=ef_search, nprobe=nprobe)
    return index, params, deviation
