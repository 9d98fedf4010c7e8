"""``Searcher``: query an index folder by text or image with onnxruntime + FAISS only.

Serving must run where torch is not installed (a small container, a phone-class CPU box), so
nothing here imports torch, open_clip or the training code: the encoders are the ONNX graphs
bundled in the index folder, tokenised and preprocessed by ``serve.tokenize``/``serve.preprocess``.
The CLI (``clipdistill search``) and the HTTP service are thin wrappers over this class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from clipdistill.paths import check_relative
from clipdistill.serve.checksums import file_sha256
from clipdistill.serve.encoders import OnnxEncoders
from clipdistill.serve.index import (
    ENCODERS_DIR,
    INDEX_FILE,
    MANIFEST_FILE,
    THUMBS_DIR,
    IndexBuildError,
    IndexMismatchError,
    apply_search_params,
    check_encoders,
    read_manifest,
)
from clipdistill.serve.preprocess import ImageInput

MAX_K = 1000
METADATA_FILE = "metadata.parquet"


def verify_recorded_checksums(directory: Path, manifest: dict[str, Any]) -> None:
    """The index and metadata files must be the ones the manifest recorded: an edited or
    half-copied file is refused at open, not discovered as wrong answers or a 500 later."""
    recorded = manifest.get("data", {})
    for name, key in ((INDEX_FILE, "index_sha256"), (METADATA_FILE, "metadata_sha256")):
        path = directory / name
        if not path.is_file():
            raise IndexBuildError(f"{path} is missing")
        expected = recorded.get(key)
        if expected is None:
            raise IndexBuildError(f"{directory / MANIFEST_FILE}: data.{key} is not recorded; rebuild the index")
        if file_sha256(path) != expected:
            raise IndexBuildError(
                f"{path}: sha256 differs from {key} in {MANIFEST_FILE} (changed or corrupt after the index was built)"
            )


def check_counts(directory: Path, manifest: dict[str, Any], vectors: int, rows: int) -> None:
    """One metadata row per vector, as many as the manifest says."""
    if not vectors == rows == int(manifest["count"]):
        raise IndexBuildError(
            f"{directory}: {INDEX_FILE} holds {vectors} vectors, {METADATA_FILE} {rows} rows and "
            f"{MANIFEST_FILE} says count {manifest['count']}; they must be equal"
        )


def check_thumbnails(directory: Path, metadata: Any) -> None:
    """Every ``thumbnail`` entry names a file under ``thumbs/`` of this folder, and ``thumbs``
    is not a link out of it; the service then opens each without following links."""
    if "thumbnail" not in metadata:
        return
    store = directory / THUMBS_DIR
    if store.is_symlink() or (store.exists() and store.resolve() != directory.resolve() / THUMBS_DIR):
        raise IndexBuildError(f"{store} is a symbolic link (to {store.resolve()}); thumbnails must be inside the index")
    for row, name in enumerate(metadata["thumbnail"]):
        if name is None or (isinstance(name, float) and name != name):  # null: no thumbnail for this row
            continue
        what = f"{directory / METADATA_FILE}: row {row}, field thumbnail"
        check_relative(name, what, IndexBuildError)
        if not name.startswith(THUMBS_DIR + "/"):
            raise IndexBuildError(f"{what}: {name!r} is not under {THUMBS_DIR}/")


class Hit(TypedDict):
    """One result: ``path`` is the display thumbnail inside the index (original if none)."""

    id: str
    score: float
    caption: str
    path: str


class QueryError(ValueError):
    """A bad query: no or two query kinds, empty text, k out of range, undecodable image."""


@dataclass
class Searcher:
    """A loaded index + its encoders. Build with :meth:`open`."""

    directory: Path
    manifest: dict[str, Any]
    index: Any
    metadata: Any
    encoders: OnnxEncoders

    @classmethod
    def open(
        cls,
        index_dir: str | Path,
        *,
        encoders: str | Path | None = None,
        variant: str = "fp32",
        threads: int | None = None,
        ef_search: int | None = None,
        nprobe: int | None = None,
    ) -> Searcher:
        """Load ``index_dir``. ``encoders`` overrides the bundled export folder; either way the
        encoders are checked against the manifest and refused (:class:`IndexMismatchError`)
        when their weights, graph checksums or dimension differ."""
        import faiss
        import pandas as pd

        directory = Path(index_dir)
        manifest = read_manifest(directory)
        onnx = OnnxEncoders(Path(encoders) if encoders else directory / ENCODERS_DIR, variant, threads=threads)
        check_encoders(manifest, onnx.identity)
        verify_recorded_checksums(directory, manifest)
        index = faiss.read_index(str(directory / INDEX_FILE))
        if index.metric_type != faiss.METRIC_INNER_PRODUCT or index.d != manifest["dim"]:
            raise IndexBuildError(f"{directory / INDEX_FILE} does not match its manifest (metric or dim)")
        params = manifest.get("search_params", {})
        apply_search_params(index, ef_search=ef_search or params.get("efSearch"), nprobe=nprobe or params.get("nprobe"))
        metadata = pd.read_parquet(directory / METADATA_FILE)
        check_counts(directory, manifest, int(index.ntotal), len(metadata))
        check_thumbnails(directory, metadata)
        return cls(directory=directory, manifest=manifest, index=index, metadata=metadata, encoders=onnx)

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    def embed_query(self, *, text: str | None = None, image: ImageInput | None = None) -> np.ndarray:
        """(1, D) unit query vector from exactly one of ``text`` / ``image``."""
        if (text is None) == (image is None):
            raise QueryError("give exactly one of text= or image=")
        if text is not None:
            if not text.strip():
                raise QueryError("text query is empty")
            return self.encoders.encode_texts([text])
        from clipdistill.serve.preprocess import ImageInputError

        try:
            return self.encoders.encode_images([image])  # type: ignore[list-item]
        except ImageInputError as error:
            raise QueryError(str(error)) from error

    def search_vectors(self, vectors: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """Hits for each row of ``vectors`` (B, D); refuses a dimension the index does not have."""
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if vectors.shape[1] != self.manifest["dim"]:
            raise IndexMismatchError(
                f"query dim {vectors.shape[1]} does not match the index dim {self.manifest['dim']}"
            )
        if not 1 <= k <= MAX_K:
            raise QueryError(f"k must be between 1 and {MAX_K}, got {k}")
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        scores, rows = self.index.search(np.ascontiguousarray(vectors), min(k, self.count))
        return [self._hits(score_row, id_row) for score_row, id_row in zip(scores, rows, strict=True)]

    def _hits(self, scores: Sequence[float], rows: Sequence[int]) -> list[Hit]:
        hits: list[Hit] = []
        for score, row in zip(scores, rows, strict=True):
            if row < 0:  # FAISS pads with -1 when fewer than k results exist
                continue
            record = self.metadata.iloc[int(row)]
            thumb = record.get("thumbnail")
            path = str(self.directory / thumb) if isinstance(thumb, str) and thumb else str(record["image_path"])
            hits.append(
                {"id": str(record["id"]), "score": float(score), "caption": str(record["caption"]), "path": path}
            )
        return hits

    def search(self, *, text: str | None = None, image: ImageInput | None = None, k: int = 10) -> list[Hit]:
        """Top-k images for a text query (text->image) or an image query (image->image)."""
        return self.search_vectors(self.embed_query(text=text, image=image), k)[0]
