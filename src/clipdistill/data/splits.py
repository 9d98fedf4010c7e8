"""Train/val/test splits for users' own tables, which usually come without them.

open_clip users hold a CSV with ``filepath`` and ``title`` and no split column, or a train CSV
and a val CSV (open_clip's ``--train-data`` / ``--val-data``). The demo needs all three splits
(train to distil, val to pick the best student, test to report), so:

- ``--val-data FILE`` / ``--test-data FILE`` give the val / test split whole (every image of that
  file, whatever its own split column says); ``--data`` is then the train file.
- A split still missing is carved from the train images, seeded (``--split-seed``): by image,
  so the captions of one image stay together, or by a grouping column (``--group-by COLUMN``,
  the ``concept`` field for Karpathy/webdataset) so near-duplicates of one concept cannot sit on
  both sides. The carve reuses the emoji set's balanced assignment (~80/10/10 by image count,
  whole groups), keeping from it only the splits that are missing.

The result is written as a Karpathy JSON (image paths absolute) with ``splits.json`` beside it,
so every later stage (students, export, embeddings) reads exactly these splits from one path,
and the report records how they were made.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from clipdistill.data.dataset import SPLITS, DatasetError, PairedDataset, make_dataset

SPLITS_FILE = "splits.json"
_TABLE_SUFFIXES = (".csv", ".tsv")


@dataclass(frozen=True)
class SplitOptions:
    """How to get train/val/test from the user's files (see the module docstring)."""

    val_data: str | Path | None = None
    test_data: str | Path | None = None
    seed: int = 0
    group_by: str | None = None

    @classmethod
    def of(cls, config: Any) -> SplitOptions:
        """The options a config section's split keys give (``val_path``, ``test_path``,
        ``split_seed``, ``group_by``: the training config's ``data`` and the run config's)."""
        return cls(
            val_data=config.val_path, test_data=config.test_path, seed=config.split_seed, group_by=config.group_by
        )


def _is_table(path: str | Path) -> bool:
    return Path(path).suffix.lower() in _TABLE_SUFFIXES


def _load(
    path: str | Path, images: str | Path | None, group_by: str | None, on_bad_sample: str | None = None
) -> PairedDataset:
    from clipdistill.data.loading import load_dataset

    if group_by is not None and _is_table(path):
        return load_dataset(path, images, group_key=group_by, on_bad_sample=on_bad_sample)
    return load_dataset(path, images, on_bad_sample=on_bad_sample)


def _whole(dataset: PairedDataset, split: str) -> list[Any]:
    return [replace(record, split=split) for record in dataset.images]


def _group_key(record: Any, group_by: str | None, source: str) -> str:
    if group_by is None:
        return f"image:{record.image_id}"
    if not record.concept:
        raise DatasetError(
            f"{source}: image {record.image_id!r} has no value for the grouping {group_by!r} "
            "(a CSV column given with --group-by, or the 'concept' field of Karpathy/webdataset data)"
        )
    return f"group:{record.concept}"


def carve(records: list[Any], missing: set[str], seed: int, group_by: str | None, source: str) -> list[Any]:
    """Move whole groups of train ``records`` into the ``missing`` splits (seeded, ~10% each)."""
    from clipdistill.data.emoji import assign_splits

    train = [record for record in records if record.split == "train"]
    sizes: dict[str, int] = {}
    for record in train:
        key = _group_key(record, group_by, source)
        sizes[key] = sizes.get(key, 0) + 1
    assignment = assign_splits(sizes, seed)
    moved = {key: split for key, split in assignment.items() if split in missing}
    out = [
        replace(record, split=moved.get(_group_key(record, group_by, source), "train"))
        if record.split == "train"
        else record
        for record in records
    ]
    counts = {split: sum(record.split == split for record in out) for split in SPLITS}
    empty = [split for split in SPLITS if counts[split] == 0]
    if empty:
        unit = f"groups of {group_by!r}" if group_by else "images"
        raise DatasetError(
            f"{source}: too few {unit} in the train data ({len(sizes)}) to carve a "
            f"{' and a '.join(sorted(missing))} split from it (empty: {', '.join(empty)})"
        )
    return out


def split_dataset(
    data: str | Path, images: str | Path | None, options: SplitOptions, *, on_bad_sample: str | None = None
) -> tuple[PairedDataset, dict[str, Any] | None]:
    """The dataset with train, val and test, in memory, and the record of how the splits were
    made (``None`` when ``data`` already had all three and nothing was given or carved).
    ``eval`` uses this directly; stages that hand the dataset on write it (:func:`make_splits`)."""
    train = _load(data, images, options.group_by, on_bad_sample)
    given = {"val": options.val_data, "test": options.test_data}
    if not any(given.values()) and set(train.split_counts()) >= set(SPLITS):
        return train, None
    records = list(train.images) if not any(given.values()) else _whole(train, "train")
    sources = {"train": str(data)}
    for split, path in given.items():
        if path is not None:
            records += _whole(_load(path, images, options.group_by, on_bad_sample), split)
            sources[split] = str(path)
    missing = set(SPLITS) - {record.split for record in records}
    if missing:
        records = carve(records, missing, options.seed, options.group_by, str(data))
    dataset = make_dataset(train.name, records, source=str(data))  # duplicate ids across the files are refused here
    record = {
        "files": sources,
        "carved_from_train": sorted(missing),
        "unit": f"group ({options.group_by})" if options.group_by else "image (its captions together)",
        "seed": options.seed,
        "counts": {split: dataset.split_counts().get(split, 0) for split in SPLITS},
    }
    return dataset, record


def make_splits(
    out_dir: Path, data: str | Path, images: str | Path | None, options: SplitOptions
) -> tuple[PairedDataset, str, dict[str, Any] | None]:
    """:func:`split_dataset`, written as a Karpathy JSON + ``splits.json`` in ``out_dir`` so every
    later stage reads exactly these splits from one path. Returns the dataset, the path later
    stages read it from (``data`` itself when it already had all three splits) and the record."""
    dataset, record = split_dataset(data, images, options)
    if record is None:
        return dataset, str(data), None
    _write(out_dir, dataset, record)
    return dataset, str(out_dir), record


def _write(out_dir: Path, dataset: PairedDataset, record: dict[str, Any]) -> None:
    from clipdistill.data.karpathy import write_karpathy
    from clipdistill.io import atomic_write_json

    write_karpathy(dataset, out_dir / "dataset.json")  # paths outside out_dir are stored absolute
    atomic_write_json(out_dir / SPLITS_FILE, record)
