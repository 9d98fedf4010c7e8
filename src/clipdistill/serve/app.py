"""The HTTP search service: FastAPI over one or more :class:`Searcher` index folders.

``create_app({"emoji": Path("runs/index")})`` builds the app (tests run it in-process);
``clipdistill serve`` runs it under uvicorn. Routes (documented at ``/docs`` and
``/openapi.json``)::

    POST /search            JSON {text | image_b64, k, index, target} or multipart (image file)
    GET  /indexes           names, sizes, model spec of the served indexes
    GET  /images/{id}       a hit's thumbnail, from the index's own thumbnail store only
    GET  /healthz           liveness
    GET  /metrics           prometheus text: request counts, per-stage latency histograms
    GET  /                  the web page (static/index.html, app.js, style.css)

Bad input is a 4xx whose JSON ``detail`` is one readable sentence, never a 500: every limit
below is checked before any model work, the request body is capped before it is read, and an
image's pixel count is read from its header before it is decoded.

Concurrency (checked, not assumed): onnxruntime's ``InferenceSession.run`` and a FAISS index's
``search`` may be called from several threads at once, and the tokenizers only read shared
state (the BPE cache is a dict filled under the GIL), so one :class:`Searcher` serves many
threads. What is not safe is building the lazy caption index twice at once: that has its own
lock. What would hurt is oversubscription: by default each onnxruntime session uses every
core, so N concurrent queries would run N x cores spinning threads. The app therefore opens
its sessions with one intra-op thread each (``threads=1``) and lets at most ``slots`` queries
(default: the core count) encode and search at a time; parsing, base64 and image decoding
run outside that bound.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import threading
import time
import unicodedata
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool
from swagger_ui_bundle import swagger_ui_path

from clipdistill.serve.index import THUMBS_DIR
from clipdistill.serve.search import Searcher

STATIC_DIR = Path(__file__).parent / "static"
MAX_TEXT_CHARS = 1000
MAX_K = 100
MAX_IMAGE_BYTES = 10 * 1024 * 1024  # 10 MB (MiB) of encoded image
MAX_IMAGE_PIXELS = 40_000_000  # 40 megapixels, read from the header before decoding
MAX_IMAGE_B64_CHARS = 4 * (MAX_IMAGE_BYTES // 3 + 1) + 200  # base64 of the largest image + a data: URL prefix
MAX_BODY_BYTES = MAX_IMAGE_B64_CHARS + 64 * 1024  # the largest valid JSON or multipart body
MAX_ID_CHARS = 512
INDEX_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
CAPTION_BATCH = 256


# ----------------------------------------------------------------------------- API models


class SearchParams(BaseModel):
    """The query fields shared by the JSON and the multipart form of ``POST /search``."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(
        None, min_length=1, max_length=MAX_TEXT_CHARS, description=f"Text query, 1 to {MAX_TEXT_CHARS} characters."
    )
    k: int = Field(10, ge=1, le=MAX_K, description=f"Number of hits, 1 to {MAX_K}.")
    index: str | None = Field(None, description="Index name (GET /indexes); default: the first one served.")
    target: Literal["image", "text"] = Field(
        "image", description="Rank the indexed images (image) or their captions (text)."
    )

    @model_validator(mode="after")
    def _text_not_blank(self) -> SearchParams:
        if self.text is not None and not self.text.strip():
            raise ValueError("text is empty (only whitespace)")
        return self


class SearchRequest(SearchParams):
    """``POST /search`` as JSON: exactly one of ``text`` and ``image_b64``."""

    image_b64: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_IMAGE_B64_CHARS,
        description="Query image, base64 (a data: URL is accepted); at most 10 MB and 40 megapixels decoded.",
    )

    @model_validator(mode="after")
    def _exactly_one_query(self) -> SearchRequest:
        if (self.text is None) == (self.image_b64 is None):
            raise ValueError("give exactly one of text and image_b64 (got " + ("both)" if self.text else "neither)"))
        return self


class SearchHit(BaseModel):
    id: str
    score: float
    caption: str
    image_url: str | None = Field(description="Thumbnail URL (GET /images/{id}); null when the index has none.")


