"""Reading a search request: JSON or multipart into a :class:`Query`, base64 and image bytes
decoded with their limits checked first, image ids checked before any lookup."""

from __future__ import annotations

import base64
import binascii
import io
import unicodedata
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from clipdistill.serve.app.budget import DecodeBudget, decode_cost
from clipdistill.serve.app.limits import ACCEPTED_FORMATS, MAX_ID_CHARS, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS
from clipdistill.serve.app.schemas import SearchParams, SearchRequest

FORMATS = ", ".join(ACCEPTED_FORMATS)


def error_text(error: ValidationError | RequestValidationError) -> str:
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
    return HTTPException(422, error_text(error))


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


def decode_image(data: bytes, *, budget: DecodeBudget | None = None, size: tuple[int, int] | None = None) -> Any:
    """An RGB PIL image from encoded bytes: byte limit, format and pixel count checked from the
    header first, then decoded inside ``budget`` (bytes of pixels held at once by all requests)
    and, given the model's ``size`` (height, width), resized to it before the budget is freed,
    exactly as the preprocessor would (bicubic), so only the small image outlives the decode.

    Every failure of the decoder is a 4xx: Pillow's decoders raise many exception types on
    corrupt input (OSError, SyntaxError, struct.error, IndexError, TypeError, ...), none of
    them a fault of the server. The body of the ``try`` blocks is Pillow calls only."""
    from PIL import Image, UnidentifiedImageError

    from clipdistill.serve.preprocess import to_rgb

    if len(data) > MAX_IMAGE_BYTES:
        raise HTTPException(413, f"image is {len(data)} bytes; the limit is {MAX_IMAGE_BYTES} bytes (10 MB)")
    try:
        image = Image.open(io.BytesIO(data), formats=list(ACCEPTED_FORMATS))  # reads the header only
    except UnidentifiedImageError:
        raise HTTPException(415, f"the uploaded data is not an image in an accepted format ({FORMATS})") from None
    except Image.DecompressionBombError as error:
        raise _bomb(error) from None
    except MemoryError:
        raise
    except Exception as error:  # a header the format's parser chokes on
        raise HTTPException(415, f"the image cannot be decoded (corrupt header): {_reason(error)}") from None
    with image:
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise HTTPException(
                413,
                f"image is {width}x{height} = {width * height / 1e6:.1f} megapixels; "
                f"the limit is {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels",
            )
        if width < 1 or height < 1:
            raise HTTPException(415, f"image is {width}x{height} pixels; it has no pixels")
        with budget.reserve(decode_cost(width, height, image.mode)) if budget else nullcontext():
            try:
                image.load()
                rgb = to_rgb(image)
                if size is not None and rgb.size != (size[1], size[0]):
                    rgb = rgb.resize((size[1], size[0]), Image.Resampling.BICUBIC)
            except Image.DecompressionBombError as error:
                raise _bomb(error) from None
            except MemoryError:
                raise
            except Exception as error:
                raise HTTPException(
                    415, f"the image cannot be decoded (truncated or corrupt): {_reason(error)}"
                ) from None
    return rgb


def _bomb(error: Exception) -> HTTPException:
    return HTTPException(413, f"image is over the limit of {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels ({error})")


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def check_image_id(image_id: str) -> None:
    """400 for ids that try to be paths (``..``, absolute, backslashes, control characters)."""
    if not image_id or len(image_id) > MAX_ID_CHARS:
        raise HTTPException(400, f"image id must be 1 to {MAX_ID_CHARS} characters")
    if any(unicodedata.category(c).startswith("C") for c in image_id):
        raise HTTPException(400, "image id contains control characters")
    parts = image_id.replace("\\", "/").split("/")
    if "\\" in image_id or image_id.startswith("/") or ".." in parts or (len(parts[0]) == 2 and parts[0][1] == ":"):
        raise HTTPException(400, f"image id {image_id[:80]!r} looks like a path; ids are looked up, never joined")


@dataclass
class Query:
    params: SearchParams
    text: str | None
    image: bytes | None


async def parse_query(request: Request) -> Query:
    """The query of a ``POST /search`` body, JSON or multipart; 415 for other content types."""
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
    return Query(params=parsed, text=parsed.text, image=image)


async def parse_form(request: Request) -> Query:
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
    return Query(params=params, text=params.text, image=image)
