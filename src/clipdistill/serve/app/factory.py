"""``create_app``: open the indexes, then assemble the app from the guard and the route groups."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from clipdistill.serve.app.budget import DecodeBudget
from clipdistill.serve.app.guard import ServiceMiddleware
from clipdistill.serve.app.inputs import error_text
from clipdistill.serve.app.limits import (
    ACCEPTED_FORMATS,
    BODY_TIMEOUT_SECONDS,
    DECODE_MEMORY_BYTES,
    INDEX_NAME,
    MAX_IMAGE_PIXELS,
    MAX_K,
    MAX_TEXT_CHARS,
)
from clipdistill.serve.app.metrics import Metrics
from clipdistill.serve.app.routes import (
    Service,
    add_image_route,
    add_info_routes,
    add_page_routes,
    add_search_route,
)
from clipdistill.serve.app.served_index import ServedIndex
from clipdistill.serve.search import Searcher


def open_indexes(
    indexes: Mapping[str, str | Path | Searcher], variant: str, threads: int | None, captions: bool = True
) -> dict[str, ServedIndex]:
    """Every index opened and checked against its manifest (checksums, counts, thumbnail
    names), in the order given; with ``captions`` its caption index is built now."""
    if not indexes:
        raise ValueError("create_app needs at least one index")
    served: dict[str, ServedIndex] = {}
    for name, source in indexes.items():
        if not INDEX_NAME.match(name):
            raise ValueError(f"index name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
        searcher = source if isinstance(source, Searcher) else Searcher.open(source, variant=variant, threads=threads)
        served[name] = ServedIndex.load(name, searcher, searcher.encoders.variant, captions=captions)
    return served


def warm_up(served: Mapping[str, ServedIndex]) -> None:
    """One text and one image query per index, so the first real request does not pay
    onnxruntime's lazy initialisation."""
    from PIL import Image

    for index in served.values():
        index.searcher.search(text="warm up", k=1)
        index.searcher.search(image=Image.new("RGB", (32, 32), "white"), k=1)


def create_app(
    indexes: Mapping[str, str | Path | Searcher],
    *,
    variant: str = "fp32",
    threads: int | None = 1,
    slots: int | None = None,
    warmup: bool = True,
    caption_search: bool = True,
    allowed_hosts: Sequence[str] | None = None,
    decode_memory: int = DECODE_MEMORY_BYTES,
    body_timeout: float = BODY_TIMEOUT_SECONDS,
) -> FastAPI:
    """The service over ``{name: index folder or opened Searcher}``; the first is the default.

    Every index is opened (and checked against its manifest) here, so a bad folder fails at
    start-up, not on the first query. ``threads``: onnxruntime intra-op threads per session
    (None: all cores); ``slots``: queries encoded and searched at once (default: cores divided
    by ``threads``). ``warmup`` runs one text and one image query per index so the first real
    request does not pay onnxruntime's lazy initialisation. ``caption_search``: embed every
    caption at start-up for ``target=text`` (off: those queries are a 422).
    ``allowed_hosts``: the names the ``Host`` header may carry (None: any; ``clipdistill
    serve`` passes the bind address and the local names). ``decode_memory``: bytes of decoded
    query pixels held at once; ``body_timeout``: seconds a request body may take to arrive.
    """
    served = open_indexes(indexes, variant, threads, caption_search)
    cores = os.cpu_count() or 1
    slots = slots or max(1, cores // (threads or cores))
    service = Service(served=served, slots=slots, metrics=Metrics(served), budget=DecodeBudget(decode_memory))
    if warmup:
        warm_up(served)

    app = FastAPI(
        title="clipdistill search",
        version="1",
        description=(
            "Text-to-image and image-to-image search over clipdistill indexes. "
            f"Limits: text 1-{MAX_TEXT_CHARS} characters, k 1-{MAX_K}, images ({', '.join(ACCEPTED_FORMATS)}) "
            f"up to 10 MB and {MAX_IMAGE_PIXELS // 1_000_000} megapixels. Errors are JSON {{'detail': '...'}}."
        ),
        # FastAPI's own /docs page loads Swagger UI from a CDN, so it is blank on the offline
        # and edge machines this service is for; /docs below serves the same UI from the
        # swagger-ui-bundle package instead. ReDoc has no packaged copy, so it is off.
        docs_url=None,
        redoc_url=None,
    )
    app.state.indexes = served
    app.state.slots = slots
    app.state.metrics = service.metrics
    app.state.service = service
    app.add_middleware(
        ServiceMiddleware, metrics=service.metrics, allowed_hosts=allowed_hosts, body_timeout=body_timeout
    )

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": error_text(error)}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, error: Exception) -> JSONResponse:  # a bug, still JSON
        return JSONResponse({"detail": f"internal error: {type(error).__name__}"}, status_code=500)

    add_search_route(app, service)
    add_info_routes(app, service)
    add_image_route(app, service)
    add_page_routes(app)
    return app
