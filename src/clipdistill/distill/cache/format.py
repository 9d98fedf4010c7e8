"""The cache's on-disk format: names, errors, and one shard (which rows, its metadata, its file).

A shard is a safetensors file whose metadata names the build it belongs to (``header``), its
rows' keys and a hash of its content, so a shard left by a crashed build can be verified and
reused without a manifest (see :mod:`clipdistill.distill.cache` for the folder layout).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from clipdistill.hashing import file_sha256
from clipdistill.io import atomic_path

FORMAT = "clipdistill-teacher-cache"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
# Names the pixel pipeline the cache replays. Bump it whenever decoding (load_image_tensor,
# to_unit) or replay_augmentation changes its output, so old caches are refused, not misread.
# v2: 16-bit images are scaled to 8 bits (v1 clipped them, so they decoded white).
# v3: one decoder (clipdistill.imaging): EXIF orientation applied, tRNS transparency on white.
PIPELINE = "imaging.decode_rgb(exif, rgb on white, 16-bit scaled) > bicubic > to_unit > replay_augmentation/v3"
KINDS = ("images", "texts", "image_tokens", "text_tokens")
FUSION_KINDS = ("fusion_images", "fusion_texts")
SHARD_RE = re.compile(r"^(images|texts|image_tokens|text_tokens|fusion_images|fusion_texts)-\d{5}\.safetensors$")
#: Which header (and which row keys) each kind of shard is checked against.
HEADER_OF = {
    "images": "images",
    "image_tokens": "images",
    "texts": "texts",
    "text_tokens": "texts",
    "fusion_images": "fusion_images",
    "fusion_texts": "fusion_texts",
}


class CacheError(ValueError):
    """A teacher cache that cannot be built or used as asked."""


class CacheMismatchError(CacheError):
    """The cache was built for another teacher, dataset, split, preprocessing or k."""


class CacheCorruptError(CacheMismatchError):
    """A shard or the manifest is missing, unreadable or fails its checksum. A subclass of
    :class:`CacheMismatchError` because the remedy is the same: rebuild."""


class TokenFeaturesUnavailableError(CacheError):
    """Token features were requested from a teacher that does not provide them."""


class CacheKeyError(KeyError):
    """A batch asked for an id the cache does not hold (``str`` is the plain message)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# --- the plan: which rows go in which shard -------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    kind: str
    index: int
    start: int
    stop: int

    @property
    def file(self) -> str:
        return f"{self.kind}-{self.index:05d}.safetensors"


def plan_shards(kind: str, total: int, shard_size: int) -> list[Shard]:
    return [
        Shard(kind, index, start, min(start + shard_size, total))
        for index, start in enumerate(range(0, total, shard_size))
    ]


def image_row_keys(image_ids: Sequence[str], k: int, start: int, stop: int) -> tuple[list[str], list[int]]:
    """Image ids and augmentation ids of global image rows ``[start, stop)`` (image-major)."""
    rows = range(start, stop)
    return [image_ids[r // k] for r in rows], [r % k for r in rows]


# --- one shard on disk ----------------------------------------------------------------------------
def content_sha256(tensors: dict[str, torch.Tensor], keys: Sequence[str]) -> str:
    """Hash of a shard's tensors and row keys, stored in the shard itself so a shard left by a
    crashed build can be verified (and reused) before any manifest exists."""
    digest = hashlib.sha256(json.dumps(list(keys), ensure_ascii=False).encode("utf-8"))
    for name in sorted(tensors):
        tensor = tensors[name].contiguous().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def shard_metadata(header_hash: str, shard: Shard, keys: Sequence[str], content: str) -> dict[str, str]:
    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "header": header_hash,
        "kind": shard.kind,
        "index": str(shard.index),
        "start": str(shard.start),
        "keys": json.dumps(list(keys), ensure_ascii=False),
        "content_sha256": content,
    }


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Write a shard atomically; returns the file's sha256 (what the manifest records)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({name: t.contiguous().cpu() for name, t in tensors.items()}, str(tmp), metadata=metadata)
    return file_sha256(path)


def reusable_shard(path: Path, header_hash: str, shard: Shard, keys: Sequence[str]) -> str | None:
    """The file's sha256 if ``path`` is a complete shard of exactly this plan, else ``None``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        if (
            meta.get("header") != header_hash
            or meta.get("kind") != shard.kind
            or meta.get("index") != str(shard.index)
            or json.loads(meta.get("keys", "null")) != list(keys)
        ):
            return None
        if content_sha256(load_file(str(path)), keys) != meta.get("content_sha256"):
            return None
    except Exception:  # any unreadable shard is simply recomputed
        return None
    return file_sha256(path)
