"""webdataset shards: the tar format large image-text sets ship in (LAION, DataComp, CC12M).

A shard is a plain tar whose members are grouped by key: ``KEY.jpg|jpeg|png|webp`` is the
image and ``KEY.txt`` (one caption) or ``KEY.json`` (ours: ``{"image_id", "split", "captions":
[{"caption_id", "text"}], "concept"}``; img2dataset's: ``{"caption": ...}``) the text. Shards are
named ``00000.tar, 00001.tar, ...`` in one folder (or given as a brace pattern
``DIR/{00000..00099}.tar``), and ``sizes.json`` maps each shard's file name to its sample count,
so a streaming reader knows the epoch length without opening any tar (open_clip's convention).

Two ways in, one format:

- :func:`read_wds` gives the :class:`PairedDataset` every other reader gives (training,
  caching, evaluation, embedding work unchanged). Image paths are *member paths*
  ``SHARD.tar/MEMBER``, which :func:`~clipdistill.data.members.read_member` serves from an index of member offsets, so
  nothing is extracted to disk.
- :class:`WdsStream` streams samples with shard-level splitting: rank r of N takes shards
  r, r+N, ..., and DataLoader worker w of W takes every W-th of those, so each sample is read
  exactly once per epoch by exactly one worker of one process (webdataset's ``split_by_node``
  and ``split_by_worker``, with the rank passed in rather than read from a process group).

:func:`write_wds` (``clipdistill data to-wds``) converts any dataset :func:`load_dataset` reads.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from clipdistill.data.bad_samples import BadSamples, check_policy, default_policy
from clipdistill.data.dataset import SPLITS, Caption, DatasetError, ImageRecord, PairedDataset, make_dataset
from clipdistill.data.members import read_member
from clipdistill.io import atomic_path, atomic_write_json

SIZES_FILE = "sizes.json"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTENSIONS = ("json", "txt")
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


def shard_paths(source: str | Path) -> list[Path]:
    """The shards of a folder (every ``*.tar``, sorted) or of a brace pattern, in order."""
    text = str(source)
    if "{" in text:
        from braceexpand import braceexpand

        paths = [Path(p) for p in braceexpand(text)]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise DatasetError(f"{len(missing)} shard(s) of {text} do not exist, first: {missing[0]}")
        return paths
    folder = Path(source)
    if not folder.is_dir():
        raise DatasetError(f"webdataset source {folder} is neither a folder of .tar shards nor a brace pattern")
    paths = sorted(folder.glob("*.tar"))
    if not paths:
        raise DatasetError(f"{folder} holds no .tar shards")
    return paths


def is_wds(source: str | Path) -> bool:
    """A folder of .tar shards or a brace pattern of them (what :func:`read_wds` reads)."""
    text = str(source)
    if "{" in text and text.endswith(".tar"):
        return True
    folder = Path(source)
    return folder.is_dir() and any(folder.glob("*.tar"))


def read_sizes(paths: Sequence[Path]) -> dict[str, int]:
    """Sample count per shard from ``sizes.json`` beside the shards; error names a missing entry."""
    sizes_path = paths[0].parent / SIZES_FILE
    if not sizes_path.is_file():
        raise DatasetError(f"{sizes_path} is missing: it gives each shard's sample count (write it with to-wds)")
    sizes = json.loads(sizes_path.read_text(encoding="utf-8"))
    missing = [p.name for p in paths if p.name not in sizes]
    if missing:
        raise DatasetError(f"{sizes_path} has no count for shard(s) {', '.join(missing[:5])}")
    return {p.name: int(sizes[p.name]) for p in paths}


# --- one sample ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class WdsSample:
    key: str
    shard: str
    image_member: str
    image: bytes
    meta: dict[str, Any]
    captions: tuple[Caption, ...]


class _BadSample(Exception):
    """One sample's problem: ``where`` (``sample 'KEY'``, ``member KEY.txt``) and ``reason``,
    so the bad-sample policy (stop, naming shard and member, or skip) decides what happens."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where} {reason}")
        self.where = where
        self.reason = reason


