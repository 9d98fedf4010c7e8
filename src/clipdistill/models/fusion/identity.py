"""Whether a fusion teacher's heads g, h map into a given dual teacher's space."""

from __future__ import annotations

from pathlib import Path

from clipdistill.models.fusion.base import FusionTeacher
from clipdistill.models.spec import ModelSpecError


def same_dual_teacher(fusion: FusionTeacher, spec: str) -> bool:
    """Whether ``fusion``'s heads g, h map into the space of dual teacher ``spec``: the same
    weights by fingerprint when both are known (a moved folder still matches), else the same
    spec (path specs compared as absolute paths)."""
    from clipdistill.distill.cache import teacher_fingerprint
    from clipdistill.models.spec import parse_spec

    if fusion.dual_spec is None:
        return False

    def normalised(text: str) -> str:
        try:
            parsed = parse_spec(text)
        except ModelSpecError:
            return text
        if parsed.schema in ("run", "local-dir"):
            return f"{parsed.schema}:{Path(parsed.name).resolve()}"
        return str(parsed)

    try:
        current = teacher_fingerprint(spec)
    except (OSError, ValueError):
        current = None
    if fusion.dual_fingerprint and current:
        return fusion.dual_fingerprint == current
    return normalised(fusion.dual_spec) == normalised(spec)
