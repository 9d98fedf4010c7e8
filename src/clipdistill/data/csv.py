"""CSV/TSV image-caption tables in open_clip's convention (``filepath`` and ``title`` columns).

open_clip reads one (image, caption) pair per row; retrieval needs captions grouped under
their image, so rows that name the same image path become one image with several captions,
in row order. Errors name the file, the 1-based data row (header excluded) and the column.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import pandas as pd

from clipdistill.data.dataset import Caption, DatasetError, ImageRecord, PairedDataset, make_dataset
from clipdistill.data.karpathy import VALID_SPLITS, canonical_split

__all__ = ["read_csv"]


def _bad(source: Path, where: str, problem: str) -> NoReturn:
    """The one place per-row problems are raised, so a later skip policy has one hook."""
    raise DatasetError(f"{source}: {where} {problem}")


def _read_table(path: Path, sep: str) -> pd.DataFrame:
    try:
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path}: not valid UTF-8 ({error.reason} at byte offset {error.start})") from None
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
        _bad(
            path, f"row {row}", f"column {split_key!r} has value {value!r} (valid: {', '.join(VALID_SPLITS)})"
        )
    return split


class _Group:
    """Captions collected for one image path while scanning rows (first row fixes the split)."""

    def __init__(self, first_row: int, split: str) -> None:
        self.first_row = first_row
        self.split = split
        self.captions: list[Caption] = []


def _group_rows(
    path: Path, table: pd.DataFrame, img_key: str, caption_key: str, split_key: str | None, split: str
) -> dict[str, _Group]:
    groups: dict[str, _Group] = {}  # insertion order = first appearance of each image
    splits = table[split_key] if split_key is not None else [""] * len(table)
    for offset, (image, text, split_value) in enumerate(
        zip(table[img_key], table[caption_key], splits, strict=True)
    ):
        row = offset + 1
        if not image.strip():
            _bad(path, f"row {row}", f"column {img_key!r} is empty")
        if not text.strip():
            _bad(path, f"row {row}", f"column {caption_key!r} is empty (image {image!r})")
        row_split = _row_split(path, row, split_key, split_value, split)
        group = groups.setdefault(image, _Group(row, row_split))
        if group.split != row_split:
            _bad(
                path,
                f"row {row}",
                f"column {split_key!r} has value {split_value!r} but row {group.first_row} put "
                f"image {image!r} in split {group.split!r}",
            )
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
    name: str | None = None,
) -> PairedDataset:
    """Read an open_clip-style CSV/TSV (one row per caption) into a :class:`PairedDataset`.

    ``sep`` defaults to a tab for ``.tsv`` and a comma otherwise. Image paths are relative to
    ``image_root`` (default: the table's folder). Every image gets ``split`` unless
    ``split_key`` names a column holding train/val/test/restval per row. Ids are the path as
    written (image) and ``<path>#row<N>`` (caption, N = 1-based data row), so they stay stable
    as long as the file does.
    """
    path = Path(path)
    default_split = canonical_split(split)
    if default_split is None:
        raise DatasetError(f"split {split!r} for {path} is not valid (valid: {', '.join(VALID_SPLITS)})")
    if sep is None:
        sep = "\t" if path.suffix.lower() == ".tsv" else ","
    table = _read_table(path, sep)
    _require_columns(path, table, [img_key, caption_key] + ([split_key] if split_key else []))
    groups = _group_rows(path, table, img_key, caption_key, split_key, default_split)
    root = Path(image_root) if image_root is not None else path.parent
    records = [
        ImageRecord(image_id=image, path=root / image, split=group.split, captions=tuple(group.captions))
        for image, group in groups.items()
    ]
    if not records:
        raise DatasetError(f"{path}: has a header but no data rows")
    return make_dataset(name or path.stem, records, source=str(path))
