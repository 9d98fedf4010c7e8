"""The service's limits and fixed settings, in one place so the schemas, the input checks and
the API description quote the same numbers."""

from __future__ import annotations

import re
from pathlib import Path

STATIC_DIR = Path(__file__).parent.parent / "static"
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

# The image formats a query may be in, with the MIME types the web page's file picker
# advertises (static/index.html accept=): the training formats (data/folder.py) plus GIF.
# Only these are decoded; Pillow's other decoders (EPS via Ghostscript, TIFF, DDS, IM, ...)
# are never reached, which also keeps their exception types out of the request path.
ACCEPTED_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}
DECODE_MEMORY_BYTES = 512 * 1024 * 1024  # decoded query pixels held at once (DecodeBudget), all requests together
BODY_TIMEOUT_SECONDS = 30.0  # the whole request body must arrive within this (slow-upload guard)
MAX_THUMB_BYTES = 4 * 1024 * 1024  # a thumbnail file larger than this is not served (ours are a few kB)
# /metrics labels requests by method; anything else a client sends counts as "other", so a
# client cannot grow the label set (one time series per distinct value) without bound.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
