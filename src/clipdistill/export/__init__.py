"""Export targets: a trained model written in a format something else runs.

``clipdistill export --format NAME`` takes its choices from the table here (the timm registry
pattern, as the methods and teacher kinds have it): ``onnx`` (both towers as ONNX graphs with
their tokenizer and preprocessing files, what ``serve/`` runs without torch:
:mod:`clipdistill.export.onnx`) and ``open_clip`` (a plain open_clip folder:
:mod:`clipdistill.export.open_clip`). Another target (CoreML, TFLite, ...) is its module in this
package and one :func:`register_target` entry below.

Exporting needs torch; serving does not, which is why this package is apart from ``serve/``.
Importing it stays cheap (the CLI reads the table for ``--help``): each entry imports its module
when it runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: ``stage(name)`` gives a context manager around one stage of an export (the CLI prints each
#: stage and its time).
Stage = Callable[[str], contextlib.AbstractContextManager[Any]]

#: The options of ``clipdistill export`` beyond ``--model``/``--out``/``--format`` that a target
#: may read (the ONNX export reads them all).
OPTIONS = ("int8", "opset", "exporter", "data", "images", "split")


@dataclass(frozen=True)
class ExportTarget:
    """One ``--format``: ``run(spec, out, stage=..., **options)`` writes the export and returns
    its record (the ONNX parity report, the open_clip folder's check); ``options`` names the
    entries of :data:`OPTIONS` it reads, so the CLI refuses a flag the format would ignore."""

    name: str
    title: str
    summary: str
    run: Callable[..., dict[str, Any]]
    options: tuple[str, ...] = ()


_REGISTRY: dict[str, ExportTarget] = {}


def register_target(target: ExportTarget) -> ExportTarget:
    """Enter ``target`` under its ``--format`` name; a taken name or an unknown option fails at import."""
    if target.name in _REGISTRY:
        raise ValueError(f"export target {target.name!r} is registered already")
    unknown = set(target.options) - set(OPTIONS)
    if unknown:
        raise ValueError(f"export target {target.name!r} reads unknown options {sorted(unknown)}; known: {OPTIONS}")
    _REGISTRY[target.name] = target
    return target


def unregister_target(name: str) -> None:
    """Remove a registered target (tests that register a throwaway target clean up with it)."""
    _REGISTRY.pop(name, None)


def list_targets() -> list[str]:
    """The ``--format`` names in registration order (the first is the CLI's default)."""
    return list(_REGISTRY)


def get_target(name: str) -> ExportTarget:
    """The target registered as ``name``; an unknown one is an ``ExportConfigError`` listing the valid names."""
    if name not in _REGISTRY:
        from clipdistill.export.onnx import ExportConfigError

        raise ExportConfigError(f"--format {name!r}: valid formats are {', '.join(list_targets())}")
    return _REGISTRY[name]


# --- the targets ------------------------------------------------------------------------------
def _run_onnx(spec: str, out: Path, *, stage: Stage | None = None, **options: Any) -> dict[str, Any]:
    from clipdistill.export.onnx import export_model, no_stage

    return export_model(spec, out, stage=stage or no_stage, **options)


def _run_open_clip(spec: str, out: Path, *, stage: Stage | None = None, **options: Any) -> dict[str, Any]:
    from clipdistill.export.open_clip import export_open_clip

    return export_open_clip(spec, out, stage=stage)


register_target(
    ExportTarget(
        name="onnx",
        title="ONNX",
        summary="both towers as ONNX graphs for serving",
        run=_run_onnx,
        options=OPTIONS,
    )
)
register_target(
    ExportTarget(
        name="open_clip",
        title="open_clip",
        summary="a plain open_clip folder (a LiT teacher written as one, a student copied) that open_clip "
        "loads as local-dir:OUT",
        run=_run_open_clip,
    )
)
