"""The one entry point that turns a user's ``--data`` argument into a :class:`PairedDataset`.

Every CLI command and library stage loads data through :func:`load_dataset`, so format
detection, error messages and the missing-file check are the same everywhere, and a missing
image is reported before a teacher is loaded or a step is trained rather than mid-epoch.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clipdistill.data.bad_samples import BadSamples, check_policy, default_policy
from clipdistill.data.csv import read_csv
from clipdistill.data.dataset import DatasetError, PairedDataset
from clipdistill.data.folder import IMAGE_SUFFIXES, find_images, read_folder
from clipdistill.data.karpathy import read_karpathy
from clipdistill.data.wds import is_wds, read_wds

__all__ = ["FORMATS", "detect_format", "load_dataset"]

FORMATS = ("auto", "karpathy", "csv", "folder", "wds")
KARPATHY_FILE = "dataset.json"  # the name the Karpathy splits and our emoji builder use
# The names of Karpathy's own published files, recognised in a folder as well.
KARPATHY_FILES = (KARPATHY_FILE, "dataset_coco.json", "dataset_flickr30k.json", "dataset_flickr8k.json")
_TABLE_SUFFIXES = (".csv", ".tsv")
_READERS: dict[str, Callable[..., PairedDataset]] = {
    "karpathy": read_karpathy,
    "csv": read_csv,
    "folder": read_folder,
    "wds": read_wds,
}


def karpathy_json(folder: Path) -> Path | None:
    """The Karpathy JSON of a folder (one of :data:`KARPATHY_FILES`), ``None`` when there is none;
    two of them are ambiguous and refused, naming both."""
    found = [folder / name for name in KARPATHY_FILES if (folder / name).is_file()]
    if len(found) > 1:
        raise DatasetError(
            f"{folder} holds several Karpathy files ({', '.join(p.name for p in found)}); "
            "pass the one to use as --data FOLDER/FILE.json"
        )
    return found[0] if found else None


def detect_format(data: Path) -> str:
    """Guess the format of an existing path; raise listing what was looked for."""
    if "{" in str(data) and is_wds(data):
        return "wds"
    if data.is_dir():
        if karpathy_json(data) is not None:
            return "karpathy"
        if is_wds(data):
            return "wds"
        if find_images(data):
            return "folder"
    elif data.suffix.lower() == ".json":
        return "karpathy"
    elif data.suffix.lower() in _TABLE_SUFFIXES:
        return "csv"
    raise DatasetError(
        f"cannot tell the dataset format of {data}: looked for a directory containing "
        f"{' or '.join(KARPATHY_FILES)} (Karpathy), a .json file (Karpathy), a .csv/.tsv file (CSV), "
        f"or a directory of images "
        f"({', '.join(IMAGE_SUFFIXES)}) with .txt captions (folder), a directory of .tar shards or a "
        f"brace pattern DIR/{{00000..00099}}.tar (wds); pass fmt= one of "
        f"{', '.join(FORMATS[1:])} to choose"
    )


def _check_kwargs(fmt: str, reader: Callable[..., PairedDataset], kwargs: dict[str, Any]) -> None:
    """Name a reader option that does not exist, instead of a bare TypeError from deep inside."""
    # The first parameter (the path) and image_root come from load_dataset's own arguments.
    accepted = [p for p in list(inspect.signature(reader).parameters)[1:] if p not in ("image_root", "issues")]
    for key in kwargs:
        if key not in accepted:
            raise DatasetError(f"option {key!r} is not accepted by the {fmt} reader (options: {', '.join(accepted)})")


def _read(fmt: str, data: Path, images: Path | None, kwargs: dict[str, Any], issues: BadSamples) -> PairedDataset:
    reader = _READERS[fmt]
    _check_kwargs(fmt, reader, kwargs)
    if fmt == "karpathy":
        json_path = (karpathy_json(data) or data / KARPATHY_FILE) if data.is_dir() else data
        return read_karpathy(json_path, image_root=images, issues=issues, **kwargs)
    if fmt == "wds":
        if images is not None:
            raise DatasetError(f"images={images} does not apply to the wds format (images live in the shards)")
        return read_wds(data, issues=issues, **kwargs)
    if fmt == "csv":
        if data.is_dir():
            raise DatasetError(f"{data}: is a directory; the csv format needs a .csv or .tsv file")
        return read_csv(data, image_root=images, issues=issues, **kwargs)
    if images is not None:
        raise DatasetError(f"images={images} does not apply to the folder format (images live in {data})")
    return read_folder(data, issues=issues, **kwargs)


# (path, size, mtime) -> problem: a demo loads the same data in several stages of one process.
_checked: dict[tuple[str, int, int], str | None] = {}


def _image_problem(path: Path) -> str | None:
    from clipdistill.data.images import image_problem

    try:
        stat = path.stat()
    except OSError:
        return image_problem(path)
    key = (str(path.absolute()), stat.st_size, stat.st_mtime_ns)
    if key not in _checked:
        _checked[key] = image_problem(path)
    return _checked[key]


def _check_images(dataset: PairedDataset, issues: BadSamples) -> PairedDataset:
    """Decode-check every image up front (in threads: Pillow decodes outside the GIL); a bad one
    stops the load (``error``) or leaves the dataset (``skip``). Missing files are listed together."""
    from concurrent.futures import ThreadPoolExecutor

    if issues.policy == "error":
        dataset.check_files()  # every missing file in one message, before any decoding
    paths = [Path(record.path) for record in dataset.images]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        problems = list(pool.map(_image_problem, paths))
    if not any(problems):
        return dataset
    kept = []
    for index, (record, problem) in enumerate(zip(dataset.images, problems, strict=True)):
        if problem is None:
            kept.append(record)
            continue
        where = f"{record.origin or f'image #{index}'} image {record.path}"
        issues.bad(dataset.source or dataset.name, where, problem)
    return PairedDataset(name=dataset.name, images=kept, source=dataset.source, skipped=issues)


def load_dataset(
    data: str | Path,
    images: str | Path | None = None,
    *,
    fmt: str = "auto",
    check_files: bool = True,
    on_bad_sample: str | None = None,
    **reader_kwargs: Any,
) -> PairedDataset:
    """Load a dataset from a Karpathy JSON, a CSV/TSV, or an image+caption folder.

    ``fmt="auto"`` detects the format: a directory containing ``dataset.json`` (or Karpathy's
    own ``dataset_coco.json``, ``dataset_flickr30k.json``, ``dataset_flickr8k.json``) or a
    ``.json`` file → Karpathy; ``.csv``/``.tsv`` → CSV; a directory of images → folder. ``images`` is the
    image root for Karpathy and CSV (default: the file's folder). ``reader_kwargs`` go to the
    reader (e.g. ``img_key``/``caption_key`` for CSV, ``split`` for a folder, ``name``). With
    ``check_files`` every image is checked up front: missing files (:class:`MissingImagesError`),
    empty, undecodable or truncated files and decompression bombs.

    ``on_bad_sample`` (default: :func:`~clipdistill.data.bad_samples.default_policy`, ``error``)
    is what a bad image, caption or row does: ``error`` stops, naming file, place and reason;
    ``skip`` drops it, records it in ``dataset.skipped`` and prints the counts to stderr.
    """
    issues = BadSamples(check_policy(on_bad_sample or default_policy()))
    if fmt not in FORMATS:
        raise DatasetError(f"unknown dataset format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    data = Path(data)
    if not data.exists() and not ("{" in str(data) and is_wds(data)):
        raise DatasetError(f"dataset path {data} does not exist")
    image_root = Path(images) if images is not None else None
    if check_files and image_root is not None and not image_root.is_dir():
        raise DatasetError(f"image folder {image_root} does not exist or is not a directory")
    dataset = _read(detect_format(data) if fmt == "auto" else fmt, data, image_root, reader_kwargs, issues)
    if check_files:
        dataset = _check_images(dataset, issues)
    if not dataset.images:
        first = issues.samples[0].message() if issues.samples else "none"
        raise DatasetError(
            f"{data}: no usable sample left after skipping {len(issues.samples)} bad one(s); first: {first}"
        )
    issues.announce(dataset.name)
    return dataset
