"""The method registry: name -> method class, and what is derived from the classes' metadata.

The timm pattern (``timm/models/_registry.py``): this module holds the table and the functions
that read it, and imports no method. Each method file registers its class with
:func:`register_method`; ``distill/methods/__init__.py`` imports every method file (one line per
method) and re-exports these functions, so ``from clipdistill.distill.methods import
list_methods`` sees them all. Nothing here imports back from a method or from the methods
package, so the registry sits below them in the import graph.

Everything that would otherwise restate the method list by hand (the demo's method list, which
methods get the fusion teacher, the tuned arguments, the report's method lines, the scratch row)
is read from the classes here: adding a method is its file and one import line.
"""

from __future__ import annotations

import difflib
from typing import Any

from clipdistill.distill.base import NEEDS, DistillMethod, MethodConfigError, build_method_args

_REGISTRY: dict[str, type[DistillMethod]] = {}


def register_method(cls: type[DistillMethod]) -> type[DistillMethod]:
    """Class decorator: check the class's metadata and enter it under ``cls.name``.

    Checked here, at import, so a bad method fails before any run: a name, a summary (its line
    in ``report.md``), known needs, tuned arguments that its ``Args`` accepts, and at most one
    baseline (the report's scratch row)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no 'name'")
    if not cls.summary:
        raise ValueError(f"{cls.__name__} has no 'summary' (its one-line description in report.md)")
    unknown = (set(cls.needs) | set(cls.optional_needs)) - set(NEEDS)
    if unknown:
        raise ValueError(f"{cls.__name__}.needs has unknown entries {sorted(unknown)}; valid: {NEEDS}")
    if cls.tuned is not None:
        if not cls.tuned.chosen_by:
            raise ValueError(f"{cls.__name__}.tuned does not say where its values were chosen ('chosen_by')")
        build_method_args(cls, dict(cls.tuned.values))  # a stale or mistyped key fails at import
    if cls.baseline:
        others = [name for name, known in _REGISTRY.items() if known.baseline and name != cls.name]
        if others:
            raise ValueError(f"{cls.__name__} is a baseline but {others[0]!r} already is; a report has one scratch row")
    _REGISTRY[cls.name] = cls
    return cls


def unregister_method(name: str) -> None:
    """Remove a registered method (tests that register a throwaway method clean up with it)."""
    _REGISTRY.pop(name, None)


def list_methods() -> list[str]:
    """Registered method names in registration order (the methods package imports the seed
    methods baseline first, then by increasing use of the teachers: the demo's and the report's
    order)."""
    return list(_REGISTRY)


def get_method(name: str) -> type[DistillMethod]:
    """The class registered as ``name``; an unknown name is an error naming key 'method' and the
    closest registered name."""
    if name not in _REGISTRY:
        names = list_methods()
        hint = difflib.get_close_matches(name, names, n=1)
        raise MethodConfigError(
            f"unknown method {name!r} (key 'method'); available: {', '.join(sorted(names))}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
        )
    return _REGISTRY[name]


def fusion_methods() -> list[str]:
    """The methods that read the single-stream fusion teacher (needed or optional)."""
    return [name for name, cls in _REGISTRY.items() if "fusion" in cls.teachers()]


def baseline_method() -> str | None:
    """The no-teacher baseline, the "scratch" row every distilled method is compared with."""
    return next((name for name, cls in _REGISTRY.items() if cls.baseline), None)


#: The variant every method has: its paper's arguments (the defaults of its ``Args``).
PAPER_VARIANT = "paper"


def method_variants(name: str) -> dict[str, dict[str, Any]]:
    """A method's named argument sets: ``paper`` (its ``Args`` defaults, no values to add) and,
    where a val sweep chose otherwise, ``tuned`` (``DistillMethod.tuned``). The one place both
    live is the method's class; configs name a variant as ``NAME:VARIANT``."""
    cls = get_method(name)
    variants: dict[str, dict[str, Any]] = {PAPER_VARIANT: {}}
    if cls.tuned is not None:
        variants["tuned"] = dict(cls.tuned.values)
    return variants


def resolve_method_entry(entry: str, default_variant: str = PAPER_VARIANT) -> tuple[str, str, dict[str, Any]]:
    """``NAME`` or ``NAME:VARIANT`` -> (name, variant, its argument values).

    A variant named explicitly must exist (the error lists the method's variants). A plain name
    trains ``default_variant`` where the method has it and ``paper`` where it has not: a method
    whose paper values won the val sweep has no ``tuned`` variant because it needs none."""
    name, _, variant = entry.strip().partition(":")
    variants = method_variants(name)
    if variant:
        if variant not in variants:
            raise MethodConfigError(
                f"method {name!r} has no variant {variant!r} (in {entry!r}); its variants: {', '.join(variants)}"
            )
        return name, variant, variants[variant]
    chosen = default_variant if default_variant in variants else PAPER_VARIANT
    return name, chosen, variants[chosen]


def tuned_method_args() -> dict[str, dict[str, Any]]:
    """Per method with tuned arguments: the values the demo trains it with."""
    return {name: dict(cls.tuned.values) for name, cls in _REGISTRY.items() if cls.tuned is not None}


def method_summaries() -> dict[str, str]:
    """Per method: its one-line summary (``report.md``'s method list)."""
    return {name: cls.summary for name, cls in _REGISTRY.items()}
