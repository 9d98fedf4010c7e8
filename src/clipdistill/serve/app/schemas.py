"""The API's request and response models (pydantic), which also make the OpenAPI schema."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from clipdistill.serve.app.limits import MAX_IMAGE_B64_CHARS, MAX_K, MAX_TEXT_CHARS


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
