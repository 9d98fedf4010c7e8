"""The teacher cache: teacher outputs computed once, stored as safetensors shards + a manifest.

Running a large teacher every step dominates distillation cost, yet its outputs depend only on
(image, augmentation, caption, teacher, preprocessing). So :func:`build_cache` computes them
once for k fixed augmentations per image (MobileCLIP's "dataset reinforcement": augmentation
``a`` of image ``i`` is replayed bit-for-bit by :func:`~clipdistill.data.augment.replay_augmentation`
in every training process), and :class:`CachedTeacher` serves them to a method exactly like
:class:`~clipdistill.distill.teacher_source.OnlineTeacher` would.

Every row is keyed by (sample id, caption id, augmentation id, teacher, preprocessing hash),
never by its row index: the ids of each row are stored inside the shard itself and the teacher
and preprocessing are named by the shard's ``header`` hash, so a reordered or filtered dataset
can never silently read another image's output. A cache built for another teacher, dataset,
split, preprocessing or k is refused with the field, both values and the rebuild command.

Layout of a cache folder::

    images-00000.safetensors   embeddings (n, D) float32, aug_ids (n,) int64; metadata keys = image ids
    texts-00000.safetensors    embeddings (m, D) float32;                    metadata keys = caption ids
    image_tokens-00000.safetensors, text_tokens-00000.safetensors   tokens (optional, same rows)
    fusion_images-00000.safetensors   fusion teacher states (rows, N, ...), global (rows, G)   (optional)
    fusion_texts-00000.safetensors    fusion states ragged (tokens, ...), lengths (m,), global (m, G)
    manifest.json              written last, atomically: a cache without it is unfinished

Image rows are image-major: global row ``r`` holds augmentation ``r % k`` of image
``image_ids[r // k]``; text rows follow ``caption_ids``. Shard ``s`` holds rows
``[start, start + rows)`` as listed in the manifest.

**Fusion teacher outputs** (``build_cache(..., fusion=SPEC)``, ``cache build --fusion SPEC``).
MCAD and DCD need fusion match logits for pairs *inside a training batch* (all B² of them, or
each row's dual top-k, or each query's mined candidates), and which pairs share a batch is
decided by the run's epoch plan (seed, epoch, batch size). A pair table is therefore either all
N_images·k × N_captions pairs (about 42M for the emoji train split, quadratic in the data) or
tied to one (seed, batch size, epochs) plan and useless to every other run. So we cache what is
exact for any plan instead: the fusion teacher's **per-item states** (see
:mod:`clipdistill.models.fusion`: everything that depends on one image row or one caption,
i.e. the dual towers' tokens after the fusion teacher's input projections, and its dual-stage
embeddings), keyed exactly like the embeddings. Per step, :class:`CachedTeacher` gathers the
batch's states and the method runs only the fusion **pair head** on the pairs it needs (for
``fusion:`` one pooled cross-attention layer each way plus an MLP: all 128² pairs of a batch
in about 0.15 s on one CPU thread); the towers, the expensive part, never run in training.
Scores, pooled pair features and the heads g, h are then the same function of the same inputs
online and cached, so losses agree to float rounding. The fusion shards carry their own headers (fusion spec and
weights fingerprint added), so adding a fusion teacher to a cache reuses its embedding shards.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clipdistill.data.augment import replay_augmentation
from clipdistill.data.dataset import PairedDataset
from clipdistill.data.images import load_image_tensor, to_unit
from clipdistill.distill.base import Batch, TeacherOutputs, TeacherSource
from clipdistill.io import atomic_path, atomic_write_json
from clipdistill.models.text_minilm import minilm_memo

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "FUSION_KINDS",
    "MANIFEST_FILE",
    "CacheCorruptError",
    "CacheError",
    "CacheKeyError",
    "CacheMismatchError",
    "CachedTeacher",
    "TokenFeaturesUnavailableError",
    "build_cache",
    "dataset_fingerprint",
    "preprocessing_hash",
    "read_manifest",
    "teacher_fingerprint",
]

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
_SHARD_RE = re.compile(r"^(images|texts|image_tokens|text_tokens|fusion_images|fusion_texts)-\d{5}\.safetensors$")
#: Which header (and which row keys) each kind of shard is checked against.
_HEADER_OF = {
    "images": "images",
    "image_tokens": "images",
    "texts": "texts",
    "text_tokens": "texts",
    "fusion_images": "fusion_images",
    "fusion_texts": "fusion_texts",
}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


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


# --- fingerprints -----------------------------------------------------------------------------
def _canonical_hash(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def _preprocessing(
    image_size: int, k_augmentations: int, seed: int, aug_scale: Sequence[float], aug_max_shift: float
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "image_size": int(image_size),
        "k_augmentations": int(k_augmentations),
        "seed": int(seed),
        "aug_scale": [float(x) for x in aug_scale],
        "aug_max_shift": float(aug_max_shift),
        "pipeline": PIPELINE,
    }
    params["hash"] = _canonical_hash(params)
    return params


def preprocessing_hash(
    image_size: int, k_augmentations: int, seed: int, aug_scale: Sequence[float], aug_max_shift: float
) -> str:
    """Hash of everything that decides the pixels the teacher saw (size, augmentation, seed, k)."""
    return _preprocessing(image_size, k_augmentations, seed, aug_scale, aug_max_shift)["hash"]


def _teacher_files(spec: str) -> list[Path] | None:
    """The files holding a teacher's weights when its spec names a path (whose content can
    change under the same spec, e.g. a retrained ``run:``), else ``None`` (a zoo name or hub
    id already names fixed weights)."""
    from clipdistill.models.spec import parse_spec

    parsed = parse_spec(spec)
    if parsed.schema == "fusion":
        from clipdistill.models import fusion

        directory = Path(parsed.name)
        fusion.read_fusion_config(directory)  # a missing or foreign folder is an error naming it
        return [directory / name for name in (fusion.CONFIG_FILE, fusion.WEIGHTS_FILE) if (directory / name).is_file()]
    if parsed.schema == "run":
        from clipdistill.models import lit, students
        from clipdistill.models.teachers import resolve_run_dir

        kind, directory = resolve_run_dir(parsed.name)
        names = (lit.MODEL_FILE, lit.WEIGHTS_FILE) if kind == "lit" else (students.CONFIG_FILE, students.WEIGHTS_FILE)
        return [directory / name for name in names if (directory / name).is_file()]
    if parsed.schema in ("local-dir", "hf", "blip-itm") and Path(parsed.name).is_dir():
        directory = Path(parsed.name)
        return sorted(
            p
            for p in directory.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix in (".json", *_WEIGHT_SUFFIXES)
        )
    if parsed.schema == "openclip" and parsed.pretrained and Path(parsed.pretrained).is_file():
        return [Path(parsed.pretrained)]
    return None


def teacher_fingerprint(spec: str) -> str | None:
    """sha256 over the teacher's weight/config files for path specs; ``None`` for named models."""
    files = _teacher_files(spec)
    if files is None:
        return None
    return _canonical_hash([[p.name, _file_sha256(p)] for p in files])


