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
below is checked before any model work, the request body is capped before it is read (and must
arrive within ``body_timeout``), and an image's format (JPEG, PNG, WebP, GIF only) and pixel
count are read from its header before it is decoded; every decoder failure is a 415.

Concurrency (checked, not assumed): onnxruntime's ``InferenceSession.run`` and a FAISS index's
``search`` may be called from several threads at once, and the tokenizers only read shared
state (the BPE cache is a thread-safe, bounded ``functools.lru_cache``), so one
:class:`Searcher` serves many threads; the caption index is built at start-up, so no request
builds anything. What would hurt is oversubscription: by default each onnxruntime session uses
every core, so N concurrent queries would run N x cores spinning threads. The app therefore
opens its sessions with one intra-op thread each (``threads=1``) and runs searches on an
executor of ``slots`` threads (default: the core count): decoding, encoding and searching
happen there, and decoded pixels are further bounded by a byte budget (``decode_memory``)
shared by all requests. Waiting searches queue on that executor, not on the event loop or
Starlette's thread pool, so ``/healthz``, ``/metrics``, ``/indexes`` and ``/images`` keep
answering. Requests whose ``Host`` is not an allowed name are refused (DNS rebinding).

The package is split by job: ``limits`` (the numbers), ``schemas`` (pydantic models),
``served_index``, ``metrics``, ``guard`` (Host check, body cap and deadline, route metrics),
``inputs`` (request parsing and decoding), ``budget`` (the decode memory budget),
``thumbnails`` (reading a thumbnail without following links), ``routes`` (the route groups),
``factory`` (``create_app``) and ``options`` (CLI parsing).
"""

from clipdistill.serve.app.factory import create_app
from clipdistill.serve.app.inputs import check_image_id, decode_b64, decode_image
from clipdistill.serve.app.limits import (
    INDEX_NAME,
    MAX_BODY_BYTES,
    MAX_IMAGE_B64_CHARS,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    MAX_K,
    MAX_TEXT_CHARS,
)
from clipdistill.serve.app.options import allowed_hosts, default_index_name, parse_index_option
from clipdistill.serve.app.schemas import SearchHit, SearchParams, SearchRequest, SearchResponse
from clipdistill.serve.app.served_index import ServedIndex

__all__ = [
    "INDEX_NAME",
    "MAX_BODY_BYTES",
    "MAX_IMAGE_B64_CHARS",
    "MAX_IMAGE_BYTES",
    "MAX_IMAGE_PIXELS",
    "MAX_K",
    "MAX_TEXT_CHARS",
    "SearchHit",
    "SearchParams",
    "SearchRequest",
    "SearchResponse",
    "ServedIndex",
    "allowed_hosts",
    "check_image_id",
    "create_app",
    "decode_b64",
    "decode_image",
    "default_index_name",
    "parse_index_option",
]
