"""Users' own tables: an open_clip CSV without a split column, or train/val CSV pairs,
run the demo; splits are carved from train by image (or by a grouping column) with a seed, and
recorded (data/splits.py)."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clipdistill.data.dataset import DatasetError
from clipdistill.data.loading import load_dataset
from clipdistill.data.splits import SPLITS_FILE, SplitOptions, make_splits
from test_demo import COLOURS, PLACES, SHAPES, TINY, _scene


def _write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def scene_rows(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, str]]]:
    """128 scene PNGs, three caption rows each (open_clip layout: filepath, title) + a colour column."""
    root = tmp_path_factory.mktemp("scene_csv")
    (root / "pictures").mkdir()
    rows = []
    for colour in COLOURS:
        for shape in SHAPES:
            for place in PLACES:
                name = f"pictures/{colour}_{shape}_{place}.png"
                _scene(shape, COLOURS[colour], PLACES[place]).save(root / name)
                titles = (f"a {colour} {shape} on the {place}", f"{shape} in {colour}", f"a {shape} at the {place}")
                rows += [{"filepath": name, "title": title, "colour": colour} for title in titles]
    return root, rows


def _splits_of(dataset: object) -> dict[str, str]:
    return {record.image_id: record.split for record in dataset.images}  # type: ignore[attr-defined]


def test_a_split_less_csv_is_split_by_image_with_a_seed(scene_rows: tuple[Path, list], tmp_path: Path) -> None:
    root, rows = scene_rows
    table = _write_csv(root / "all.csv", rows)
    assert set(load_dataset(table).split_counts()) == {"train"}  # no val or test split of its own
    dataset, path, record = make_splits(tmp_path / "a", table, None, SplitOptions(seed=3))
    counts = dataset.split_counts()
    assert set(counts) == {"train", "val", "test"} and sum(counts.values()) == 128
    assert 10 <= counts["val"] <= 16 and 10 <= counts["test"] <= 16  # ~10% each
    assert all(len(r.captions) == 3 for r in dataset.images)  # the captions of one image stay together
    assert record is not None and record["seed"] == 3 and record["carved_from_train"] == ["test", "val"]
    assert record["counts"] == {split: counts[split] for split in ("train", "val", "test")}
    assert json.loads((tmp_path / "a" / SPLITS_FILE).read_text()) == record
    reread = load_dataset(path)  # what the students, export and embed stages read
    assert _splits_of(reread) == _splits_of(dataset) and reread.texts() == dataset.texts()
    again, _, _ = make_splits(tmp_path / "b", table, None, SplitOptions(seed=3))
    other, _, _ = make_splits(tmp_path / "c", table, None, SplitOptions(seed=4))
    assert _splits_of(again) == _splits_of(dataset)  # seeded: the same split every time
    assert _splits_of(other) != _splits_of(dataset)


def test_a_grouping_column_keeps_each_group_in_one_split(scene_rows: tuple[Path, list], tmp_path: Path) -> None:
    root, rows = scene_rows
    table = _write_csv(root / "grouped.csv", rows)
    dataset, _, record = make_splits(tmp_path, table, None, SplitOptions(seed=0, group_by="colour"))
    split_of_colour: dict[str, set[str]] = {}
    for image in dataset.images:
        split_of_colour.setdefault(image.concept, set()).add(image.split)
    assert len(split_of_colour) == 8 and all(len(splits) == 1 for splits in split_of_colour.values())
    assert {split for splits in split_of_colour.values() for split in splits} == {"train", "val", "test"}
    assert record is not None and record["unit"] == "group (colour)"
    with pytest.raises(DatasetError, match=r"column 'kind' not found"):
        make_splits(tmp_path / "x", table, None, SplitOptions(group_by="kind"))


def test_train_and_val_files_give_val_whole_and_test_carved_from_train(
    scene_rows: tuple[Path, list], tmp_path: Path
) -> None:
    root, rows = scene_rows
    train = _write_csv(root / "train.csv", [row for row in rows if row["colour"] != "pink"])
    val = _write_csv(root / "val.csv", [row for row in rows if row["colour"] == "pink"])
    dataset, _, record = make_splits(tmp_path, train, None, SplitOptions(val_data=val, seed=1))
    val_ids = {r.image_id for r in dataset.images if r.split == "val"}
    assert val_ids == {row["filepath"] for row in rows if row["colour"] == "pink"}  # the val file, whole
    test = [r for r in dataset.images if r.split == "test"]
    assert test and all("pink" not in r.image_id for r in test)  # test: carved from the train file
    assert record is not None and record["carved_from_train"] == ["test"] and record["files"]["val"] == str(val)
    overlap = _write_csv(root / "overlap.csv", rows[:3])  # an image in both files would leak
    with pytest.raises(DatasetError, match=r"duplicate image id"):
        make_splits(tmp_path / "o", train, None, SplitOptions(val_data=overlap))


def test_too_few_images_to_carve_is_a_clear_error(scene_rows: tuple[Path, list], tmp_path: Path) -> None:
    root, rows = scene_rows
    table = _write_csv(root / "two.csv", [rows[0], rows[3]])
    with pytest.raises(DatasetError, match=r"too few images in the train data \(2\) to carve"):
        make_splits(tmp_path, table, None, SplitOptions())


def test_demo_cli_passes_the_split_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import clipdistill.demo
    from clipdistill.cli.main import app

    seen: dict = {}

    def fake_run_demo(out: Path, **kwargs: object) -> dict:
        seen.update(kwargs)
        raise clipdistill.demo.DemoError("stop here")

    monkeypatch.setattr(clipdistill.demo, "run_demo", fake_run_demo)
    args = ["demo", "--out", str(tmp_path), "--data", "train.csv", "--val-data", "val.csv"]
    result = CliRunner().invoke(app, [*args, "--split-seed", "7", "--group-by", "colour"])
    assert result.exit_code == 2 and "stop here" in result.output
    assert seen["splits"] == SplitOptions(val_data=Path("val.csv"), seed=7, group_by="colour")


# The pipeline is what is under test here, not the quality: one epoch each keeps a run short.
ONE_EPOCH = replace(
    TINY,
    teacher=replace(TINY.teacher, epochs=1),
    optim=replace(TINY.optim, epochs=1, warmup_steps=1),
)


@pytest.mark.e2e
def test_demo_runs_on_a_split_less_csv(scene_rows: tuple[Path, list], tmp_path: Path) -> None:
    from clipdistill.demo import run_demo

    root, rows = scene_rows
    table = _write_csv(root / "demo.csv", rows)
    report = run_demo(tmp_path, data=table, preset=ONE_EPOCH, methods="clip", splits=SplitOptions(seed=0))
    assert report["splits"]["carved_from_train"] == ["test", "val"]  # carved, not refused as missing
    assert report["n_images"] == report["splits"]["counts"]["test"] > 0
    assert (tmp_path / "report.md").is_file() and (tmp_path / "index" / "manifest.json").is_file()


@pytest.mark.e2e
def test_demo_runs_on_a_train_val_csv_pair(scene_rows: tuple[Path, list], tmp_path: Path) -> None:
    from clipdistill.demo import run_demo

    root, rows = scene_rows
    train = _write_csv(root / "demo_train.csv", [row for row in rows if row["colour"] != "teal"])
    val = _write_csv(root / "demo_val.csv", [row for row in rows if row["colour"] == "teal"])
    report = run_demo(tmp_path, data=train, preset=ONE_EPOCH, methods="clip", splits=SplitOptions(val_data=val))
    assert report["splits"]["files"] == {"train": str(train), "val": str(val)}
    assert report["splits"]["counts"]["val"] == 16 and report["n_images"] == report["splits"]["counts"]["test"] > 0
    assert report["best_student"]["selected_by"] == "val rsum"
