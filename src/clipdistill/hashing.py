"""Content hashes: of a file's bytes and of a JSON-able value.

Manifests (teacher cache, exported encoders, embeddings, indexes), the LiT teacher's MiniLM
check and teacher fingerprints all compare these, so there is one definition of each.
Torch-free on purpose: the serving side verifies files with :func:`file_sha256`.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, read 1 MiB at a time (weights files do not fit in memory twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def canonical_hash(obj: Any) -> str:
    """sha256 of ``obj`` as canonical JSON (sorted keys, no spaces), so equal values hash equal."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
