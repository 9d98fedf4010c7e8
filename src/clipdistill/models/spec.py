"""One parser for model specs: ``schema:identifier``.

Every CLI flag and config key that names a model takes one of these strings, so a teacher
from open_clip's zoo, a Hugging Face CLIP, an open_clip folder on disk and a clipdistill run
are all named the same way (open_clip's own ``hf-hub:``/``local-dir:`` convention, extended).
Parsing is separate from loading so a typo is caught before anything heavy is imported.

The schemas and their syntax lines are the registered teacher kinds
(:mod:`clipdistill.models.kinds`); this module checks a string against them. ``ModelSpec``,
``ModelSpecError`` and ``close_matches`` live in the registry module (the loaders raise the
error without importing the parser) and are exported here, where callers have always found them.
"""

from __future__ import annotations

from clipdistill.models.kinds import ModelSpec, ModelSpecError, close_matches, fusion_kinds, get_kind, kind_syntax

__all__ = ["ModelSpec", "ModelSpecError", "close_matches", "parse_fusion_spec", "parse_spec"]


def parse_spec(spec: str | ModelSpec) -> ModelSpec:
    """Parse ``schema:identifier`` (schema required) into a :class:`ModelSpec`.

    Only the syntax is checked here; :func:`clipdistill.models.teachers.load_model` checks
    that the name exists (open_clip's model list, the path on disk) with close-match hints.
    """
    if isinstance(spec, ModelSpec):
        return spec
    text = spec.strip()
    if ":" not in text:
        raise ModelSpecError(f"model spec {spec!r} has no schema; write it as SCHEMA:NAME, one of:\n  " + kind_syntax())
    schema, identifier = text.split(":", 1)
    schema = schema.strip().lower()
    syntax = get_kind(schema, spec=spec).syntax
    if not identifier:
        raise ModelSpecError(f"model spec {spec!r} has an empty name after {schema + ':'!r}; {syntax}")
    if schema == "openclip":
        name, _, pretrained = identifier.partition("@")
        if not name:
            raise ModelSpecError(f"model spec {spec!r} has no model name before '@'; {syntax}")
        return ModelSpec(schema, name, pretrained or None)
    if schema == "hf-hub" and identifier.count("/") != 1:
        raise ModelSpecError(f"model spec {spec!r}: hf-hub needs exactly ORG/REPO, got {identifier!r}")
    return ModelSpec(schema, identifier)


def parse_fusion_spec(spec: str | ModelSpec) -> ModelSpec:
    """Parse a fusion-teacher spec; a dual-encoder spec here is an error naming the valid ones."""
    parsed = parse_spec(spec)
    if not get_kind(parsed.schema).fusion:
        raise ModelSpecError(
            f"{str(parsed)!r} names a dual encoder, not a fusion teacher; a fusion teacher spec is one of:\n  "
            + kind_syntax(fusion_kinds())
        )
    return parsed
