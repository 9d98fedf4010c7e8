"""Fingerprints of a teacher's weights: which files hold them, and one hash over those files.

A path spec (``run:``, ``local-dir:``, ``fusion:``, a file given as open_clip ``pretrained``)
can hold other weights tomorrow under the same string, e.g. a retrained run, so the teacher
cache and the fusion teacher's dual-teacher check compare these fingerprints rather than spec
strings; a moved folder keeps its fingerprint. Zoo names and hub ids already name fixed
weights and get none.
"""

from __future__ import annotations

from pathlib import Path

from clipdistill.hashing import canonical_hash, file_sha256
from clipdistill.models.run_dir import resolve_run_dir
from clipdistill.models.spec import parse_spec

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def teacher_files(spec: str) -> list[Path] | None:
    """The files holding a teacher's weights when its spec names a path (whose content can
    change under the same spec, e.g. a retrained ``run:``), else ``None`` (a zoo name or hub
    id already names fixed weights)."""
    parsed = parse_spec(spec)
    if parsed.schema == "fusion":
        from clipdistill.models.fusion.encoder import CONFIG_FILE, WEIGHTS_FILE, read_fusion_config

        directory = Path(parsed.name)
        read_fusion_config(directory)  # a missing or foreign folder is an error naming it
        return [directory / name for name in (CONFIG_FILE, WEIGHTS_FILE) if (directory / name).is_file()]
    if parsed.schema == "run":
        from clipdistill.models import lit, students

        kind, directory = resolve_run_dir(parsed.name)
        names = (lit.MODEL_FILE, lit.WEIGHTS_FILE) if kind == "lit" else (students.CONFIG_FILE, students.WEIGHTS_FILE)
        return [directory / name for name in names if (directory / name).is_file()]
    if parsed.schema in ("local-dir", "hf", "blip-itm") and Path(parsed.name).is_dir():
        directory = Path(parsed.name)
        return sorted(
            p
            for p in directory.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix in (".json", *WEIGHT_SUFFIXES)
        )
    if parsed.schema == "openclip" and parsed.pretrained and Path(parsed.pretrained).is_file():
        return [Path(parsed.pretrained)]
    return None


def teacher_fingerprint(spec: str) -> str | None:
    """sha256 over the teacher's weight/config files for path specs; ``None`` for named models."""
    files = teacher_files(spec)
    if files is None:
        return None
    return canonical_hash([[p.name, file_sha256(p)] for p in files])