def _utf8(data: bytes, member: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _BadSample(
            f"member {member}", f"is not valid UTF-8 (byte 0x{data[error.start]:02x} at offset {error.start})"
        ) from None


def _captions(key: str, meta: dict[str, Any]) -> tuple[Caption, ...]:
    where = f"sample {key!r}"
    if "captions" in meta:
        raw = meta["captions"]
        if not isinstance(raw, list) or not raw:
            raise _BadSample(where, f"field 'captions' must be a non-empty list, got {raw!r}")
        out = []
        for index, item in enumerate(raw):
            if isinstance(item, str):
                out.append(Caption(f"{key}#{index}", item))
            elif isinstance(item, dict) and isinstance(item.get("text"), str):
                out.append(Caption(str(item.get("caption_id", f"{key}#{index}")), item["text"]))
            else:
                raise _BadSample(where, f"field 'captions[{index}]' is not a caption: {item!r}")
        return tuple(out)
    text = meta.get("caption", meta.get("text"))
    if not isinstance(text, str) or not text.strip():
        raise _BadSample(where, "has no caption (a .txt member, or 'caption'/'captions' in .json)")
    return (Caption(f"{key}#0", text.strip()),)


def _meta_of(key: str, payloads: dict[str, tuple[str, bytes]]) -> dict[str, Any]:
    """A sample's text side from its ``json``/``txt`` members (extension -> (member name, bytes))."""
    if "json" in payloads:
        name, data = payloads["json"]
        try:
            meta = json.loads(_utf8(data, name))
        except json.JSONDecodeError as error:
            raise _BadSample(f"member {name}", f"is not valid JSON: {error}") from None
        if not isinstance(meta, dict):
            raise _BadSample(f"member {name}", "must hold a JSON object")
        if "txt" in payloads and "caption" not in meta and "captions" not in meta:
            meta["caption"] = _utf8(payloads["txt"][1], payloads["txt"][0])
        return meta
    if "txt" in payloads:
        return {"caption": _utf8(payloads["txt"][1], payloads["txt"][0])}
    raise _BadSample(f"sample {key!r}", "has an image but no .txt or .json member")


def _group(shard: Path, members: Sequence[tarfile.TarInfo]) -> dict[str, dict[str, tarfile.TarInfo]]:
    """Members by key (the name up to the first dot of the basename) and extension."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    for member in members:
        if not member.isfile():
            continue
        directory, _, base = member.name.rpartition("/")
        stem, dot, extension = base.partition(".")
        if not dot:
            continue
        key = f"{directory}/{stem}" if directory else stem
        groups.setdefault(key, {})[extension.lower()] = member
    return groups


def iter_shard(shard: Path, issues: BadSamples | None = None) -> Iterator[WdsSample]:
    """Every sample of one shard, in tar order. A bad sample (no image, no caption, bad JSON,
    a ``.txt`` that is not UTF-8) goes through ``issues`` (default: stop, naming shard and
    member); an unreadable tar always stops."""
    issues = issues if issues is not None else BadSamples("error")
    try:
        with tarfile.open(shard, "r") as tar:

            def read(member: tarfile.TarInfo) -> bytes:
                handle = tar.extractfile(member)
                assert handle is not None
                return handle.read()

            for key, parts in _group(shard, tar.getmembers()).items():
                try:
                    image_ext = next((e for e in IMAGE_EXTENSIONS if e in parts), None)
                    if image_ext is None:
                        raise _BadSample(f"sample {key!r}", f"has no image member (.{', .'.join(IMAGE_EXTENSIONS)})")
                    texts = {e: (parts[e].name, read(parts[e])) for e in TEXT_EXTENSIONS if e in parts}
                    meta = _meta_of(key, texts)
                    captions = _captions(key, meta)
                except _BadSample as bad:
                    issues.bad(str(shard), bad.where, bad.reason)
                    continue
                yield WdsSample(key, shard.name, parts[image_ext].name, read(parts[image_ext]), meta, captions)
    except tarfile.TarError as error:
        raise DatasetError(f"cannot read shard {shard}: {error}") from error


def read_wds(
    source: str | Path, *, split: str = "train", name: str | None = None, issues: BadSamples | None = None
) -> PairedDataset:
    """All samples of the shards as a :class:`PairedDataset`; images stay inside the tars.

    A sample's split is its JSON ``split`` field when present, else ``split``. ``issues`` sets
    what a bad sample does (``--on-bad-sample``: stop naming shard and member, or skip it)."""
    issues = issues if issues is not None else BadSamples("error")
    paths = shard_paths(source)
    records = []
    for shard in paths:
        for sample in iter_shard(shard, issues):
            meta = sample.meta
            record_split = str(meta.get("split", split))
            record_split = "train" if record_split == "restval" else record_split
            records.append(
                ImageRecord(
                    image_id=str(meta.get("image_id", f"{shard.stem}/{sample.key}")),
                    path=shard / sample.image_member,
                    split=record_split,
                    captions=sample.captions,
                    concept=str(meta.get("concept", "")),
                    origin=f"sample {sample.key!r} of {shard.name}",
                )
            )
    title = name or (paths[0].parent.name if "{" not in str(source) else "wds")
    return make_dataset(title, records, source=str(source), issues=issues)


# --- streaming ----------------------------------------------------------------------------------
def rank_shards(paths: Sequence[Path], rank: int, world: int, worker: int = 0, workers: int = 1) -> list[Path]:
    """Shards for worker ``worker`` of process ``rank``: by node first, then by worker."""
    if not 0 <= rank < world or not 0 <= worker < workers:
        raise DatasetError(f"rank {rank}/{world}, worker {worker}/{workers} is out of range")
    return list(islice(islice(paths, rank, None, world), worker, None, workers))


try:
    from torch.utils.data import IterableDataset, get_worker_info
except ImportError:  # pragma: no cover - torch is a dependency
    IterableDataset = object  # type: ignore[assignment,misc]


class WdsStream(IterableDataset):  # type: ignore[misc]
    """Samples ``{"key", "image" (PIL RGB), "captions", "image_id", "split"}`` of this process's
    shards, read through ``webdataset`` (tar streaming, shard splitting by rank and worker).

    Fewer shards than processes × workers leaves some idle; :func:`write_wds` makes enough
    shards for that (``shard_size``). ``len()`` is this process's share from ``sizes.json``."""

    def __init__(self, source: str | Path, rank: int = 0, world: int = 1, on_bad_sample: str | None = None) -> None:
        self.paths = shard_paths(source)
        self.sizes = read_sizes(self.paths)
        self.rank, self.world = rank, world
        self.mine = rank_shards(self.paths, rank, world)
        self.policy = check_policy(on_bad_sample or default_policy())

    def __len__(self) -> int:
        return sum(self.sizes[p.name] for p in self.mine)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        from clipdistill.data.images import decode_rgb

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        urls = [str(p) for p in rank_shards(self.paths, self.rank, self.world, worker, workers)]
        if not urls:
            return
        issues = BadSamples(self.policy)  # skip: dropped samples are listed on stderr when the pass ends
        stream = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
        try:
            for sample in stream:
                key = sample["__key__"]
                shard = Path(sample["__url__"])
                try:
                    image_ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
                    if image_ext is None:
                        raise _BadSample(f"sample {key!r}", "has no image member")
                    texts = {e: (f"{key}.{e}", sample[e]) for e in TEXT_EXTENSIONS if e in sample}
                    meta = _meta_of(key, texts)
                    captions = _captions(key, meta)
                    image = decode_rgb(io.BytesIO(sample[image_ext]), f"{shard}/{key}.{image_ext}")
                except _BadSample as bad:
                    issues.bad(str(shard), bad.where, bad.reason)
                    continue
                except DatasetError as error:  # the image does not decode (message names the member)
                    issues.bad(str(shard), f"sample {key!r}", str(error))
                    continue
                yield {
                    "key": key,
                    "image": image,
                    "captions": [c.text for c in captions],
                    "image_id": str(meta.get("image_id", f"{shard.stem}/{key}")),
                    "split": str(meta.get("split", "train")),
                }
        finally:
            issues.announce(f"webdataset stream {', '.join(Path(u).name for u in urls)}")


# --- writing ------------------------------------------------------------------------------------
def _safe_key(image_id: str, index: int) -> str:
    """A member key without dots or slashes (webdataset splits names at the first dot)."""
    return f"{index:09d}_{_KEY_UNSAFE.sub('_', image_id)[:80]}"


def write_wds(
    dataset: PairedDataset, out: str | Path, *, shard_size: int = 1000, splits: Sequence[str] = SPLITS
) -> dict[str, int]:
    """Write ``dataset``'s images of ``splits`` as shards ``out/00000.tar, ...`` (image bytes
    copied unchanged, captions and ids in ``KEY.json``) plus ``sizes.json``; returns the sizes.
    Each shard is written atomically, ``sizes.json`` last."""
    if shard_size < 1:
        raise DatasetError(f"shard_size must be >= 1, got {shard_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = [r for r in dataset.images if r.split in splits]
    if not records:
        raise DatasetError(f"{dataset.source or dataset.name} has no images in split(s) {', '.join(splits)}")
    sizes: dict[str, int] = {}
    for shard_index, start in enumerate(range(0, len(records), shard_size)):
        name = f"{shard_index:05d}.tar"
        chunk = records[start : start + shard_size]
        with atomic_path(out / name) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for offset, record in enumerate(chunk):
                key = _safe_key(record.image_id, start + offset)
                data = read_member(record.path)
                if data is None:
                    data = Path(record.path).read_bytes()
                extension = Path(str(record.path)).suffix.lower().lstrip(".")
                if extension not in IMAGE_EXTENSIONS:
                    raise DatasetError(f"image {record.path}: extension .{extension} is not one of {IMAGE_EXTENSIONS}")
                meta = {
                    "image_id": record.image_id,
                    "split": record.split,
                    "captions": [{"caption_id": c.caption_id, "text": c.text} for c in record.captions],
                    "concept": record.concept,
                }
                for member_name, payload in (
                    (f"{key}.{extension}", data),
                    (f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8")),
                ):
                    info = tarfile.TarInfo(member_name)
                    info.size = len(payload)
                    info.mode = 0o644
                    tar.addfile(info, io.BytesIO(payload))
        sizes[name] = len(chunk)
    atomic_write_json(out / SIZES_FILE, sizes)
    return sizes