def _same_teacher(cached: dict[str, Any], spec: str, fingerprint: str | None) -> bool:
    """Same weights, wherever they live: a moved run folder is the same teacher, a retrained
    one at the same path is not. Without fingerprints only the spec string can be compared."""
    if cached.get("fingerprint") and fingerprint:
        return cached["fingerprint"] == fingerprint
    return cached.get("spec") == spec


# --- the plan: which rows go in which shard -------------------------------------------------------
@dataclass(frozen=True)
class _Shard:
    kind: str
    index: int
    start: int
    stop: int

    @property
    def file(self) -> str:
        return f"{self.kind}-{self.index:05d}.safetensors"


def _shards(kind: str, total: int, shard_size: int) -> list[_Shard]:
    return [
        _Shard(kind, index, start, min(start + shard_size, total))
        for index, start in enumerate(range(0, total, shard_size))
    ]


def _image_row_keys(image_ids: Sequence[str], k: int, start: int, stop: int) -> tuple[list[str], list[int]]:
    rows = range(start, stop)
    return [image_ids[r // k] for r in rows], [r % k for r in rows]


def _content_sha256(tensors: dict[str, torch.Tensor], keys: Sequence[str]) -> str:
    """Hash of a shard's tensors and row keys, stored in the shard itself so a shard left by a
    crashed build can be verified (and reused) before any manifest exists."""
    digest = hashlib.sha256(json.dumps(list(keys), ensure_ascii=False).encode("utf-8"))
    for name in sorted(tensors):
        tensor = tensors[name].contiguous().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def _shard_metadata(header_hash: str, shard: _Shard, keys: Sequence[str], content: str) -> dict[str, str]:
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


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({name: t.contiguous().cpu() for name, t in tensors.items()}, str(tmp), metadata=metadata)
    return _file_sha256(path)


def _reusable(path: Path, header_hash: str, shard: _Shard, keys: Sequence[str]) -> str | None:
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
        if _content_sha256(load_file(str(path)), keys) != meta.get("content_sha256"):
            return None
    except Exception:  # any unreadable shard is simply recomputed
        return None
    return _file_sha256(path)


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


def _manifest_matches(out: Path, header_hash: str) -> bool:
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
            if not file.is_file() or _file_sha256(file) != entry["sha256"]:
                return False
    return True


# --- build ------------------------------------------------------------------------------------
def _batches(start: int, stop: int, size: int) -> Iterator[tuple[int, int]]:
    for first in range(start, stop, size):
        yield first, min(first + size, stop)


@minilm_memo()  # its dual pass and fusion pass encode the same captions (and captions repeat)
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
) -> Path:
    """Compute the teacher's outputs for every image × augmentation 0..k-1 and every caption of
    ``split``, and write them to ``out`` (see the module docstring for the layout).

    ``fusion`` (a ``fusion:``/``blip-itm:`` spec) also stores that fusion teacher's per-item
    states for the same rows (see the module docstring for why states, not pair scores).

    Pixels are produced exactly as the trainer produces them: decode at ``image_size``
    (default: the teacher's input size), :func:`to_unit`, :func:`replay_augmentation` with
    ``seed``/``aug_scale``/``aug_max_shift``; the teacher then resizes/normalises them itself.

    Resumable: a shard already on disk whose header, keys and content hash match is kept, so a
    crashed build only computes what is missing; a finished cache for the same request is left
    untouched. ``manifest.json`` is written last, so a folder without it is never read.

    Sharded (``distill/sharded.py``): ``shard_owner=(rank, world)`` computes only the shards
    whose index ≡ rank (mod world) and writes no manifest; the merge is a second call with
    ``require_existing=True``, which verifies every shard on disk (header, keys, content hash)
    and refuses, naming the shard, to compute one that is missing or corrupt.
    """
    from clipdistill.device import resolve_device
    from clipdistill.models.spec import parse_fusion_spec, parse_spec

    if k_augmentations < 1:
        raise CacheError(f"k_augmentations must be >= 1, got {k_augmentations}")
    if shard_size < 1 or batch_size < 1:
        raise CacheError(f"shard_size and batch_size must be >= 1, got {shard_size} and {batch_size}")
    out = Path(out)
    spec = str(parse_spec(teacher_spec))  # a typo fails before any work
    fusion_spec = str(parse_fusion_spec(fusion)) if fusion else None
    torch_device = resolve_device(str(device))
    fingerprint = teacher_fingerprint(spec)
    subset = dataset.split(split)
    subset.check_files()

    teacher = None

    def get_teacher() -> Any:
        nonlocal teacher
        if teacher is None:
            from clipdistill.models.teachers import load_teacher

            teacher = load_teacher(spec, device=torch_device)
            if token_features:
                _check_token_features(teacher.model, spec)
        return teacher

    fusion_teacher = None

    def get_fusion() -> Any:
        nonlocal fusion_teacher
        if fusion_teacher is None:
            from clipdistill.models.teachers import load_fusion_teacher

            fusion_teacher = load_fusion_teacher(str(fusion_spec), device=torch_device)
        return fusion_teacher

    if token_features:
        get_teacher()  # refuse a teacher without token features before anything else
    if image_size is None:
        height, width = get_teacher().model.image_size
        if height != width:
            raise CacheError(f"teacher {spec} takes {height}x{width} images; pass image_size explicitly")
        image_size = int(height)

    k = int(k_augmentations)
    prep = _preprocessing(image_size, k, seed, aug_scale, aug_max_shift)
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "teacher": {"spec": spec, "fingerprint": fingerprint},
        "dataset": {"split": split, "fingerprint": dataset_fingerprint(subset)},
        "preprocessing": prep,
        "token_features": bool(token_features),
        "shard_size": int(shard_size),
    }
    header_hash = _canonical_hash(header)
    # Caption embeddings do not depend on pixels, so text shards carry a header without the
    # preprocessing: changing k or the augmentation reuses them instead of re-encoding text.
    text_header = {key: value for key, value in header.items() if key != "preprocessing"}
    shard_headers = {"images": header_hash, "texts": _canonical_hash(text_header)}
    fusion_info = None
    request_hash = header_hash
    if fusion_spec is not None:
        fusion_info = {"spec": fusion_spec, "fingerprint": teacher_fingerprint(fusion_spec)}
        shard_headers["fusion_images"] = request_hash = _canonical_hash({**header, "fusion": fusion_info})
        shard_headers["fusion_texts"] = _canonical_hash({**text_header, "fusion": fusion_info})
    if _manifest_matches(out, request_hash):
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)  # a half-rebuilt folder must never look finished

    image_ids = [record.image_id for record in subset.images]
    paths = subset.image_paths()
    caption_ids = subset.caption_ids()
    texts = subset.texts()
    image_plan = _shards("images", len(image_ids) * k, shard_size)
    text_plan = _shards("texts", len(caption_ids), shard_size)
    entries: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS[: 4 if token_features else 2]}
    if fusion_info is not None:
        entries.update({kind: [] for kind in FUSION_KINDS})

    bar = None
    if progress:
        from tqdm import tqdm

        passes = 2 if fusion_info is not None else 1
        total = passes * (len(image_ids) * k + len(caption_ids))
        bar = tqdm(total=total, desc="teacher cache", unit="row", leave=False)

    def entry(shard: _Shard, sha: str) -> dict[str, Any]:
        return {"file": shard.file, "sha256": sha, "start": shard.start, "rows": shard.stop - shard.start}

    def replayed_pixels(first: int, last: int) -> torch.Tensor:
        """Unit pixels of image rows [first, last), exactly as the trainer replays them."""
        batch_keys, batch_augs = _image_row_keys(image_ids, k, first, last)
        unique = sorted({r // k for r in range(first, last)})
        decoded = to_unit(load_image_tensor([paths[i] for i in unique], image_size))
        where = {index: row for row, index in enumerate(unique)}
        unit_pixels = decoded[[where[r // k] for r in range(first, last)]]
        return replay_augmentation(
            unit_pixels, batch_keys, batch_augs, seed=seed, scale=aug_scale, max_shift=aug_max_shift
        ).to(torch_device)

    for plan, kind in ((image_plan, "images"), (text_plan, "texts")):
        for shard in plan:
            if kind == "images":
                keys, augs = _image_row_keys(image_ids, k, shard.start, shard.stop)
            else:
                keys, augs = caption_ids[shard.start : shard.stop], []
            units = [shard]
            if token_features:  # token shards share the rows (and keys) of their embedding shard
                units.append(_Shard(f"{kind[:-1]}_tokens", shard.index, shard.start, shard.stop))
            if shard_owner is not None and shard.index % shard_owner[1] != shard_owner[0]:
                continue
            shas = [_reusable(out / unit.file, shard_headers[kind], unit, keys) for unit in units]
            if not all(shas) and require_existing:
                _refuse_missing(out, [u.file for u, sha in zip(units, shas, strict=True) if not sha])
            if all(shas):
                for unit, sha in zip(units, shas, strict=True):
                    entries[unit.kind].append(entry(unit, str(sha)))
                if bar is not None:
                    bar.update(len(keys))
                continue
            model = get_teacher().model
            embeddings, tokens = [], []
            for first, last in _batches(shard.start, shard.stop, batch_size):
                with torch.no_grad():
                    if kind == "images":
                        pixels = replayed_pixels(first, last)
                        embeddings.append(model.embed_images(pixels).float().cpu())
                        if token_features:
                            tokens.append(model.encode_image_tokens(model.prepare_pixels(pixels)).float().cpu())
                    else:
                        embeddings.append(model.embed_texts(texts[first:last]).float().cpu())
                        if token_features:
                            ids = model.tokenize(texts[first:last]).to(torch_device)
                            tokens.append(model.encode_text_tokens(ids).float().cpu())
                if bar is not None:
                    bar.update(last - first)
            tensors = {"embeddings": torch.cat(embeddings)}
            if kind == "images":
                tensors["aug_ids"] = torch.tensor(augs, dtype=torch.int64)
            written = [(shard, tensors)]
            if token_features:
                written.append((units[1], {"tokens": torch.cat(tokens)}))
            for unit, unit_tensors in written:
                meta = _shard_metadata(shard_headers[kind], unit, keys, _content_sha256(unit_tensors, keys))
                entries[unit.kind].append(entry(unit, _write_shard(out / unit.file, unit_tensors, meta)))

    if fusion_info is not None:  # the fusion teacher's per-item states, same rows and keys
        for plan, kind in ((image_plan, "images"), (text_plan, "texts")):
            fusion_kind = f"fusion_{kind}"
            for shard in plan:
                if shard_owner is not None and shard.index % shard_owner[1] != shard_owner[0]:
                    continue
                unit = _Shard(fusion_kind, shard.index, shard.start, shard.stop)
                if kind == "images":
                    keys = _image_row_keys(image_ids, k, shard.start, shard.stop)[0]
                else:
                    keys = caption_ids[shard.start : shard.stop]
                sha = _reusable(out / unit.file, shard_headers[fusion_kind], unit, keys)
                if sha is None and require_existing:
                    _refuse_missing(out, [unit.file])
                if sha is None:
                    unit_tensors = _fusion_states_shard(
                        get_fusion(), kind, shard, batch_size, replayed_pixels, texts, bar
                    )
                    meta = _shard_metadata(shard_headers[fusion_kind], unit, keys, _content_sha256(unit_tensors, keys))
                    sha = _write_shard(out / unit.file, unit_tensors, meta)
                elif bar is not None:
                    bar.update(len(keys))
                entries[fusion_kind].append(entry(unit, sha))
    if bar is not None:
        bar.close()
    if shard_owner is not None:  # one process's part of a sharded build: the merge writes the manifest
        return out

    planned = {e["file"] for es in entries.values() for e in es}
    for stale in out.iterdir():  # shards of an earlier, different build (e.g. more rows, tokens)
        if _SHARD_RE.match(stale.name) and stale.name not in planned:
            stale.unlink()

    if teacher is None:  # every shard was reused after a crash: the manifest still needs these
        get_teacher()
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "header_hash": request_hash,
        "shard_headers": shard_headers,
        "teacher": {
            "spec": spec,
            "fingerprint": fingerprint,
            "embed_dim": int(teacher.model.embed_dim),
            "logit_scale": float(teacher.logit_scale),
        },
        "dataset": {
            "name": subset.name,
            "source": subset.source,
            "split": split,
            "fingerprint": header["dataset"]["fingerprint"],
        },
        "preprocessing": prep,
        "token_features": bool(token_features),
        "shard_size": int(shard_size),
        "row_order": {
            "images": "row r = augmentation (r % k) of image_ids[r // k]; aug_ids tensor and metadata keys per row",
            "texts": "row r = caption_ids[r]; metadata keys per row",
        },
        "counts": {
            "images": len(image_ids),
            "captions": len(caption_ids),
            "image_rows": len(image_ids) * k,
            "text_rows": len(caption_ids),
        },
        "image_ids": image_ids,
        "caption_ids": caption_ids,
        "shards": entries,
    }
    if fusion_info is not None:
        loaded = get_fusion()
        manifest["fusion"] = {
            **fusion_info,
            "kind": loaded.kind,
            "global_dim": loaded.global_dim,
            "pooled_dim": loaded.pooled_dim,
            "dual_spec": loaded.dual_spec,
        }
    atomic_write_json(out / MANIFEST_FILE, manifest)
    return out


def _refuse_missing(out: Path, files: list[str]) -> None:
    raise CacheCorruptError(
        f"merging the sharded cache {out}: shard(s) {', '.join(files)} are missing or fail verification "
        "(header, keys or content hash); rerun the sharded build, which recomputes only those"
    )


def _fusion_states_shard(
    fusion: Any,
    kind: str,
    shard: _Shard,
    batch_size: int,
    replayed_pixels: Any,
    texts: Sequence[str],
    bar: Any,
) -> dict[str, torch.Tensor]:
    """The fusion teacher's per-item states for one shard's rows. Caption states are stored
    ragged (only real tokens, plus ``lengths``): captions are short and padding them all to the
    longest would multiply the text shards' size."""
    from clipdistill.models.fusion import unpad_texts

    def host(tensor: torch.Tensor) -> torch.Tensor:
        return (tensor.float() if tensor.is_floating_point() else tensor).cpu()

    states: list[torch.Tensor] = []
    globals_: list[torch.Tensor] = []
    lengths: list[int] = []
    for first, last in _batches(shard.start, shard.stop, batch_size):
        if kind == "images":
            image, image_global = fusion.image_states(replayed_pixels(first, last))
            states.append(host(image))
            globals_.append(host(image_global))
        else:
            text, mask, text_global = fusion.text_states(texts[first:last])
            rows = unpad_texts(host(text), mask.cpu())
            states.extend(rows)
            lengths.extend(len(row) for row in rows)
            globals_.append(host(text_global))
        if bar is not None:
            bar.update(last - first)
    tensors = {"states": torch.cat(states), "global": torch.cat(globals_)}
    if kind == "texts":
        tensors["lengths"] = torch.tensor(lengths, dtype=torch.int64)
    return tensors


def _check_token_features(model: Any, spec: str) -> None:
    missing = [
        name for name in ("encode_image_tokens", "encode_text_tokens") if not callable(getattr(model, name, None))
    ]
    if missing:
        raise TokenFeaturesUnavailableError(
            f"teacher {spec} ({type(model).__name__}) does not provide token features (no {', '.join(missing)}); "
            "build the cache without --token-features"
        )


# --- read -------------------------------------------------------------------------------------
def _rebuild_hint(
    path: Path,
    spec: str,
    dataset: PairedDataset,
    split: str,
    prep: dict[str, Any],
    token_features: bool,
    fusion: str | None = None,
) -> str:
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


class CachedTeacher(TeacherSource):
    """Serves cached teacher outputs by id; a drop-in for :class:`OnlineTeacher`.

    All shards are held in memory (embeddings of a few thousand images are a few MB) and a
    batch is a dict lookup per row plus one ``index_select``, which is what keeps training
    from the cache close to the cost of training the student alone.
    """

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        image_table: torch.Tensor,
        image_rows: dict[tuple[str, int], int],
        text_table: torch.Tensor,
        text_rows: dict[str, int],
        image_tokens: torch.Tensor | None = None,
        text_tokens: torch.Tensor | None = None,
        device: str | torch.device = "cpu",
        fusion_tables: dict[str, torch.Tensor] | None = None,
        fusion: Any = None,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.spec: str = manifest["teacher"]["spec"]
        self.embed_dim: int = int(manifest["teacher"]["embed_dim"])
        self.k_augmentations: int = int(manifest["preprocessing"]["k_augmentations"])
        self._image_rows = image_rows
        self._text_rows = text_rows
        self._tables: dict[str, torch.Tensor | None] = {
            "image": image_table,
            "text": text_table,
            "image_tokens": image_tokens,
            "text_tokens": text_tokens,
            "logit_scale": torch.tensor(float(manifest["teacher"]["logit_scale"]), dtype=torch.float32),
        }
        # Fusion states: image rows (rows, N, ...) and globals; captions ragged: ``text_flat``
        # rows [text_offsets[j], text_offsets[j] + text_lengths[j]) are caption j's tokens.
        self._fusion_tables: dict[str, torch.Tensor] = dict(fusion_tables or {})
        self.fusion = fusion  # the frozen fusion teacher whose pair head scores the states
        self._device = torch.device("cpu")
        self.device = device

    @property
    def device(self) -> torch.device:
        return self._device

    @device.setter
    def device(self, value: str | torch.device) -> None:
        """Setting the device moves the tables there, so gathering a batch is one on-device
        ``index_select`` and nothing is copied host-to-device per step."""
        self._device = torch.device(value)
        self._tables = {name: None if t is None else t.to(self._device) for name, t in self._tables.items()}
        self._fusion_tables = {name: t.to(self._device) for name, t in self._fusion_tables.items()}
        if self.fusion is not None:
            self.fusion.to(self._device)

    def to(self, device: str | torch.device) -> CachedTeacher:
        self.device = device
        return self

    @property
    def logit_scale(self) -> torch.Tensor:
        """The teacher's log logit scale as recorded when the cache was built."""
        table = self._tables["logit_scale"]
        assert table is not None
        return table

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        teacher_spec: str,
        dataset: PairedDataset,
        split: str = "train",
        image_size: int,
        k_augmentations: int,
        seed: int,
        aug_scale: Sequence[float],
        aug_max_shift: float,
        token_features: bool = False,
        device: str | torch.device = "cpu",
        fusion: str | None = None,
    ) -> CachedTeacher:
        """Open a cache after checking it was built for exactly this request.

        Each field the trainer depends on is compared and a difference is a
        :class:`CacheMismatchError` naming the field, both values and the rebuild command; a
        missing or altered shard is a :class:`CacheCorruptError` naming the file.

        ``fusion`` (a fusion teacher spec) also serves that teacher's per-item states
        (:attr:`TeacherOutputs.fusion`) and loads its pair head (``self.fusion``); the cache must
        have been built with the same fusion teacher (same weights).
        """
        from clipdistill.models.spec import parse_fusion_spec, parse_spec

        path = Path(path)
        manifest = read_manifest(path)
        spec = str(parse_spec(teacher_spec))
        fusion_spec = str(parse_fusion_spec(fusion)) if fusion else None
        try:
            fingerprint = teacher_fingerprint(spec)
        except (OSError, ValueError):  # the teacher folder may be gone: the cache is all we need
            fingerprint = None
        prep = _preprocessing(image_size, k_augmentations, seed, aug_scale, aug_max_shift)
        hint = _rebuild_hint(path, spec, dataset, split, prep, token_features, fusion_spec)
        subset = dataset.split(split)
        cached_prep = manifest["preprocessing"]

        def refuse(field: str, cached: Any, requested: Any) -> CacheMismatchError:
            return CacheMismatchError(
                f"teacher cache {path} was built for {field}={cached!r} but {field}={requested!r} was requested; {hint}"
            )

        teacher = manifest["teacher"]
        if not _same_teacher(teacher, spec, fingerprint):
            cached = teacher["spec"] + (f" (weights {teacher['fingerprint'][:12]})" if teacher["fingerprint"] else "")
            requested = spec + (f" (weights {fingerprint[:12]})" if fingerprint else "")
            raise refuse("teacher", cached, requested)
        if manifest["dataset"]["split"] != split:
            raise refuse("split", manifest["dataset"]["split"], split)
        requested_fingerprint = dataset_fingerprint(subset)
        if manifest["dataset"]["fingerprint"] != requested_fingerprint:
            raise CacheMismatchError(
                f"teacher cache {path} was built for another dataset: dataset_fingerprint="
                f"{manifest['dataset']['fingerprint'][:12]} in the cache but {requested_fingerprint[:12]} for "
                f"{subset.name} (image ids, caption ids or caption texts differ); {hint}"
            )
        for field in ("k_augmentations", "image_size", "seed", "aug_scale", "aug_max_shift", "pipeline"):
            if cached_prep.get(field) != prep[field]:
                raise refuse(field, cached_prep.get(field), prep[field])
        if cached_prep.get("hash") != prep["hash"]:
            raise refuse("preprocessing_hash", cached_prep.get("hash"), prep["hash"])
        if token_features and not manifest.get("token_features"):
            raise refuse("token_features", False, True)
        fusion_teacher = None
        if fusion_spec is not None:
            cached_fusion = manifest.get("fusion")
            if not cached_fusion:
                raise refuse("fusion", None, fusion_spec)
            try:
                fusion_fingerprint = teacher_fingerprint(fusion_spec)
            except (OSError, ValueError):
                fusion_fingerprint = None
            if not _same_teacher(cached_fusion, fusion_spec, fusion_fingerprint):
                raise refuse("fusion", cached_fusion["spec"], fusion_spec)
            from clipdistill.models.teachers import load_fusion_teacher

            # Only the pair head is needed: the states it scores come from the cache.
            fusion_teacher = load_fusion_teacher(fusion_spec, with_encoders=False)
        loaded = cls._load(path, manifest, token_features=token_features, device="cpu", fusion=fusion_spec is not None)
        loaded.fusion = fusion_teacher
        loaded.device = device
        return loaded

    @classmethod
    def _load(
        cls,
        path: Path,
        manifest: dict[str, Any],
        *,
        token_features: bool,
        device: str | torch.device,
        fusion: bool = False,
    ) -> Any:
        from safetensors import safe_open

        k = int(manifest["preprocessing"]["k_augmentations"])
        image_ids: list[str] = manifest["image_ids"]
        caption_ids: list[str] = manifest["caption_ids"]

        def load(kind: str, tensor: str) -> tuple[torch.Tensor, list[str], torch.Tensor | None]:
            parts, keys, augs = [], [], []
            extra: dict[str, list[torch.Tensor]] = {}
            for entry in manifest["shards"][kind]:
                file = path / entry["file"]
                if not file.is_file():
                    raise CacheCorruptError(f"teacher cache shard {file} is missing; rebuild the cache")
                if _file_sha256(file) != entry["sha256"]:
                    raise CacheCorruptError(
                        f"teacher cache shard {file} fails its sha256 checksum (corrupt or changed since the "
                        "manifest was written); rebuild the cache"
                    )
                with safe_open(str(file), framework="pt") as handle:
                    meta = handle.metadata() or {}
                    shard_keys = json.loads(meta.get("keys", "[]"))
                    start, rows = int(entry["start"]), int(entry["rows"])
                    header_kind = _HEADER_OF[kind]
                    expected = (
                        _image_row_keys(image_ids, k, start, start + rows)[0]
                        if header_kind in ("images", "fusion_images")
                        else caption_ids[start : start + rows]
                    )
                    header = manifest["shard_headers"][header_kind]
                    if meta.get("header") != header or shard_keys != expected:
                        raise CacheCorruptError(f"teacher cache shard {file} belongs to another build; rebuild")
                    parts.append(handle.get_tensor(tensor))
                    if kind == "images":
                        augs.append(handle.get_tensor("aug_ids"))
                    if kind in FUSION_KINDS:
                        names = [name for name in handle.keys() if name != tensor]  # noqa: SIM118 (not a dict)
                        for name in names:
                            extra.setdefault(name, []).append(handle.get_tensor(name))
                keys.extend(shard_keys)
            loaded_extra[kind] = {name: torch.cat(values) for name, values in extra.items()}
            return torch.cat(parts), keys, torch.cat(augs) if augs else None

        loaded_extra: dict[str, dict[str, torch.Tensor]] = {}

        image_table, image_keys, aug_ids = load("images", "embeddings")
        text_table, text_keys, _ = load("texts", "embeddings")
        assert aug_ids is not None
        image_rows = {(key, int(a)): row for row, (key, a) in enumerate(zip(image_keys, aug_ids.tolist(), strict=True))}
        text_rows = {key: row for row, key in enumerate(text_keys)}
        image_tokens = load("image_tokens", "tokens")[0] if token_features else None
        text_tokens = load("text_tokens", "tokens")[0] if token_features else None
        fusion_tables: dict[str, torch.Tensor] = {}
        if fusion:
            fusion_tables["image"] = load("fusion_images", "states")[0]
            fusion_tables["image_global"] = loaded_extra["fusion_images"]["global"]
            fusion_tables["text_flat"] = load("fusion_texts", "states")[0]
            lengths = loaded_extra["fusion_texts"]["lengths"]
            fusion_tables["text_lengths"] = lengths
            fusion_tables["text_offsets"] = torch.cumsum(lengths, 0) - lengths
            fusion_tables["text_global"] = loaded_extra["fusion_texts"]["global"]
        return cls(
            path,
            manifest,
            image_table,
            image_rows,
            text_table,
            text_rows,
            image_tokens,
            text_tokens,
            device,
            fusion_tables=fusion_tables,
        )

    def _rows_for_images(self, batch: Batch) -> torch.Tensor:
        augs = [int(a) for a in batch.aug_ids.tolist()]
        rows = []
        for image_id, aug in zip(batch.image_ids, augs, strict=True):
            row = self._image_rows.get((image_id, aug))
            if row is None:
                raise CacheKeyError(
                    f"image {image_id!r} with augmentation {aug} is not in the teacher cache {self.path} "
                    f"(it holds augmentations 0..{self.k_augmentations - 1} of the "
                    f"{self.manifest['dataset']['split']!r} split's images)"
                )
            rows.append(row)
        return torch.tensor(rows, dtype=torch.long, device=self._device)

    def _rows_for_captions(self, batch: Batch) -> torch.Tensor:
        rows = []
        for caption_id in batch.caption_ids:
            row = self._text_rows.get(caption_id)
            if row is None:
                raise CacheKeyError(
                    f"caption {caption_id!r} is not in the teacher cache {self.path} "
                    f"(it holds the {self.manifest['dataset']['split']!r} split's captions)"
                )
            rows.append(row)
        return torch.tensor(rows, dtype=torch.long, device=self._device)

    def __call__(self, batch: Batch) -> TeacherOutputs:
        image_rows = self._rows_for_images(batch)
        text_rows = self._rows_for_captions(batch)
        tables = self._tables
        image_tokens, text_tokens = tables["image_tokens"], tables["text_tokens"]
        assert tables["image"] is not None and tables["text"] is not None
        return TeacherOutputs(
            image=tables["image"].index_select(0, image_rows),
            text=tables["text"].index_select(0, text_rows),
            logit_scale=self.logit_scale,
            image_tokens=None if image_tokens is None else image_tokens.index_select(0, image_rows),
            text_tokens=None if text_tokens is None else text_tokens.index_select(0, text_rows),
            fusion=self._fusion_states(image_rows, text_rows) if self._fusion_tables else None,
        )

    def _fusion_states(self, image_rows: torch.Tensor, text_rows: torch.Tensor) -> Any:
        """The batch's fusion states: image rows gathered, captions re-padded to the batch's
        longest (zeros + mask, as the fusion teacher pads them online)."""
        from clipdistill.models.fusion import FusionStates

        tables = self._fusion_tables
        lengths = tables["text_lengths"].index_select(0, text_rows)
        starts = tables["text_offsets"].index_select(0, text_rows)
        positions = torch.arange(int(lengths.max()), device=self._device)
        mask = positions[None, :] < lengths[:, None]
        flat_index = (starts[:, None] + positions[None, :]).clamp(max=tables["text_flat"].shape[0] - 1)
        text = tables["text_flat"][flat_index]
        text = torch.where(mask.view(*mask.shape, *([1] * (text.dim() - 2))), text, torch.zeros_like(text))
        return FusionStates(
            image=tables["image"].index_select(0, image_rows),
            image_global=tables["image_global"].index_select(0, image_rows),
            text=text,
            text_mask=mask,
            text_global=tables["text_global"].index_select(0, text_rows),
        )
