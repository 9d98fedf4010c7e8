"""Fingerprints of a teacher's weights: which files hold them, and one hash over those files.

A path spec (``run:``, ``local-dir:``, ``fusion:``, a file given as open_clip ``pretrained``)
can hold other weights tomorrow under the same string, e.g. a retrained run, so the teacher
cache and the fusion teacher's dual-teacher check compare these fingerprints rather than spec
strings; a moved folder keeps its fingerprint. Zoo names and hub ids already name fixed
weights and get none. Which files count is each teacher kind's rule
(:class:`~clipdistill.models.kinds.TeacherKind` ``weight_files``, registered in
:mod:`clipdistill.models.teacher_kinds`).
"""

from __future__ import annotations

from pathlib import Path

from clipdistill.hashing import canonical_hash, file_sha256
from clipdistill.models.kinds import get_kind
from clipdistill.models.spec import parse_spec

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def folder_weight_files(directory: Path) -> list[Path]:
    """A model folder's weight and config files (``.json`` and :data:`WEIGHT_SUFFIXES`, hidden
    files left out), sorted, so the fingerprint does not depend on the listing order."""
    return sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix in (".json", *WEIGHT_SUFFIXES)
    )


def teacher_files(spec: str) -> list[Path] | None:
    """The files holding a teacher's weights when its spec names a path (whose content can
    change under the same spec, e.g. a retrained ``run:``), else ``None`` (a zoo name or hub
    id already names fixed weights)."""
    parsed = parse_spec(spec)
    return get_kind(parsed.schema).weight_files(parsed)


def teacher_fingerprint(spec: str) -> str | None:
    """sha256 over the teacher's weight/config files for path specs; ``None`` for named models."""
    files = teacher_files(spec)
    if files is None:
        return None
    return canonical_hash([[p.name, file_sha256(p)] for p in files])
