"""The teacher-kind registry: spec schema -> what that kind of model is and how it loads.

The timm pattern (``timm/models/_registry.py``), as the method registry has it
(:mod:`clipdistill.distill.registry`): this module holds the table and the functions that read
it, and imports no loader. The entries, one per schema (``openclip:``, ``hf-hub:``,
``local-dir:``, ``hf:``, ``run:``, ``lit:``, ``blip-itm:``, ``fusion:``), are registered by
:mod:`clipdistill.models.teacher_kinds`, which ``clipdistill/models/__init__.py`` imports, so
every ``clipdistill.models`` module sees them all (Python initialises the package first).

It sits at the bottom of ``models/``: the parser (:mod:`clipdistill.models.spec`) reads each
kind's syntax line from here, and every loader raises the spec error defined here, so the
parsed spec, its error and the close-match helper live here too (``spec.py`` exports them, as
before). Adding a kind is one :class:`TeacherKind` entry: its syntax line, its loader, its weight
files for the fingerprint and when it has random weights, nothing else to edit.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipdistill.errors import UserError


class ModelSpecError(UserError, ValueError):
    """A model spec that cannot be parsed or names nothing that exists."""


@dataclass(frozen=True)
class ModelSpec:
    """A parsed spec. ``pretrained`` is only set by the ``openclip`` schema (``NAME@TAG``)."""

    schema: str
    name: str
    pretrained: str | None = None

    def __str__(self) -> str:
        if self.pretrained:
            return f"{self.schema}:{self.name}@{self.pretrained}"
        return f"{self.schema}:{self.name}"


def close_matches(word: str, candidates: list[str] | tuple[str, ...], n: int = 3) -> list[str]:
    """Close matches for an error message; case-insensitive so 'vit-b-32' finds 'ViT-B-32'."""
    lowered = {candidate.lower(): candidate for candidate in candidates}
    return [lowered[match] for match in difflib.get_close_matches(word.lower(), list(lowered), n=n, cutoff=0.5)]


def never_random(spec: ModelSpec) -> str | None:
    """The random-weights rule of a kind whose specs always name trained weights."""
    return None


@dataclass(frozen=True)
class TeacherKind:
    """One schema of model spec and everything that differs between schemas.

    ``syntax`` is the help line every spec error lists (it starts with ``NAME:``). ``load`` builds
    the model (a ``DualEncoder``; for a fusion kind the frozen fusion teacher) from the parsed
    spec; ``load_weights=False`` gives the same architecture with random weights where the kind
    can build one. ``weight_files`` gives the files whose hash is the teacher's fingerprint, or
    ``None`` where the spec itself names fixed weights (a zoo name, a hub id). ``random_weights``
    says why the spec would load with random weights, or ``None``, from the spec and file names
    alone. Pixels are not a field: every model resizes and normalises them itself
    (``prepare_pixels``), whatever its kind."""

    name: str
    syntax: str
    load: Callable[..., Any]
    weight_files: Callable[[ModelSpec], list[Path] | None]
    random_weights: Callable[[ModelSpec], str | None] = never_random
    fusion: bool = False


_REGISTRY: dict[str, TeacherKind] = {}


def register_kind(kind: TeacherKind) -> TeacherKind:
    """Enter ``kind`` under its name, checked here so a bad entry fails at import: a lower-case
    name not taken yet and a syntax line that starts with ``NAME:``."""
    if not kind.name or kind.name != kind.name.lower() or ":" in kind.name:
        raise ValueError(f"teacher kind name {kind.name!r} must be a non-empty lower-case schema without ':'")
    if not kind.syntax.startswith(f"{kind.name}:"):
        raise ValueError(f"teacher kind {kind.name!r}: its syntax line must start with {kind.name + ':'!r}")
    if kind.name in _REGISTRY:
        raise ValueError(f"teacher kind {kind.name!r} is registered already")
    _REGISTRY[kind.name] = kind
    return kind


def unregister_kind(name: str) -> None:
    """Remove a registered kind (tests that register a throwaway kind clean up with it)."""
    _REGISTRY.pop(name, None)


def list_kinds() -> list[str]:
    """Registered schemas in registration order (the order spec errors list them)."""
    return list(_REGISTRY)


def kind_syntax(names: list[str] | tuple[str, ...] | None = None) -> str:
    """The syntax lines of ``names`` (default: every kind), one per line, indented as spec errors
    print them."""
    return "\n  ".join(_REGISTRY[name].syntax for name in (list_kinds() if names is None else names))


def fusion_kinds() -> list[str]:
    """The schemas naming a single-stream fusion teacher (scores an image-caption pair jointly),
    not a dual encoder: they go in the ``teacher.fusion`` key, never where a dual encoder is
    expected."""
    return [name for name, kind in _REGISTRY.items() if kind.fusion]


def get_kind(name: str, *, spec: str | None = None) -> TeacherKind:
    """The kind registered as ``name``; an unknown one is a :class:`ModelSpecError` naming the
    spec it came from, the close matches and every valid syntax."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    hint = close_matches(name, list_kinds())
    did_you_mean = f" Did you mean {', '.join(repr(h + ':') for h in hint)}?" if hint else ""
    where = f" in spec {spec!r}" if spec is not None else ""
    raise ModelSpecError(f"unknown model schema {name!r}{where}.{did_you_mean} Valid specs:\n  {kind_syntax()}")