class Timing(BaseModel):
    encode: float = Field(description="Decoding + preprocessing + the encoder, ms.")
    search: float = Field(description="Nearest-neighbour search + metadata lookup, ms.")
    total: float = Field(description="The whole request inside the app (parsing, waiting for a free slot too), ms.")


class SearchResponse(BaseModel):
    hits: list[SearchHit]
    timing_ms: Timing
    index: str
    target: str
    query: Literal["text", "image"]


class IndexInfo(BaseModel):
    name: str
    default: bool
    count: int
    dim: int
    factory: str
    model: str
    variant: str
    dataset: str | None
    created: str | None


class ErrorBody(BaseModel):
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in (
        (400, "Undecodable base64, a malformed multipart body, or a path in an image id"),
        (404, "Unknown index or image id"),
        (413, "Body, image bytes or image pixels over the limits"),
        (415, "Not an image, or a content type other than JSON / multipart"),
        (422, "A field out of range: text length, k, target, index, neither or both queries"),
    )
}


# ----------------------------------------------------------------------------- served indexes


@dataclass
class ServedIndex:
    """One index folder behind a name: the Searcher plus what the routes look up."""

    name: str
    searcher: Searcher
    variant: str
    rows: dict[str, int] = field(default_factory=dict)  # image id -> metadata row
    thumbs: list[Path | None] = field(default_factory=list)  # row -> thumbnail inside the store
    ids: list[str] = field(default_factory=list)  # row -> image id
    captions: list[str] = field(default_factory=list)
    _caption_index: Any = None
    _caption_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, name: str, searcher: Searcher, variant: str) -> ServedIndex:
        served = cls(name=name, searcher=searcher, variant=variant)
        metadata = searcher.metadata
        store = (searcher.directory / THUMBS_DIR).resolve()
        thumbs = metadata["thumbnail"] if "thumbnail" in metadata else [None] * len(metadata)
        for row, (image_id, thumb) in enumerate(zip(metadata["id"], thumbs, strict=True)):
            served.rows.setdefault(str(image_id), row)
            path = (searcher.directory / thumb).resolve() if isinstance(thumb, str) and thumb else None
            # only files inside INDEX_DIR/thumbs are ever served, whatever the metadata says
            served.thumbs.append(path if path is not None and path.is_relative_to(store) else None)
        served.ids = [str(i) for i in metadata["id"]]
        served.captions = [str(c) for c in metadata["caption"]]
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

    def caption_index(self) -> Any:
        """A flat inner-product index over the captions' text embeddings, built once on first
        use (the index folder stores image vectors only)."""
        with self._caption_lock:
            if self._caption_index is None:
                self._caption_index = self._build_caption_index()
        return self._caption_index

    def _build_caption_index(self) -> Any:
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
        ann = self.searcher.index if target == "image" else self.caption_index()
        scores, rows = ann.search(np.ascontiguousarray(vector, dtype=np.float32), min(k, ann.ntotal))
        return [self.hit(int(row), float(score)) for score, row in zip(scores[0], rows[0], strict=True) if row >= 0]

    def hit(self, row: int, score: float) -> SearchHit:
        image_id = self.ids[row]
        url = f"/images/{quote(image_id, safe='')}?index={quote(self.name, safe='')}" if self.thumbs[row] else None
        return SearchHit(id=image_id, score=round(float(score), 6), caption=self.captions[row], image_url=url)


# ----------------------------------------------------------------------------- metrics


