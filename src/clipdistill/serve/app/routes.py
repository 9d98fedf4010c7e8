"""The routes, in named groups that ``create_app`` adds to one FastAPI app: search, the index
information (``/indexes``, ``/healthz``, ``/metrics``), thumbnails, and the page and docs."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from swagger_ui_bundle import swagger_ui_path

from clipdistill.serve.app.budget import DecodeBudget
from clipdistill.serve.app.inputs import Query as SearchQuery
from clipdistill.serve.app.inputs import check_image_id, decode_image, parse_query
from clipdistill.serve.app.limits import MAX_K, MAX_TEXT_CHARS, MAX_THUMB_BYTES, STATIC_DIR
from clipdistill.serve.app.metrics import Metrics
from clipdistill.serve.app.schemas import ERRORS, IndexInfo, SearchHit, SearchRequest, SearchResponse, Timing
from clipdistill.serve.app.served_index import ServedIndex
from clipdistill.serve.app.thumbnails import read_thumbnail


@dataclass
class Service:
    """What the routes share: the served indexes (the first is the default), the search
    executor, the decode budget and the metrics.

    Searches run on their own executor of ``slots`` threads: at most ``slots`` queries decode,
    encode and search at once, the rest wait in its queue without holding a thread, and the
    event loop plus Starlette's default thread pool stay free for ``/healthz``, ``/metrics``,
    ``/indexes`` and ``/images`` however many searches wait.
    """

    served: dict[str, ServedIndex]
    slots: int
    metrics: Metrics
    budget: DecodeBudget
    executor: ThreadPoolExecutor = field(init=False)

    def __post_init__(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=self.slots, thread_name_prefix="clipdistill-search")

    @property
    def default(self) -> str:
        return next(iter(self.served))

    def lookup(self, name: str | None, status: int) -> ServedIndex:
        if name is None:
            return self.served[self.default]
        if name not in self.served:
            raise HTTPException(status, f"unknown index {name[:80]!r}; served: {', '.join(self.served)}")
        return self.served[name]

    async def search(self, index: ServedIndex, query: SearchQuery) -> tuple[list[SearchHit], float, float]:
        """:meth:`run_search` on the search executor."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.run_search, index, query)

    def run_search(self, index: ServedIndex, query: SearchQuery) -> tuple[list[SearchHit], float, float]:
        """(hits, encode seconds, search seconds), on a search thread; decoding happens here,
        inside the slot and the decode budget, and the wait for a slot counts in neither."""
        started = time.perf_counter()
        pil = None
        if query.image is not None:
            size = index.searcher.encoders.preprocess.size
            pil = decode_image(query.image, budget=self.budget, size=size)
        vector = index.searcher.embed_query(text=query.text, image=pil)
        encoded = time.perf_counter()
        hits = index.search(vector, query.params.k, query.params.target)
        return hits, encoded - started, time.perf_counter() - encoded


SEARCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": SearchRequest.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "string", "format": "binary", "description": "Query image file."},
                        "text": {"type": "string", "maxLength": MAX_TEXT_CHARS},
                        "k": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10},
                        "index": {"type": "string"},
                        "target": {"type": "string", "enum": ["image", "text"], "default": "image"},
                    },
                }
            },
        },
    }
}


def add_search_route(app: FastAPI, service: Service) -> None:
    """``POST /search``."""
    metrics = service.metrics

    @app.post(
        "/search",
        response_model=SearchResponse,
        responses=ERRORS,
        summary="Search an index by text or by image",
        openapi_extra=SEARCH_BODY,
    )
    async def search(request: Request) -> SearchResponse:
        """JSON ``{"text": ...}`` or ``{"image_b64": ...}``, or a multipart form with the image
        file as ``image`` (plus ``k``, ``index``, ``target`` fields). ``target=image`` ranks the
        indexed images, ``target=text`` their captions; hits are indexed items either way."""
        started = time.perf_counter()
        query = await parse_query(request)
        index = service.lookup(query.params.index, 422)
        if query.params.target == "text" and index.caption_index is None:
            raise HTTPException(422, index.captions_off())
        hits, encode_s, search_s = await service.search(index, query)
        total_s = time.perf_counter() - started
        kind = "text" if query.text is not None else "image"
        for stage, seconds in (("encode", encode_s), ("search", search_s), ("total", total_s)):
            metrics.stage_seconds.labels(stage, kind, index.name).observe(seconds)
        metrics.searches.labels(index.name, kind, query.params.target).inc()
        return SearchResponse(
            hits=hits,
            timing_ms=Timing(
                encode=round(encode_s * 1e3, 3), search=round(search_s * 1e3, 3), total=round(total_s * 1e3, 3)
            ),
            index=index.name,
            target=query.params.target,
            query=kind,
        )


def add_info_routes(app: FastAPI, service: Service) -> None:
    """``GET /indexes``, ``/healthz`` and ``/metrics``."""
    served = service.served

    # async and free of blocking work (dicts in memory, prometheus rendering): they run on the
    # event loop and answer while every search thread is busy.

    @app.get("/indexes", response_model=list[IndexInfo], summary="The served indexes")
    async def list_indexes() -> list[IndexInfo]:
        return [index.info(name == service.default) for name, index in served.items()]

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "indexes": {name: index.count for name, index in served.items()}}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def add_image_route(app: FastAPI, service: Service) -> None:
    """``GET /images/{id}``: thumbnails from the index's own store only."""

    @app.get(
        "/images/{image_id:path}",
        summary="A hit's thumbnail",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}, 400: ERRORS[400], 404: ERRORS[404]},
    )
    async def image(
        image_id: str,
        index: str | None = Query(None, description="Index name; default: the first."),
    ) -> Response:
        """The thumbnail stored in the index folder for ``image_id``; originals are never served,
        and no link is followed on the way to the file."""
        check_image_id(image_id)
        served_index = service.lookup(index, 404)
        row = served_index.rows.get(image_id)
        if row is None:
            raise HTTPException(404, f"unknown image id {image_id[:80]!r} in index {served_index.name!r}")
        name = served_index.thumbs[row]
        missing = f"index {served_index.name!r} stores no thumbnail for {image_id[:80]!r}"
        if name is None:
            raise HTTPException(404, missing)
        try:  # a small local file, read on Starlette's thread pool (searches have their own)
            data = await run_in_threadpool(read_thumbnail, served_index.root, name, MAX_THUMB_BYTES)
        except OSError as error:  # missing, a link (ELOOP), not a regular file, too large
            raise HTTPException(404, f"{missing} ({type(error).__name__})") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600"})


def add_page_routes(app: FastAPI) -> None:
    """The web page at ``/``, its static files, and ``/docs`` with its assets."""

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title}: API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon-32x32.png",
        )

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")
