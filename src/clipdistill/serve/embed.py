"""``clipdistill embed``: embed a dataset into shards an index is built from.

Layout (clip-retrieval's convention, so its tools read it too)::

    EMB_DIR/img_emb/img_emb_0000.npy     float32 (n, D), unit rows, one per image
    EMB_DIR/text_emb/text_emb_0000.npy   float32 (n, D): the image's first caption
    EMB_DIR/metadata/metadata_0000.parquet  id, image_path, caption, captions, split
    EMB_DIR/metadata.parquet             all shards' metadata, row i <-> embedding row i
    EMB_DIR/embeddings.json              model identity, dataset fingerprint, counts, checksums

Row i of every file is the same image, so ids match by position. The model is either a model
spec (torch) or an export folder (onnxruntime, what serving will use for queries); both use
the same Pillow preprocessing as serving. Resumable per shard: a shard whose three files exist
is skipped, and ``embed_plan.json`` (written first) refuses to mix a different model,
dataset or shard size into a half-finished folder.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from clipdistill.io import atomic_path, atomic_write, atomic_write_json
from clipdistill.serve.checksums import file_sha256
from clipdistill.serve.preprocess import ImagePreprocessor

PLAN_FILE = "embed_plan.json"
EMBED_MANIFEST = "embeddings.json"
METADATA_FILE = "metadata.parquet"


class EmbedError(ValueError):
    """An embedding folder that cannot be resumed or read."""


class Embedder(Protocol):
    identity: dict[str, Any]
    preprocess: ImagePreprocessor

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray: ...
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...


class OnnxEmbedder:
    """Embeds with an export folder's ONNX graphs (the exact encoders serving will use)."""

    def __init__(self, directory: Path, variant: str = "fp32") -> None:
        from clipdistill.serve.encoders import OnnxEncoders

        self.encoders = OnnxEncoders(directory, variant)
        self.identity = {"backend": "onnx", "export_dir": str(directory), **self.encoders.identity}
        self.preprocess = self.encoders.preprocess

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        return self.encoders.encode_pixels(pixels)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.encoders.encode_texts(texts)


class TorchEmbedder:
    """Embeds with the torch model a spec names (for models not exported yet)."""

    def __init__(self, spec: str, device: str = "cpu") -> None:
        from clipdistill.models.teachers import load_model
        from clipdistill.serve.checksums import weights_sha256

        self.model = load_model(spec, device=device)
        self.device = device
        self.identity = {
            "backend": "torch",
            "spec": spec,
            "weights_sha256": weights_sha256(self.model),
            "embed_dim": int(self.model.embed_dim),
        }
        self.preprocess = ImagePreprocessor(
            tuple(self.model.image_size),  # type: ignore[arg-type]
            tuple(self.model.image_mean),  # type: ignore[arg-type]
            tuple(self.model.image_std),  # type: ignore[arg-type]
        )

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model.encode_image(torch.from_numpy(pixels).to(self.device)).float().cpu().numpy()

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model.embed_texts(list(texts)).float().cpu().numpy()


def open_embedder(model: str | Path, device: str = "cpu", variant: str = "fp32") -> Embedder:
    """An export folder (has export.json) -> ONNX; anything else is a model spec -> torch."""
    from clipdistill.serve.encoders import EXPORT_CONFIG

    text = str(model)
    path = Path(text.removeprefix("onnx:"))
    if text.startswith("onnx:") or (path / EXPORT_CONFIG).is_file():
        return OnnxEmbedder(path, variant)
    return TorchEmbedder(text, device)


def _rows(dataset: Any) -> list[dict[str, Any]]:
    return [
        {
            "id": record.image_id,
            "image_path": str(Path(record.path).resolve()),
            "caption": record.captions[0].text,
            "captions": [caption.text for caption in record.captions],
            "split": record.split,
        }
        for record in dataset.images
    ]


def _fingerprint(rows: list[dict[str, Any]]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps([row["id"], row["image_path"], row["captions"]], ensure_ascii=False).encode())
    return digest.hexdigest()


def _shard_paths(out: Path, shard: int) -> tuple[Path, Path, Path]:
    return (
        out / "img_emb" / f"img_emb_{shard:04d}.npy",
        out / "text_emb" / f"text_emb_{shard:04d}.npy",
        out / "metadata" / f"metadata_{shard:04d}.parquet",
    )


def _save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda handle: np.save(handle, np.ascontiguousarray(array, dtype=np.float32)))


def _save_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    import pandas as pd

    with atomic_path(path) as tmp:
        pd.DataFrame(rows).to_parquet(tmp, index=False)


def _shard_problem(out: Path, shard: int, shard_rows: list[dict[str, Any]]) -> str | None:
    """Why shard ``shard`` on disk is not the finished shard of this plan, or ``None`` if it is."""
    import pandas as pd

    img_path, text_path, meta_path = _shard_paths(out, shard)
    if not (img_path.is_file() and text_path.is_file() and meta_path.is_file()):
        return "is missing"
    try:
        counts = [len(np.load(path, mmap_mode="r")) for path in (img_path, text_path)]
        ids = list(pd.read_parquet(meta_path, columns=["id"])["id"])
    except Exception as error:  # unreadable files are recomputed (or refused in a merge)
        return f"is unreadable ({error})"
    if counts != [len(shard_rows)] * 2:
        return f"has {counts} image/text rows, the plan {len(shard_rows)}"
    if ids != [row["id"] for row in shard_rows]:
        return "holds other ids than the plan"
    return None


