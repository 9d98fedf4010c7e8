"""One parser for model specs: ``schema:identifier``.

Every CLI flag and config key that names a model takes one of these strings, so a teacher
from open_clip's zoo, a Hugging Face CLIP, an open_clip folder on disk and a clipdistill run
are all named the same way (open_clip's own ``hf-hub:``/``local-dir:`` convention, extended).
Parsing is separate from loading so a typo is caught before anything heavy is imported.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from clipdistill.errors import UserError

SCHEMAS: dict[str, str] = {
    "openclip": "openclip:NAME@PRETRAINED  (open_clip zoo, e.g. openclip:ViT-B-32@laion2b_s34b_b79k)",
    "hf-hub": "hf-hub:ORG/REPO  (an open_clip model on the Hugging Face hub)",
    "local-dir": "local-dir:PATH  (an open_clip folder: open_clip_config.json + weights)",
    "hf": "hf:ID_OR_PATH  (a transformers CLIPModel, e.g. hf:openai/clip-vit-base-patch32)",
    "run": "run:PATH  (a clipdistill checkpoint or run folder)",
    "lit": "lit:WEIGHTS[@SIZE]  (LiT teacher to train: ImageNet trunk + MiniLM, e.g. lit:efficientnet-lite2@260)",
    "blip-itm": "blip-itm:ID_OR_PATH  (fusion teacher: BLIP ITM, e.g. blip-itm:Salesforce/blip-itm-base-coco)",
    "fusion": "fusion:PATH  (fusion teacher: a folder written by `clipdistill teacher train-fusion`)",
}
#: Schemas naming a single-stream fusion teacher (scores an image-caption pair jointly), not a
#: dual encoder: they go in the ``teacher.fusion`` key, never where a dual encoder is expected.
FUSION_SCHEMAS = ("blip-itm", "fusion")


class ModelSpecError(UserError, ValueError):
    """A model spec that cannot be parsed or names nothing that exists."""


@dataclass(frozen=True)
class ModelSpec:
    """A parsed spec. ``pretrained`` is only used by the ``openclip`` schema."""

    schema: str
    name: str
    pretrained: str | None = None

    def __str__(self) -> str:
        if self.schema == "openclip" and self.pretrained:
            return f"openclip:{self.name}@{self.pretrained}"
        return f"{self.schema}:{self.name}"


def close_matches(word: str, candidates: list[str] | tuple[str, ...], n: int = 3) -> list[str]:
    """Close matches for an error message; case-insensitive so 'vit-b-32' finds 'ViT-B-32'."""
    lowered = {candidate.lower(): candidate for candidate in candidates}
    return [lowered[match] for match in difflib.get_close_matches(word.lower(), list(lowered), n=n, cutoff=0.5)]


def _unknown_schema(spec: str, schema: str) -> ModelSpecError:
    hint = close_matches(schema, list(SCHEMAS))
    did_you_mean = f" Did you mean {', '.join(repr(h + ':') for h in hint)}?" if hint else ""
    valid = "\n  ".join(SCHEMAS.values())
    return ModelSpecError(f"unknown model schema {schema!r} in spec {spec!r}.{did_you_mean} Valid specs:\n  {valid}")


def parse_spec(spec: str | ModelSpec) -> ModelSpec:
    """Parse ``schema:identifier`` (schema required) into a :class:`ModelSpec`.

    Only the syntax is checked here; :func:`clipdistill.models.teachers.load_model` checks
    that the name exists (open_clip's model list, the path on disk) with close-match hints.
    """
    if isinstance(spec, ModelSpec):
        return spec
    text = spec.strip()
    if ":" not in text:
        raise ModelSpecError(
            f"model spec {spec!r} has no schema; write it as SCHEMA:NAME, one of:\n  " + "\n  ".join(SCHEMAS.values())
        )
    schema, identifier = text.split(":", 1)
    schema = schema.strip().lower()
    if schema not in SCHEMAS:
        raise _unknown_schema(spec, schema)
    if not identifier:
        raise ModelSpecError(f"model spec {spec!r} has an empty name after {schema + ':'!r}; {SCHEMAS[schema]}")
    if schema == "openclip":
        name, _, pretrained = identifier.partition("@")
        if not name:
            raise ModelSpecError(f"model spec {spec!r} has no model name before '@'; {SCHEMAS[schema]}")
        return ModelSpec(schema, name, pretrained or None)
    if schema == "hf-hub" and identifier.count("/") != 1:
        raise ModelSpecError(f"model spec {spec!r}: hf-hub needs exactly ORG/REPO, got {identifier!r}")
    return ModelSpec(schema, identifier)


def parse_fusion_spec(spec: str | ModelSpec) -> ModelSpec:
    """Parse a fusion-teacher spec; a dual-encoder spec here is an error naming the valid ones."""
    parsed = parse_spec(spec)
    if parsed.schema not in FUSION_SCHEMAS:
        valid = "\n  ".join(SCHEMAS[s] for s in FUSION_SCHEMAS)
        raise ModelSpecError(
            f"{str(parsed)!r} names a dual encoder, not a fusion teacher; a fusion teacher spec is one of:\n  {valid}"
        )
    return parsed
