"""``build_cache``: compute the teacher's outputs once and write them as shards + a manifest.

The steps, in order: check the request and name what it is keyed by (:func:`_headers`); stop
if a finished cache for exactly this request is already there; write every embedding shard
(:func:`write_embedding_shards`) and fusion shard
(:func:`~clipdistill.distill.cache.fusion_shards.write_fusion_shards`) not already on disk;
remove shards of earlier, different builds; write the manifest last (:func:`_manifest`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clipdistill.data.dataset import PairedDataset
from clipdistill.distill.cache.format import (
    FORMAT,
    FORMAT_VERSION,
    FUSION_KINDS,
    KINDS,
    MANIFEST_FILE,
    SHARD_RE,
    CacheError,
    Shard,
    plan_shards,
)
from clipdistill.distill.cache.fusion_shards import write_fusion_shards
from clipdistill.distill.cache.job import BuildJob, Rows, Teachers, batches
from clipdistill.distill.cache.manifest import dataset_fingerprint, manifest_matches, preprocessing
from clipdistill.hashing import canonical_hash
from clipdistill.io import atomic_write_json
from clipdistill.models.encoding_memo import EncodingMemo
from clipdistill.models.fingerprint import teacher_fingerprint


def build_cache(
    teacher_spec: str,
    dataset: PairedDataset,
    out: str | Path,
    *,
    split: str = "train",
    k_augmentations: int = 1,
    image_size: int | None = None,
    seed: int = 0,
    aug_scale: tuple[float, float] = (0.8, 1.0),
    aug_max_shift: float = 0.1,
    shard_size: int = 4096,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = True,
    token_features: bool = False,
    fusion: str | None = None,
    shard_owner: tuple[int, int] | None = None,
    require_existing: bool = False,
    allow_random_teacher: bool = False,
    encoding_memo: EncodingMemo | None = None,
) -> Path:
    """Compute the teacher's outputs for every image × augmentation 0..k-1 and every caption of
    ``split``, and write them to ``out`` (see :mod:`clipdistill.distill.cache` for the layout).

    ``encoding_memo``: rows of the frozen towers that the run's earlier stages computed (the
    ``distill`` job hands its teacher and fusion stages' memo on); by default the build's own.

    ``fusion`` (a ``fusion:``/``blip-itm:`` spec) also stores that fusion teacher's per-item
    states for the same rows (see :mod:`clipdistill.distill.cache` for why states, not pair scores).

    Pixels are produced exactly as the trainer produces them: decode at ``image_size``
    (default: the teacher's input size), :func:`~clipdistill.data.images.to_unit`,
    :func:`~clipdistill.data.augment.replay_augmentation` with ``seed``/``aug_scale``/
    ``aug_max_shift``; the teacher then resizes/normalises them itself.

    Resumable: a shard already on disk whose header, keys and content hash match is kept, so a
    crashed build only computes what is missing; a finished cache for the same request is left
    untouched. ``manifest.json`` is written last, so a folder without it is never read.

    Sharded (``sharded.py``): ``shard_owner=(rank, world)`` computes only the shards
    whose index ≡ rank (mod world) and writes no manifest; the merge is a second call with
    ``require_existing=True``, which verifies every shard on disk (header, keys, content hash)
    and refuses, naming the shard, to compute one that is missing or corrupt.

    A teacher without trained weights (``openclip:NAME`` with no tag, ``lit:``) is refused
    before any work unless ``allow_random_teacher``: a cache of random embeddings would train
    every student from it towards noise.
    """
    from clipdistill.device import resolve_device
    from clipdistill.models.spec import parse_fusion_spec, parse_spec
    from clipdistill.models.teachers import check_teacher_weights

    if k_augmentations < 1:
        raise CacheError(f"k_augmentations must be >= 1, got {k_augmentations}")
    if shard_size < 1 or batch_size < 1:
        raise CacheError(f"shard_size and batch_size must be >= 1, got {shard_size} and {batch_size}")
    out = Path(out)
    spec = str(parse_spec(teacher_spec))  # a typo fails before any work
    check_teacher_weights(spec, allow_random=allow_random_teacher)  # so does a teacher with random weights
    fusion_spec = str(parse_fusion_spec(fusion)) if fusion else None
    torch_device = resolve_device(str(device))
    fingerprint = teacher_fingerprint(spec)
    subset = dataset.split(split)
    subset.check_files()

    teachers = Teachers(
        spec, fusion_spec, torch_device, token_features, allow_random_teacher, encoding_memo or EncodingMemo()
    )
    if token_features:
        teachers.teacher()  # refuse a teacher without token features before anything else
    if image_size is None:
        image_size = _teacher_image_size(teachers)

    k = int(k_augmentations)
    prep = preprocessing(image_size, k, seed, aug_scale, aug_max_shift)
    headers = _headers(spec, fingerprint, split, subset, prep, token_features, shard_size, fusion_spec)
    if manifest_matches(out, headers.request_hash):
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)  # a half-rebuilt folder must never look finished

    rows = Rows.of(
        subset,
        k=k,
        image_size=image_size,
        seed=seed,
        aug_scale=aug_scale,
        aug_max_shift=aug_max_shift,
        device=torch_device,
    )
    entries: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS[: 4 if token_features else 2]}
    if headers.fusion is not None:
        entries.update({kind: [] for kind in FUSION_KINDS})
    job = BuildJob(
        out=out,
        rows=rows,
        teachers=teachers,
        shard_headers=headers.shard_headers,
        image_plan=plan_shards("images", rows.image_rows, shard_size),
        text_plan=plan_shards("texts", len(rows.caption_ids), shard_size),
        batch_size=batch_size,
        token_features=token_features,
        shard_owner=shard_owner,
        require_existing=require_existing,
        entries=entries,
    )
    if progress:
        from tqdm import tqdm

        passes = 2 if headers.fusion is not None else 1
        total = passes * (rows.image_rows + len(rows.caption_ids))
        job.bar = tqdm(total=total, desc="teacher cache", unit="row", leave=False)

    write_embedding_shards(job)
    if headers.fusion is not None:  # the fusion teacher's per-item states, same rows and keys
        write_fusion_shards(job)
    if job.bar is not None:
        job.bar.close()
    if shard_owner is not None:  # one process's part of a sharded build: the merge writes the manifest
        return out

    _remove_stale_shards(out, entries)
    manifest = _manifest(job, headers, subset, split, prep, token_features, shard_size)
    atomic_write_json(out / MANIFEST_FILE, manifest)
    return out


def _teacher_image_size(teachers: Teachers) -> int:
    height, width = teachers.teacher().model.image_size
    if height != width:
        raise CacheError(f"teacher {teachers.spec} takes {height}x{width} images; pass image_size explicitly")
    return int(height)


@dataclass(frozen=True)
class _Headers:
    """What a build is keyed by: ``header`` (teacher, dataset, preprocessing, ...), the header
    hash each kind of shard carries, the hash a finished manifest must have, and the fusion
    teacher (``None`` without one)."""

    header: dict[str, Any]
    shard_headers: dict[str, str]
    request_hash: str
    fusion: dict[str, Any] | None


def _headers(
    spec: str,
    fingerprint: str | None,
    split: str,
    subset: PairedDataset,
    prep: dict[str, Any],
    token_features: bool,
    shard_size: int,
    fusion_spec: str | None,
) -> _Headers:
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "teacher": {"spec": spec, "fingerprint": fingerprint},
        "dataset": {"split": split, "fingerprint": dataset_fingerprint(subset)},
        "preprocessing": prep,
        "token_features": bool(token_features),
        "shard_size": int(shard_size),
    }
    header_hash = canonical_hash(header)
    # Caption embeddings do not depend on pixels, so text shards carry a header without the
    # preprocessing: changing k or the augmentation reuses them instead of re-encoding text.
    text_header = {key: value for key, value in header.items() if key != "preprocessing"}
    shard_headers = {"images": header_hash, "texts": canonical_hash(text_header)}
    fusion_info = None
    request_hash = header_hash
    if fusion_spec is not None:
        fusion_info = {"spec": fusion_spec, "fingerprint": teacher_fingerprint(fusion_spec)}
        shard_headers["fusion_images"] = request_hash = canonical_hash({**header, "fusion": fusion_info})
        shard_headers["fusion_texts"] = canonical_hash({**text_header, "fusion": fusion_info})
    return _Headers(header, shard_headers, request_hash, fusion_info)


def write_embedding_shards(job: BuildJob) -> None:
    """Every owned ``images``/``texts`` shard (and its token shard): kept when already on disk
    for this plan (and, when merging a sharded build, required to be), else computed."""
    for plan, kind in job.plans():
        for shard in plan:
            keys, augs = job.rows.keys(kind, shard)
            units = [shard]
            if job.token_features:  # token shards share the rows (and keys) of their embedding shard
                units.append(Shard(f"{kind[:-1]}_tokens", shard.index, shard.start, shard.stop))
            if not job.owns(shard):
                continue
            shas = [job.reusable(unit, kind, keys) for unit in units]
            if not all(shas) and job.require_existing:
                job.refuse_missing([u.file for u, sha in zip(units, shas, strict=True) if not sha])
            if all(shas):
                for unit, sha in zip(units, shas, strict=True):
                    job.record(unit, str(sha))
                job.advance(len(keys))
                continue
            for unit, unit_tensors in zip(units, _embed_shard(job, kind, shard, augs), strict=True):
                job.write(unit, kind, keys, unit_tensors)


def _embed_shard(job: BuildJob, kind: str, shard: Shard, augs: list[int]) -> list[dict[str, torch.Tensor]]:
    """The teacher's outputs for one shard's rows: its tensors, then its token shard's."""
    model = job.teachers.teacher().model
    device = job.teachers.device
    embeddings, tokens = [], []
    for first, last in batches(shard.start, shard.stop, job.batch_size):
        with torch.no_grad():
            if kind == "images":
                pixels = job.rows.replayed_pixels(first, last)
                embeddings.append(model.embed_images(pixels).float().cpu())
                if job.token_features:
                    tokens.append(model.encode_image_tokens(model.prepare_pixels(pixels)).float().cpu())
            else:
                texts = job.rows.texts[first:last]
                embeddings.append(model.embed_texts(texts).float().cpu())
                if job.token_features:
                    ids = model.tokenize(texts).to(device)
                    tokens.append(model.encode_text_tokens(ids).float().cpu())
        job.advance(last - first)
    tensors = {"embeddings": torch.cat(embeddings)}
    if kind == "images":
        tensors["aug_ids"] = torch.tensor(augs, dtype=torch.int64)
    return [tensors, {"tokens": torch.cat(tokens)}] if job.token_features else [tensors]


def _remove_stale_shards(out: Path, entries: dict[str, list[dict[str, Any]]]) -> None:
    """Shards of an earlier, different build (e.g. more rows, tokens) that this manifest does not list."""
    planned = {e["file"] for es in entries.values() for e in es}
    for stale in out.iterdir():
        if SHARD_RE.match(stale.name) and stale.name not in planned:
            stale.unlink()


def _manifest(
    job: BuildJob,
    headers: _Headers,
    subset: PairedDataset,
    split: str,
    prep: dict[str, Any],
    token_features: bool,
    shard_size: int,
) -> dict[str, Any]:
    # Loads the teacher when every shard was reused after a crash: the manifest still needs these.
    teacher = job.teachers.teacher()
    rows = job.rows
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "header_hash": headers.request_hash,
        "shard_headers": headers.shard_headers,
        "teacher": {
            "spec": job.teachers.spec,
            "fingerprint": headers.header["teacher"]["fingerprint"],
            "embed_dim": int(teacher.model.embed_dim),
            "logit_scale": float(teacher.logit_scale),
        },
        "dataset": {
            "name": subset.name,
            "source": subset.source,
            "split": split,
            "fingerprint": headers.header["dataset"]["fingerprint"],
        },
        "preprocessing": prep,
        "token_features": bool(token_features),
        "shard_size": int(shard_size),
        "row_order": {
            "images": "row r = augmentation (r % k) of image_ids[r // k]; aug_ids tensor and metadata keys per row",
            "texts": "row r = caption_ids[r]; metadata keys per row",
        },
        "counts": {
            "images": len(rows.image_ids),
            "captions": len(rows.caption_ids),
            "image_rows": rows.image_rows,
            "text_rows": len(rows.caption_ids),
        },
        "image_ids": rows.image_ids,
        "caption_ids": rows.caption_ids,
        "shards": job.entries,
    }
    if headers.fusion is not None:
        loaded = job.teachers.fusion()
        manifest["fusion"] = {
            **headers.fusion,
            "kind": loaded.kind,
            "global_dim": loaded.global_dim,
            "pooled_dim": loaded.pooled_dim,
            "dual_spec": loaded.dual_spec,
        }
    return manifest
