"""What a cache was built for: the keys a request is compared on, and the manifest that records them.

A cache is keyed by (teacher fingerprint, dataset fingerprint, split, preprocessing hash) and
its rows by ids, never by row index, so a reordered or filtered dataset can never silently
read another image's output. Each key here has one definition, used both when building
(headers, the manifest) and when opening (the checks that refuse a mismatch).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clipdistill.data.dataset import PairedDataset
from clipdistill.distill.cache.format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_FILE,
    PIPELINE,
    CacheCorruptError,
    CacheError,
    CacheMismatchError,
)
from clipdistill.hashing import canonical_hash, file_sha256


def dataset_fingerprint(dataset: PairedDataset) -> str:
    """sha256 over the image ids, caption ids and caption texts of ``dataset`` (pass a split).

    Sorted by id, so a reordered dataset keeps its fingerprint (lookups are by id, order is
    irrelevant), while an added/removed image or an edited caption changes it. Image bytes are
    not hashed: ids are the dataset's contract, and re-hashing every image on each training
    start would cost more than the cache saves on small data.
    """
    digest = hashlib.sha256()
    for record in sorted(dataset.images, key=lambda r: r.image_id):
        captions = sorted((c.caption_id, c.text) for c in record.captions)
        digest.update(json.dumps([record.image_id, captions], ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def preprocessing(
    image_size: int, k_augmentations: int, seed: int, aug_scale: Sequence[float], aug_max_shift: float
) -> dict[str, Any]:
    """The manifest's ``preprocessing`` record: every parameter of the pixels plus their ``hash``."""
    params: dict[str, Any] = {
        "image_size": int(image_size),
        "k_augmentations": int(k_augmentations),
        "seed": int(seed),
        "aug_scale": [float(x) for x in aug_scale],
        "aug_max_shift": float(aug_max_shift),
        "pipeline": PIPELINE,
    }
    params["hash"] = canonical_hash(params)
    return params


def preprocessing_hash(
    image_size: int, k_augmentations: int, seed: int, aug_scale: Sequence[float], aug_max_shift: float
) -> str:
    """Hash of everything that decides the pixels the teacher saw (size, augmentation, seed, k)."""
    return preprocessing(image_size, k_augmentations, seed, aug_scale, aug_max_shift)["hash"]


def same_teacher(cached: dict[str, Any], spec: str, fingerprint: str | None) -> bool:
    """Same weights, wherever they live: a moved run folder is the same teacher, a retrained
    one at the same path is not. Without fingerprints only the spec string can be compared."""
    if cached.get("fingerprint") and fingerprint:
        return cached["fingerprint"] == fingerprint
    return cached.get("spec") == spec


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a finished cache; an unfinished or foreign folder is a :class:`CacheCorruptError`."""
    file = Path(path) / MANIFEST_FILE
    if not file.is_file():
        raise CacheCorruptError(
            f"{file} does not exist: {path} is not a finished teacher cache (a build that stopped "
            f"midway leaves no manifest); build it with `clipdistill cache build --out {path} ...`"
        )
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CacheCorruptError(f"{file} is not valid JSON ({error}); rebuild the cache") from error
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise CacheMismatchError(
            f"{file}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}, this clipdistill "
            f"reads {FORMAT!r} version {FORMAT_VERSION}; rebuild with `clipdistill cache build --out {path} ...`"
        )
    return manifest


def manifest_matches(out: Path, header_hash: str) -> bool:
    """A finished cache for exactly this request whose every shard still has its checksum."""
    try:
        manifest = read_manifest(out)
    except CacheError:
        return False
    if manifest.get("header_hash") != header_hash:
        return False
    for entries in manifest.get("shards", {}).values():
        for entry in entries:
            file = out / entry["file"]
            if not file.is_file() or file_sha256(file) != entry["sha256"]:
                return False
    return True


def rebuild_hint(
    path: Path,
    spec: str,
    dataset: PairedDataset,
    split: str,
    prep: dict[str, Any],
    token_features: bool,
    fusion: str | None = None,
) -> str:
    """The ``cache build`` command that makes the cache a request needs (ends every refusal)."""
    scale = prep["aug_scale"]
    command = (
        f"clipdistill cache build --teacher {spec} --data {dataset.source or 'DATA'} --out {path} --split {split} "
        f"--k-aug {prep['k_augmentations']} --image-size {prep['image_size']} --seed {prep['seed']}"
        + (" --token-features" if token_features else "")
        + (f" --fusion {fusion}" if fusion else "")
    )
    if scale != [0.8, 1.0] or prep["aug_max_shift"] != 0.1:
        command += f"  (with aug_scale={scale}, aug_max_shift={prep['aug_max_shift']} through the Python API)"
    return f"rebuild with `{command}`"
