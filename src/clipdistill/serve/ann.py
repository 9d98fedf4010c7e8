"""The FAISS primitives both index builds share: factory -> empty index, training, search
parameters, the in-memory build, and the errors they raise.

Split out of ``serve/index.py`` so that ``serve/index_chunks.py`` (the streamed build) and
``serve/index.py`` (the index folder) both import them from here instead of from each other.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

TRAIN_SAMPLE = 256 * 1024  # rows FAISS trains IVF/PQ on (its own guidance: 30-256 points per centroid)


class IndexBuildError(ValueError):
    """Bad index input: unknown factory, too few vectors to train, missing files."""


class IndexMismatchError(IndexBuildError):
    """An encoder (or query vector) that does not belong to this index; the message says why."""


def build_faiss(
    vectors: np.ndarray,
    factory: str,
    *,
    ef_construction: int = 80,
    ef_search: int = 64,
    nprobe: int = 16,
    seed: int = 0,
) -> tuple[Any, dict[str, Any]]:
    """A trained, filled inner-product index and the parameters it was built with (all
    vectors in memory; ``clipdistill index`` streams shards through ``index_chunks`` instead)."""
    index, params = new_index(vectors.shape[1], factory, ef_construction)
    started = time.perf_counter()

    def sample() -> np.ndarray:
        if len(vectors) <= TRAIN_SAMPLE:
            return vectors
        return vectors[np.random.default_rng(seed).choice(len(vectors), TRAIN_SAMPLE, replace=False)]

    train_index(index, factory, len(vectors), sample, params)
    index.add(vectors)
    params["build_seconds"] = round(time.perf_counter() - started, 3)
    params |= apply_search_params(index, ef_search=ef_search, nprobe=nprobe)
    return index, params


def train_index(index: Any, factory: str, total: int, sample: Callable[[], np.ndarray], params: dict[str, Any]) -> None:
    """Train ``index`` when its factory needs it (IVF, PQ), on ``sample()`` drawn from ``total``
    vectors, recording ``train_size`` in ``params``. ``sample`` is a callable so an index that
    needs no training never reads one (the chunked build draws it from shards on disk)."""
    if index.is_trained:
        return
    ivf = _ivf_of(index)
    if ivf is not None and total < ivf.nlist:
        raise IndexBuildError(f"factory {factory!r} needs at least {ivf.nlist} vectors to train, got {total}")
    vectors = sample()
    try:
        index.train(vectors)
    except RuntimeError as error:  # e.g. PQ needs >= 2**nbits training points
        message = str(error).strip().splitlines()[-1]
        raise IndexBuildError(f"cannot train {factory!r} on {len(vectors)} vectors: {message}") from None
    params["train_size"] = len(vectors)


def new_index(dim: int, factory: str, ef_construction: int = 80) -> tuple[Any, dict[str, Any]]:
    """An empty inner-product index from a FAISS factory string (HNSW's efConstruction set)."""
    import faiss

    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise IndexBuildError(
            f"FAISS cannot build factory {factory!r} for dim {dim}: {str(error).strip()[-300:]}"
        ) from None
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise IndexBuildError(f"factory {factory!r} gave metric {index.metric_type}, expected inner product")
    params: dict[str, Any] = {}
    hnsw = _hnsw_of(index)
    if hnsw is not None:
        hnsw.efConstruction = ef_construction
        params["efConstruction"] = ef_construction
    return index, params


def _hnsw_of(index: Any) -> Any:
    import faiss

    inner = faiss.downcast_index(index)
    return inner.hnsw if hasattr(inner, "hnsw") else None


def _ivf_of(index: Any) -> Any:
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def apply_search_params(index: Any, *, ef_search: int | None = None, nprobe: int | None = None) -> dict[str, int]:
    """Set efSearch (HNSW) / nprobe (IVF) where the index has them; return what was set."""
    applied: dict[str, int] = {}
    hnsw = _hnsw_of(index)
    if hnsw is not None and ef_search is not None:
        hnsw.efSearch = int(ef_search)
        applied["efSearch"] = int(ef_search)
    ivf = _ivf_of(index)
    if ivf is not None and nprobe is not None:
        ivf.nprobe = min(int(nprobe), ivf.nlist)
        applied["nprobe"] = int(ivf.nprobe)
    return applied
