"""CSV/TSV image-caption tables in open_clip's convention (``filepath`` and ``title`` columns).

open_clip reads one (image, caption) pair per row; retrieval needs captions grouped under
their image, so rows that name the same image path become one image with several captions,
in row order. Errors name the file, the 1-based data row (header excluded) and the column.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import NoReturn

import pandas as pd

from clipdistill.data.bad_samples import BadSamples, invalid_byte, is_clean_text, mark_invalid_bytes
from clipdistill.data.dataset import Caption, DatasetError, ImageRecord, PairedDataset, make_dataset
from clipdistill.data.karpathy import VALID_SPLITS, canonical_split

__all__ = ["read_csv"]


def _bad(source: Path, where: str, problem: str) -> NoReturn:
    """The one place per-row problems are raised, so a later skip policy has one hook."""
    raise DatasetError(f"{source}: {where} {problem}")


def _read_table(path: Path, sep: str) -> pd.DataFrame:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    # Non-UTF-8 bytes survive as lone surrogates, so the row holding them is named (and can be
    # skipped); object columns, because pandas' arrow-backed strings cannot hold them.
    text = mark_invalid_bytes(raw.decode("utf-8", errors="surrogateescape"))
    try:
        return pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise DatasetError(f"{path}: file is empty (expected a header row)") from None
    except pd.errors.ParserError as error:
        raise DatasetError(f"{path}: cannot be parsed with separator {sep!r}: {error}") from None


def _require_columns(path: Path, table: pd.DataFrame, keys: list[str]) -> None:
    columns = [str(column) for column in table.columns]
    for key in keys:
        if key not in columns:
            raise DatasetError(f"column {key!r} not found in {path} (columns: {', '.join(columns)})")


def _row_split(path: Path, row: int, split_key: str | None, value: str, default: str) -> str:
    if split_key is None:
        return default
    split = canonical_split(value)
    if split is None:
        _bad(path, f"row {row}", f"column {split_key!r} has value {value!r} (valid: {', '.join(VALID_SPLITS)})")
    return split


class _Group:
    """Captions collected for one image path while scanning rows (first row fixes the split)."""

    def __init__(self, first_row: int, split: str, origin: str, concept: str = "") -> None:
        self.first_row = first_row
        self.split = split
        self.origin = origin
        self.concept = concept
        self.captions: list[Caption] = []


def _check_row(path: Path, row: int, img_key: str, image: str, caption_key: str, text: str) -> None:
    if not image.strip():
        _bad(path, f"row {row}", f"column {img_key!r} is empty")
    if not is_clean_text(image):
        _bad(path, f"row {row}", f"column {img_key!r} is not valid UTF-8 (byte {invalid_byte(image)})")
    if not text.strip():
        _bad(path, f"row {row}", f"column {caption_key!r} is empty (image {image!r})")
    if not is_clean_text(text):
        _bad(path, f"row {row}", f"column {caption_key!r} is not valid UTF-8 (byte {invalid_byte(text)})")


def _group_rows(
    path: Path,
    table: pd.DataFrame,
    img_key: str,
    caption_key: str,
    split_key: str | None,
    split: str,
    issues: BadSamples,
    group_key: str | None = None,
) -> dict[str, _Group]:
    groups: dict[str, _Group] = {}  # insertion order = first appearance of each image
    splits = table[split_key] if split_key is not None else [""] * len(table)
    concepts = table[group_key] if group_key is not None else [""] * len(table)
    rows = zip(table[img_key], table[caption_key], splits, concepts, strict=True)
    for offset, (image, text, split_value, concept) in enumerate(rows):
        row = offset + 1
        try:
            _check_row(path, row, img_key, image, caption_key, text)
            row_split = _row_split(path, row, split_key, split_value, split)
            group = groups.get(image)
            if group is not None and group.split != row_split:
                _bad(
                    path,
                    f"row {row}",
                    f"column {split_key!r} has value {split_value!r} but row {group.first_row} put "
                    f"image {image!r} in split {group.split!r}",
                )
        except DatasetError as error:
            if issues.policy == "error":
                raise
            issues.bad(str(path), f"row {row}", str(error).split(f"row {row} ", 1)[-1], kind="caption")
            continue
        group = groups.setdefault(image, _Group(row, row_split, origin=f"row {row}", concept=concept.strip()))
        group.captions.append(Caption(caption_id=f"{image}#row{row}", text=text.strip()))
    return groups


def read_csv(
    path: Path,
    image_root: Path | None = None,
    *,
    img_key: str = "filepath",
    caption_key: str = "title",
    sep: str | None = None,
    split: str = "train",
    split_key: str | None = None,
    group_key: str | None = None,
    name: str | None = None,
    issues: BadSamples | None = None,
) -> PairedDataset:
    """Read an open_clip-style CSV/TSV (one row per caption) into a :class:`PairedDataset`.

    ``sep`` defaults to a tab for ``.tsv`` and a comma otherwise. Image paths are relative to
    ``image_root`` (default: the table's folder). Every image gets ``split`` unless
    ``split_key`` names a column holding train/val/test/restval per row. Ids are the path as
    written (image) and ``<path>#row<N>`` (caption, N = 1-based data row), so they stay stable
    as long as the file does. ``group_key`` names a column whose value (first row of an image)
    becomes the image's ``concept``, what a seeded split groups by (:mod:`clipdistill.data.splits`).
    ``issues`` sets what a bad row does (default: stop, naming it).
    """
    issues = issues if issues is not None else BadSamples("error")
    path = Path(path)
    default_split = canonical_split(split)
    if default_split is None:
        raise DatasetError(f"split {split!r} for {path} is not valid (valid: {', '.join(VALID_SPLITS)})")
    if sep is None:
        sep = "\t" if path.suffix.lower() == ".tsv" else ","
    table = _read_table(path, sep)
    optional = [key for key in (split_key, group_key) if key]
    _require_columns(path, table, [img_key, caption_key, *optional])
    groups = _group_rows(path, table, img_key, caption_key, split_key, default_split, issues, group_key)
    root = Path(image_root) if image_root is not None else path.parent
    records = [
        ImageRecord(
            image_id=image,
            path=root / image,
            split=group.split,
            captions=tuple(group.captions),
            concept=group.concept,
            origin=group.origin,
        )
        for image, group in groups.items()
    ]
    if not records:
        if issues.samples:
            raise DatasetError(f"{path}: every row was skipped as bad; first: {issues.samples[0].message()}")
        raise DatasetError(f"{path}: has a header but no data rows")
    return make_dataset(name or path.stem, records, source=str(path), issues=issues)