class Metrics:
    """Prometheus metrics in an app-private registry (several apps in one process stay apart)."""

    def __init__(self, indexes: Mapping[str, ServedIndex]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "clipdistill_http_requests",
            "HTTP requests by route and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "clipdistill_http_request_seconds",
            "HTTP request latency by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "clipdistill_search_stage_seconds",
            "POST /search latency per stage (encode, search, total) and query kind.",
            ["stage", "query", "index"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.searches = Counter(
            "clipdistill_searches",
            "Successful searches by index, query kind and target.",
            ["index", "query", "target"],
            registry=self.registry,
        )
        items = Gauge("clipdistill_index_items", "Vectors in each served index.", ["index"], registry=self.registry)
        for name, served in indexes.items():
            items.labels(index=name).set(served.count)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# ----------------------------------------------------------------------------- ASGI middleware


class ServiceMiddleware:
    """Caps the request body (before and while reading it) and records per-route metrics.

    A pure ASGI middleware (no per-request task like ``BaseHTTPMiddleware``); the route label is
    the matched path template, so ``/images/{image_id}`` is one series, not one per id.
    """

    def __init__(self, app: Any, metrics: Metrics, max_body: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def send_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            length = self._content_length(scope)
            if length is not None and length > self.max_body:
                await _send_json(send_status, 413, self._too_large(length))
                return
            received = 0

            async def capped_receive() -> Any:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body:
                        raise HTTPException(413, self._too_large(received, at_least=True))
                return message

            await self.app(scope, capped_receive, send_status)
        except _BadRequest as error:
            await _send_json(send_status, 400, str(error))
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(scope.get("method", ""), label, str(status["code"])).inc()
            self.metrics.request_seconds.labels(label).observe(time.perf_counter() - started)

    def _too_large(self, size: int, at_least: bool = False) -> str:
        return (
            f"request body is {'over ' if at_least else ''}{size} bytes; the limit is {self.max_body} bytes "
            f"(images are limited to {MAX_IMAGE_BYTES // (1024 * 1024)} MB)"
        )

    @staticmethod
    def _content_length(scope: dict[str, Any]) -> int | None:
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    raise _BadRequest(f"Content-Length header {value[:40]!r} is not a number") from None
        return None


class _BadRequest(ValueError):
    pass


async def _send_json(send: Any, status: int, detail: str) -> None:
    response = JSONResponse({"detail": detail}, status_code=status)
    await response({"type": "http"}, _no_body, send)


async def _no_body() -> dict[str, Any]:  # pragma: no cover - JSONResponse never reads the request
    return {"type": "http.disconnect"}


# ----------------------------------------------------------------------------- input checks


def _error_text(error: ValidationError | RequestValidationError) -> str:
    """One sentence per problem, ``field: message``, without echoing the (maybe huge) input."""
    parts = []
    for item in error.errors():
        path = tuple(item.get("loc", ()))
        if isinstance(error, RequestValidationError) and path and path[0] in ("body", "query", "path"):
            path = path[1:]
        loc = ".".join(str(p) for p in path)
        message = str(item.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{loc}: {message}" if loc else message)
    return "; ".join(parts) or "invalid request"


def _validation_error(error: ValidationError | RequestValidationError) -> HTTPException:
    return HTTPException(422, _error_text(error))


def decode_b64(value: str) -> bytes:
    """Bytes of a base64 string or a ``data:...;base64,`` URL; 400 when it is not base64."""
    payload = value.strip()
    if payload.startswith("data:"):
        header, sep, payload = payload.partition(",")
        if not sep or not header.endswith(";base64"):
            raise HTTPException(400, "image_b64 is a data: URL without ';base64,' data")
    payload = "".join(payload.split())
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise HTTPException(400, f"image_b64 is not valid base64 ({error})") from None
    if not data:
        raise HTTPException(422, "image_b64 decodes to no bytes")
    return data


def decode_image(data: bytes) -> Any:
    """An RGB PIL image from encoded bytes, checking the byte and pixel limits first."""
    from PIL import Image, UnidentifiedImageError

    from clipdistill.serve.preprocess import to_rgb

    if len(data) > MAX_IMAGE_BYTES:
        raise HTTPException(413, f"image is {len(data)} bytes; the limit is {MAX_IMAGE_BYTES} bytes (10 MB)")
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise HTTPException(
                    413,
                    f"image is {width}x{height} = {width * height / 1e6:.1f} megapixels; "
                    f"the limit is {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels",
                )
            image.load()
            return to_rgb(image)
    except Image.DecompressionBombError as error:
        raise HTTPException(
            413, f"image is over the limit of {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels ({error})"
        ) from None
    except UnidentifiedImageError:
        raise HTTPException(415, "the uploaded data is not an image (Pillow cannot identify its format)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise HTTPException(415, f"the image cannot be decoded (truncated or corrupt): {error}") from None


def check_image_id(image_id: str) -> None:
    """400 for ids that try to be paths (``..``, absolute, backslashes, control characters)."""
    if not image_id or len(image_id) > MAX_ID_CHARS:
        raise HTTPException(400, f"image id must be 1 to {MAX_ID_CHARS} characters")
    if any(unicodedata.category(c).startswith("C") for c in image_id):
        raise HTTPException(400, "image id contains control characters")
    parts = image_id.replace("\\", "/").split("/")
    if "\\" in image_id or image_id.startswith("/") or ".." in parts or (len(parts[0]) == 2 and parts[0][1] == ":"):
        raise HTTPException(400, f"image id {image_id[:80]!r} looks like a path; ids are looked up, never joined")


# ----------------------------------------------------------------------------- the app


@dataclass
class _Query:
    params: SearchParams
    text: str | None
    image: bytes | None


def create_app(
    indexes: Mapping[str, str | Path | Searcher],
    *,
    variant: str = "fp32",
    threads: int | None = 1,
    slots: int | None = None,
    warmup: bool = True,
) -> FastAPI:
    """The service over ``{name: index folder or opened Searcher}``; the first is the default.

    Every index is opened (and checked against its manifest) here, so a bad folder fails at
    start-up, not on the first query. ``threads``: onnxruntime intra-op threads per session
    (None: all cores); ``slots``: queries encoded and searched at once (default: cores divided
    by ``threads``). ``warmup`` runs one text and one image query per index so the first real
    request does not pay onnxruntime's lazy initialisation.
    """
    if not indexes:
        raise ValueError("create_app needs at least one index")
    served: dict[str, ServedIndex] = {}
    for name, source in indexes.items():
        if not INDEX_NAME.match(name):
            raise ValueError(f"index name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
        searcher = source if isinstance(source, Searcher) else Searcher.open(source, variant=variant, threads=threads)
        served[name] = ServedIndex.load(name, searcher, searcher.encoders.variant)
    default = next(iter(served))
    cores = os.cpu_count() or 1
    slots = slots or max(1, cores // (threads or cores))
    model_slots = threading.BoundedSemaphore(slots)
    metrics = Metrics(served)

    if warmup:
        from PIL import Image

        for index in served.values():
            index.searcher.search(text="warm up", k=1)
            index.searcher.search(image=Image.new("RGB", (32, 32), "white"), k=1)

    app = FastAPI(
        title="clipdistill search",
        version="1",
        description=(
            "Text-to-image and image-to-image search over clipdistill indexes. "
            f"Limits: text 1-{MAX_TEXT_CHARS} characters, k 1-{MAX_K}, images up to 10 MB and "
            f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels. Errors are JSON {{'detail': '...'}}."
        ),
        # FastAPI's own /docs page loads Swagger UI from a CDN, so it is blank on the offline
        # and edge machines this service is for; /docs below serves the same UI from the
        # swagger-ui-bundle package instead. ReDoc has no packaged copy, so it is off.
        docs_url=None,
        redoc_url=None,
    )
    app.state.indexes = served
    app.state.slots = slots
    app.state.metrics = metrics
    app.add_middleware(ServiceMiddleware, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _error_text(error)}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, error: Exception) -> JSONResponse:  # a bug, still JSON
        return JSONResponse({"detail": f"internal error: {type(error).__name__}"}, status_code=500)

    def lookup(name: str | None, status: int) -> ServedIndex:
        if name is None:
            return served[default]
        if name not in served:
            raise HTTPException(status, f"unknown index {name[:80]!r}; served: {', '.join(served)}")
        return served[name]

    async def parse(request: Request) -> _Query:
        content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if content_type == "multipart/form-data":
            return await parse_form(request)
        if content_type not in ("application/json", ""):
            raise HTTPException(
                415, f"content type {content_type[:80]!r} is not accepted; send application/json or multipart/form-data"
            )
        body = await request.body()
        try:
            parsed = SearchRequest.model_validate_json(body)
        except ValidationError as error:
            raise _validation_error(error) from None
        image = await run_in_threadpool(decode_b64, parsed.image_b64) if parsed.image_b64 is not None else None
        return _Query(params=parsed, text=parsed.text, image=image)

    async def parse_form(request: Request) -> _Query:
        form = await request.form(max_files=1, max_fields=8, max_part_size=64 * 1024)
        fields: dict[str, Any] = {}
        upload = None
        for key, value in form.multi_items():
            if isinstance(value, str):
                if key in fields:
                    raise HTTPException(422, f"form field {key[:40]!r} is given twice")
                if value != "":  # an empty form field means "not given"
                    fields[key] = value
            elif key != "image":
                raise HTTPException(422, f"upload the image file as the form field 'image', not {key[:40]!r}")
            else:
                upload = value
        try:
            params = SearchParams.model_validate(fields)
        except ValidationError as error:
            raise _validation_error(error) from None
        image = None
        if upload is not None:
            image = await upload.read(MAX_IMAGE_BYTES + 1)
            await upload.close()
            if not image:
                raise HTTPException(422, "image: the uploaded file is empty")
        if (params.text is None) == (image is None):
            raise HTTPException(
                422, "give exactly one of text and an image file (got " + ("both)" if params.text else "neither)")
            )
        return _Query(params=params, text=params.text, image=image)

    def run_search(index: ServedIndex, query: _Query) -> tuple[list[SearchHit], float, float]:
        """(hits, encode seconds, search seconds); the wait for a slot counts in neither."""
        started = time.perf_counter()
        pil = decode_image(query.image) if query.image is not None else None
        decoded = time.perf_counter() - started
        with model_slots:
            started = time.perf_counter()
            vector = index.searcher.embed_query(text=query.text, image=pil)
            encoded = time.perf_counter()
            hits = index.search(vector, query.params.k, query.params.target)
            searched = time.perf_counter()
        return hits, decoded + encoded - started, searched - encoded

    @app.post(
        "/search",
        response_model=SearchResponse,
        responses=ERRORS,
        summary="Search an index by text or by image",
        openapi_extra={
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
        },
    )
    async def search(request: Request) -> SearchResponse:
        """JSON ``{"text": ...}`` or ``{"image_b64": ...}``, or a multipart form with the image
        file as ``image`` (plus ``k``, ``index``, ``target`` fields). ``target=image`` ranks the
        indexed images, ``target=text`` their captions; hits are indexed items either way."""
        started = time.perf_counter()
        query = await parse(request)
        index = lookup(query.params.index, 422)
        hits, encode_s, search_s = await run_in_threadpool(run_search, index, query)
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

    @app.get("/indexes", response_model=list[IndexInfo], summary="The served indexes")
    def list_indexes() -> list[IndexInfo]:
        return [index.info(name == default) for name, index in served.items()]

    @app.get("/healthz", summary="Liveness")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "indexes": {name: index.count for name, index in served.items()}}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get(
        "/images/{image_id:path}",
        summary="A hit's thumbnail",
        response_class=FileResponse,
        responses={200: {"content": {"image/jpeg": {}}}, 400: ERRORS[400], 404: ERRORS[404]},
    )
    def image(
        image_id: str,
        index: str | None = Query(None, description="Index name; default: the first."),
    ) -> FileResponse:
        """The thumbnail stored in the index folder for ``image_id``; originals are never served."""
        check_image_id(image_id)
        served_index = lookup(index, 404)
        row = served_index.rows.get(image_id)
        if row is None:
            raise HTTPException(404, f"unknown image id {image_id[:80]!r} in index {served_index.name!r}")
        path = served_index.thumbs[row]
        if path is None or not path.is_file():
            raise HTTPException(404, f"index {served_index.name!r} stores no thumbnail for {image_id[:80]!r}")
        return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600"})

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
    return app


def parse_index_option(value: str) -> tuple[str, Path]:
    """``NAME=DIR`` of ``clipdistill serve --index``."""
    name, sep, directory = value.partition("=")
    if not sep or not name or not directory:
        raise ValueError(f"--index takes NAME=DIR, got {value!r}")
    if not INDEX_NAME.match(name):
        raise ValueError(f"index name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    return name, Path(directory)


def default_index_name(directory: Path) -> str:
    """A served name for INDEX_DIR: its folder name, made URL-safe."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", directory.resolve().name).strip("-.") or "index"
    return name[:64] if INDEX_NAME.match(name[:64]) else "index"