def _start_plan(out: Path, plan: dict[str, Any]) -> None:
    path = out / PLAN_FILE
    if path.is_file():
        previous = json.loads(path.read_text(encoding="utf-8"))
        for key in ("model", "dataset_sha256", "shard_size", "count"):
            if previous.get(key) != plan[key]:
                raise EmbedError(
                    f"{out} holds an unfinished embedding with a different {key} "
                    f"({previous.get(key)!r} vs {plan[key]!r}); use another --out or delete the folder"
                )
        return
    atomic_write_json(path, plan)


def embed_dataset(
    model: str | Path | Embedder,
    data: str | Path,
    out: str | Path,
    *,
    images: str | Path | None = None,
    split: str = "test",
    shard_size: int = 4096,
    batch_size: int = 128,
    device: str = "cpu",
    progress: bool = True,
    shard_owner: tuple[int, int] | None = None,
    require_existing: bool = False,
) -> dict[str, Any]:
    """Embed a split (``"all"`` = every image) into ``out``; returns the manifest.

    Finished shards are not recomputed, so rerunning after a crash only does the rest; a
    finished shard is verified first (row counts and ids against the plan) and recomputed if
    it does not match. Sharded (``clipdistill/sharded.py``): ``shard_owner=(rank, world)``
    embeds only shards ≡ rank (mod world) and writes no manifest; the merge call
    (``require_existing=True``) verifies every shard and refuses, naming it, a missing one.
    """
    from clipdistill.data.loading import load_dataset

    if shard_size < 1 or batch_size < 1:
        raise EmbedError(f"shard_size and batch_size must be >= 1, got {shard_size} and {batch_size}")
    dataset = load_dataset(data, images)
    if split != "all":
        dataset = dataset.split(split)
    rows = _rows(dataset)
    embedder = open_embedder(model, device) if isinstance(model, str | Path) else model
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = {
        "model": embedder.identity,
        "dataset": {"name": dataset.name, "source": str(data), "split": split},
        "dataset_sha256": _fingerprint(rows),
        "shard_size": shard_size,
        "count": len(rows),
    }
    _start_plan(out, plan)
    n_shards = (len(rows) + shard_size - 1) // shard_size
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(rows), desc="embed", unit="img")
    skipped = 0
    for shard in range(n_shards):
        if shard_owner is not None and shard % shard_owner[1] != shard_owner[0]:
            continue
        shard_rows = rows[shard * shard_size : (shard + 1) * shard_size]
        img_path, text_path, meta_path = _shard_paths(out, shard)
        problem = _shard_problem(out, shard, shard_rows)
        if problem is not None and require_existing:
            raise EmbedError(f"merging the sharded embedding {out}: shard {shard} {problem}; rerun the sharded embed")
        if problem is None:
            skipped += 1
        else:
            image_parts, text_parts = [], []
            for start in range(0, len(shard_rows), batch_size):
                batch = shard_rows[start : start + batch_size]
                image_parts.append(embedder.encode_pixels(embedder.preprocess([r["image_path"] for r in batch])))
                text_parts.append(embedder.encode_texts([r["caption"] for r in batch]))
                if bar is not None:
                    bar.update(len(batch))
            _save_npy(img_path, np.concatenate(image_parts))
            _save_npy(text_path, np.concatenate(text_parts))
            _save_parquet(meta_path, shard_rows)  # last: its presence marks the shard done
            continue
        if bar is not None:
            bar.update(len(shard_rows))
    if bar is not None:
        bar.close()
    if shard_owner is not None:  # one process's part: the merge writes metadata and manifest
        return plan
    _save_parquet(out / METADATA_FILE, rows)
    shards = []
    for shard in range(n_shards):
        paths = _shard_paths(out, shard)
        shards.append({str(p.relative_to(out)): file_sha256(p) for p in paths})
    manifest = {
        **plan,
        "embed_dim": embedder.identity["embed_dim"],
        "layout": "row i of img_emb, text_emb and metadata.parquet is the same image; text = its first caption",
        "metadata_sha256": file_sha256(out / METADATA_FILE),
        "shards": shards,
        "skipped_shards": skipped,
    }
    atomic_write_json(out / EMBED_MANIFEST, manifest)
    return manifest


def read_embedding_manifest(emb_dir: str | Path) -> dict[str, Any]:
    """The manifest of a finished embedding folder (its absence means embed did not finish)."""
    emb_dir = Path(emb_dir)
    path = emb_dir / EMBED_MANIFEST
    if not path.is_file():
        raise EmbedError(f"{emb_dir}: {EMBED_MANIFEST} is missing (not an embedding folder, or embed did not finish)")
    return json.loads(path.read_text(encoding="utf-8"))


def read_embeddings(emb_dir: str | Path) -> tuple[dict[str, Any], np.ndarray, np.ndarray, Any]:
    """(manifest, image_emb, text_emb, metadata DataFrame) of a finished embedding folder."""
    import pandas as pd

    emb_dir = Path(emb_dir)
    manifest = read_embedding_manifest(emb_dir)
    n_shards = len(manifest["shards"])
    image = np.concatenate([np.load(_shard_paths(emb_dir, s)[0]) for s in range(n_shards)])
    text = np.concatenate([np.load(_shard_paths(emb_dir, s)[1]) for s in range(n_shards)])
    metadata = pd.read_parquet(emb_dir / METADATA_FILE)
    if not len(image) == len(text) == len(metadata) == manifest["count"]:
        raise EmbedError(
            f"{emb_dir}: row counts differ (img {len(image)}, text {len(text)}, metadata {len(metadata)}, "
            f"manifest {manifest['count']})"
        )
    return manifest, image, text, metadata
