"""``clipdistill index``: a self-contained FAISS index folder with a manifest.

An index folder holds everything a query needs, so it can be copied to a server as one unit::

    INDEX_DIR/index.faiss        inner-product FAISS index over unit image embeddings
    INDEX_DIR/metadata.parquet   id, image_path, caption, captions, split, thumbnail (row = FAISS id)
    INDEX_DIR/thumbs/*.jpg       small display copies of the images (the originals may move)
    INDEX_DIR/encoders/          a copy of the export folder (ONNX graphs, tokenizer, preprocessing)
    INDEX_DIR/manifest.json      model identity + checksums, dim, count, factory, build params

How an index finds its encoders: ``clipdistill index`` copies the export folder into
``INDEX_DIR/encoders`` (self-contained beats a path that breaks when either folder moves).
The manifest records the source weights' checksum and each graph's sha256; :func:`check_encoders`
refuses any other encoder (a different model, a re-export, another dimension) with the reason,
because a query embedded by a different model returns confident nonsense, not an error.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from clipdistill.io import atomic_path, atomic_write_json
from clipdistill.paths import resolve_inside
from clipdistill.serve.ann import (  # re-exported: callers import the build primitives from here
    TRAIN_SAMPLE,
    IndexBuildError,
    IndexMismatchError,
    apply_search_params,
    build_faiss,
    new_index,
    train_index,
)
from clipdistill.serve.checksums import file_sha256
from clipdistill.serve.embed import EMBED_MANIFEST, METADATA_FILE, read_embedding_manifest
from clipdistill.serve.encoders import EXPORT_CONFIG, TOWER_FILES, read_export_config
from clipdistill.serve.tokenize import TOKENIZER_CONFIG

MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"
ENCODERS_DIR = "encoders"
THUMBS_DIR = "thumbs"
FORMAT = "clipdistill-index/1"
__all__ = [
    "TRAIN_SAMPLE",
    "IndexBuildError",
    "IndexMismatchError",
    "apply_search_params",
    "build_faiss",
    "new_index",
    "train_index",
]


def _copy_encoders(export_dir: Path, target: Path) -> None:
    """Put an export folder's serving files (not parity.json's inputs) into the index, so the
    index serves on its own. Hard links where the file system allows (the ONNX graphs are most
    of a run's deploy folder; every write in this project replaces a file by rename, so a linked
    file is never changed under the index), copies elsewhere (another device, no link support)."""
    config = read_export_config(export_dir)
    listed = f"{export_dir / EXPORT_CONFIG}: files key"
    names = [(name, listed) for name in config["files"]]
    names += [(name, "fixed name") for name in (EXPORT_CONFIG, "preprocess_config.json", TOKENIZER_CONFIG)]
    tokenizer = json.loads((export_dir / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
    names.append((tokenizer.get("file"), f"{export_dir / TOKENIZER_CONFIG}: file"))
    if (export_dir / "parity.json").is_file():
        names.append(("parity.json", "fixed name"))
    for name, what in names:
        source = resolve_inside(export_dir, name, what=what, error=IndexBuildError)  # names come from the export
        with atomic_path(target / name) as tmp:
            _link_or_copy(source, tmp)


def _link_or_copy(source: Path, tmp: Path) -> None:
    tmp.unlink()  # atomic_path made it; a link needs the name free
    try:
        os.link(source, tmp)
    except OSError:  # cross-device or a file system without hard links: the same bytes, copied
        shutil.copyfile(source, tmp)


THUMB_STAMPS = "stamps.json"  # row -> what its thumbnail was made from (thumbs/stamps.json)


def _source_stamp(path: str, size: int) -> str | None:
    """What a thumbnail depends on: the source's path, byte size and mtime, and the thumbnail
    size. A webdataset member (``SHARD.tar/MEMBER``) is stamped by its shard file."""
    import hashlib

    target = Path(path)
    if not target.exists() and ".tar/" in path:
        target = Path(path[: path.index(".tar/") + 4])
    try:
        info = target.stat()
    except OSError:
        return None
    key = json.dumps([path, info.st_size, info.st_mtime_ns, size])
    return hashlib.sha256(key.encode()).hexdigest()


def _write_thumbnails(paths: list[str], out: Path, size: int) -> list[str | None]:
    """``thumbs/NNNNNNN.jpg`` for each row (None where the image cannot be read).

    A rebuild into the same folder reuses a row's thumbnail only when ``thumbs/stamps.json``
    says it was made from the same file (path, size, mtime) at the same size; any other
    thumbnail is rewritten, and thumbnails of rows the new index does not have are deleted,
    so a thumbnail never shows an image other than its row's.
    """
    from PIL import Image

    from clipdistill.serve.preprocess import ImageInputError, open_image

    store = out / THUMBS_DIR
    store.mkdir(parents=True, exist_ok=True)
    stamps_path = store / THUMB_STAMPS
    try:
        previous = json.loads(stamps_path.read_text(encoding="utf-8")) if stamps_path.is_file() else {}
    except ValueError:
        previous = {}  # unreadable: every thumbnail is rewritten
    stamps: dict[str, str] = {}
    names: list[str | None] = []
    for row, path in enumerate(paths):
        name = f"{THUMBS_DIR}/{row:07d}.jpg"
        target = out / name
        stamp = _source_stamp(path, size)
        if stamp is not None and previous.get(str(row)) == stamp and target.is_file() and not target.is_symlink():
            stamps[str(row)] = stamp
            names.append(name)
            continue
        target.unlink(missing_ok=True)
        try:
            image = open_image(path)
        except ImageInputError:
            names.append(None)
            continue
        image.thumbnail((size, size), Image.Resampling.BICUBIC)
        with atomic_path(target) as tmp:
            image.save(tmp, format="JPEG", quality=88)
        if stamp is not None:
            stamps[str(row)] = stamp
        names.append(name)
    for old in store.glob("*.jpg"):  # rows this index does not have
        if old.stem.isdigit() and int(old.stem) >= len(paths):
            old.unlink()
    atomic_write_json(stamps_path, stamps)
    return names


def encoder_identity(export_config: dict[str, Any], variant: str) -> dict[str, Any]:
    return {
        "spec": export_config["source"]["spec"],
        "weights_sha256": export_config["source"]["weights_sha256"],
        "embed_dim": int(export_config["embed_dim"]),
        "encoder_sha256": {
            tower: export_config["files"][name]["sha256"]
            for tower, name in TOWER_FILES[variant].items()
            if name in export_config["files"]
        },
    }


def check_encoders(manifest: dict[str, Any], identity: dict[str, Any]) -> None:
    """Refuse encoders that are not the ones this index was built for, saying why."""
    expected = manifest["model"]
    if int(identity["embed_dim"]) != int(manifest["dim"]):
        raise IndexMismatchError(
            f"encoder dim {identity['embed_dim']} does not match the index dim {manifest['dim']} "
            f"(index built with {expected['spec']})"
        )
    if identity["weights_sha256"] != expected["weights_sha256"]:
        raise IndexMismatchError(
            f"encoder weights checksum {identity['weights_sha256'][:12]}… ({identity['spec']}) does not match the "
            f"index's {expected['weights_sha256'][:12]}… ({expected['spec']}): embeddings from different models "
            "are not comparable; rebuild the index with this model"
        )
    known = expected.get("encoders", {})
    for tower, digest in identity.get("encoder_sha256", {}).items():
        allowed = {variant_sums.get(tower) for variant_sums in known.values()}
        if known and digest not in allowed:
            raise IndexMismatchError(
                f"{tower} encoder checksum {digest[:12]}… is none of the index's encoders "
                f"({', '.join(sorted(str(a)[:12] + '…' for a in allowed))}); re-export or rebuild the index"
            )


def build_index(
    emb_dir: str | Path,
    out: str | Path,
    *,
    factory: str = "HNSW32",
    encoders: str | Path | None = None,
    ef_construction: int = 80,
    ef_search: int = 64,
    nprobe: int = 16,
    thumb_size: int = 128,
) -> dict[str, Any]:
    """Build INDEX_DIR from an embedding folder; returns the manifest.

    ``encoders`` is the export folder to bundle; by default the one the embeddings were made
    with (``embed --model EXPORT_DIR``). Embeddings made with torch need ``encoders`` given,
    and it must come from the same weights.
    """
    import faiss

    emb_dir, out = Path(emb_dir), Path(out)
    import pandas as pd

    from clipdistill.serve.index_chunks import build_faiss_chunked

    emb_manifest = read_embedding_manifest(emb_dir)  # vectors are streamed shard by shard below
    metadata = pd.read_parquet(emb_dir / METADATA_FILE)
    if len(metadata) != emb_manifest["count"]:
        raise IndexBuildError(f"{emb_dir}: metadata has {len(metadata)} rows, embeddings.json {emb_manifest['count']}")
    model = emb_manifest["model"]
    if encoders is None:
        if model.get("backend") != "onnx":
            raise IndexMismatchError(
                f"{emb_dir} was embedded with torch ({model['spec']}); pass --encoders EXPORT_DIR "
                f"(from `clipdistill export --model {model['spec']}`) so the index can serve queries"
            )
        encoders = model["export_dir"]
    export_dir = Path(encoders)
    export_config = read_export_config(export_dir)
    variants = [v for v in export_config["variants"] if v in TOWER_FILES]
    identities = {variant: encoder_identity(export_config, variant) for variant in variants}
    fp32 = identities["fp32"]
    draft = {"dim": int(emb_manifest["embed_dim"]), "model": {**model, "encoders": {}}}
    check_encoders(draft, fp32)

    index, params, norm_deviation = build_faiss_chunked(
        emb_dir, emb_manifest, factory, ef_construction=ef_construction, ef_search=ef_search, nprobe=nprobe
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)  # written last: its absence marks an unfinished index
    with atomic_path(out / INDEX_FILE) as tmp:
        faiss.write_index(index, str(tmp))
    _copy_encoders(export_dir, out / ENCODERS_DIR)
    metadata = metadata.copy()
    metadata["thumbnail"] = _write_thumbnails(list(metadata["image_path"]), out, thumb_size)
    with atomic_path(out / "metadata.parquet") as tmp:
        metadata.to_parquet(tmp, index=False)
    manifest = {
        "format": FORMAT,
        "model": {
            "spec": fp32["spec"],
            "weights_sha256": fp32["weights_sha256"],
            "embed_dim": fp32["embed_dim"],
            "encoders": {variant: identity["encoder_sha256"] for variant, identity in identities.items()},
            "embedded_with": model.get("backend"),
        },
        "dim": int(index.d),
        "count": int(index.ntotal),
        "factory": factory,
        "metric": "inner_product",
        "vectors": "image embeddings, L2-normalised (cosine similarity = inner product)",
        "max_input_norm_deviation": norm_deviation,
        "build_params": params,
        "search_params": {k: v for k, v in params.items() if k in ("efSearch", "nprobe")},
        "data": {
            "source": str(emb_dir.resolve()),
            "dataset": emb_manifest["dataset"],
            "dataset_sha256": emb_manifest["dataset_sha256"],
            "embeddings_sha256": file_sha256(emb_dir / EMBED_MANIFEST),
            "metadata_sha256": file_sha256(out / "metadata.parquet"),
            "index_sha256": file_sha256(out / INDEX_FILE),
        },
        "faiss_version": faiss.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(out / MANIFEST_FILE, manifest)
    return manifest


def read_manifest(index_dir: str | Path) -> dict[str, Any]:
    path = Path(index_dir) / MANIFEST_FILE
    if not path.is_file():
        raise IndexBuildError(
            f"{index_dir} is not a finished index: {MANIFEST_FILE} is missing (run clipdistill index)"
        )
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise IndexBuildError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("metric") != "inner_product":
        raise IndexBuildError(f"{path}: metric {manifest.get('metric')!r}; only inner_product indexes are served")
    return manifest
