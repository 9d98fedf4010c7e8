"""``ServedIndex``: one index folder behind a name, with the lookups the routes need."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from fastapi import HTTPException

from clipdistill.serve.app.limits import CAPTION_BATCH
from clipdistill.serve.app.schemas import IndexInfo, SearchHit
from clipdistill.serve.search import Searcher


@dataclass
class ServedIndex:
    """One index folder behind a name: the Searcher plus what the routes look up."""

    name: str
    searcher: Searcher
    variant: str
    root: Path = Path()  # the index folder's real location; thumbnails are opened relative to it
    rows: dict[str, int] = field(default_factory=dict)  # image id -> metadata row
    thumbs: list[str | None] = field(default_factory=list)  # row -> "thumbs/NNNNNNN.jpg" (checked at open)
    ids: list[str] = field(default_factory=list)  # row -> image id
    captions: list[str] = field(default_factory=list)
    caption_index: Any = None  # built by load(captions=True), at start-up, never inside a request

    @classmethod
    def load(cls, name: str, searcher: Searcher, variant: str, *, captions: bool = True) -> ServedIndex:
        """``captions``: embed every caption now for ``target=text`` (off: such queries are a 422)."""
        served = cls(name=name, searcher=searcher, variant=variant, root=searcher.directory.resolve())
        metadata = searcher.metadata
        thumbs = metadata["thumbnail"] if "thumbnail" in metadata else [None] * len(metadata)
        for row, (image_id, thumb) in enumerate(zip(metadata["id"], thumbs, strict=True)):
            served.rows.setdefault(str(image_id), row)
            # Searcher.open refused any entry outside INDEX_DIR/thumbs; null means "no thumbnail"
            served.thumbs.append(thumb if isinstance(thumb, str) and thumb else None)
        served.ids = [str(i) for i in metadata["id"]]
        served.captions = [str(c) for c in metadata["caption"]]
        if captions:
            served.caption_index = served._build_caption_index()
        return served

    @property
    def count(self) -> int:
        return self.searcher.count

    def info(self, default: bool) -> IndexInfo:
        manifest = self.searcher.manifest
        return IndexInfo(
            name=self.name,
            default=default,
            count=self.count,
            dim=int(manifest["dim"]),
            factory=str(manifest["factory"]),
            model=str(manifest["model"]["spec"]),
            variant=self.variant,
            dataset=(manifest.get("data", {}).get("dataset") or {}).get("name"),
            created=manifest.get("created"),
        )

    def captions_off(self) -> str:
        return f"target=text is off for index {self.name!r} (the server was started with --no-caption-search)"

    def _build_caption_index(self) -> Any:
        """A flat inner-product index over the captions' text embeddings (the index folder
        stores image vectors only)."""
        import faiss

        encoders = self.searcher.encoders
        vectors = [
            encoders.encode_texts(self.captions[i : i + CAPTION_BATCH])
            for i in range(0, len(self.captions), CAPTION_BATCH)
        ]
        matrix = np.ascontiguousarray(np.concatenate(vectors), dtype=np.float32)
        index = faiss.IndexFlatIP(matrix.shape[1])
        index.add(matrix)
        return index

    def search(self, vector: np.ndarray, k: int, target: str) -> list[SearchHit]:
        """Top-k items for a unit query vector (1, D) by their image (the index's FAISS index,
        as ``Searcher.search_vectors``) or by their caption; rows map to precomputed columns
        (a pandas row lookup per hit would cost more than the search)."""
        ann = self.searcher.index if target == "image" else self.caption_index
        if ann is None:
            raise HTTPException(422, self.captions_off())
        scores, rows = ann.search(np.ascontiguousarray(vector, dtype=np.float32), min(k, ann.ntotal))
        return [self.hit(int(row), float(score)) for score, row in zip(scores[0], rows[0], strict=True) if row >= 0]

    def hit(self, row: int, score: float) -> SearchHit:
        image_id = self.ids[row]
        url = f"/images/{quote(image_id, safe='')}?index={quote(self.name, safe='')}" if self.thumbs[row] else None
        return SearchHit(id=image_id, score=round(float(score), 6), caption=self.captions[row], image_url=url)
