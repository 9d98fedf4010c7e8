"""Dataset readers (Karpathy JSON, CSV/TSV, folder) and the ``load_dataset`` entry point, which
reads a folder holding Karpathy's own ``dataset_coco.json`` (or Flickr) file as Karpathy.

Every error case asserts that the message names what a user needs to fix the file: the file,
the index or row, the field and the offending value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from clipdistill.data import (
    Caption,
    DatasetError,
    ImageRecord,
    MissingImagesError,
    PairedDataset,
    load_dataset,
    make_dataset,
)
from clipdistill.data.csv import read_csv
from clipdistill.data.folder import read_folder
from clipdistill.data.karpathy import read_karpathy, write_karpathy
from clipdistill.data.loading import detect_format


def _png(path: Path, colour: tuple[int, int, int] = (255, 0, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), colour).save(path)
    return path


def _write_json(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def _flickr_image(filename: str, split: str, imgid: int, captions: list[str]) -> dict[str, Any]:
    return {
        "filename": filename,
        "imgid": imgid,
        "split": split,
        "sentences": [{"raw": c, "sentid": imgid * 10 + k, "tokens": c.split()} for k, c in enumerate(captions)],
    }


@pytest.fixture
def flickr(tmp_path: Path) -> Path:
    """A Flickr-style file: images beside the JSON, imgid + sentid ids, a restval image."""
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        _png(tmp_path / name)
    return _write_json(
        tmp_path / "dataset.json",
        {
            "dataset": "flickr8k",
            "images": [
                _flickr_image("a.jpg", "train", 0, ["a red square.", "red"]),
                _flickr_image("b.jpg", "restval", 1, ["another one"]),
                _flickr_image("c.jpg", "test", 2, ["  padded caption  "]),
            ],
        },
    )


# --- Karpathy ---------------------------------------------------------------------------------


def test_karpathy_flickr_style(flickr: Path) -> None:
    dataset = read_karpathy(flickr)
    assert dataset.name == "flickr8k"
    assert dataset.source == str(flickr)
    assert [r.image_id for r in dataset.images] == ["0", "1", "2"]
    assert dataset.image_paths() == [flickr.parent / n for n in ("a.jpg", "b.jpg", "c.jpg")]
    assert dataset.caption_ids() == ["0", "1", "10", "20"]
    assert dataset.texts() == ["a red square.", "red", "another one", "padded caption"]
    assert dataset.text_to_image() == [0, 0, 1, 2]
    dataset.check_files()


def test_karpathy_restval_is_train(flickr: Path) -> None:
    dataset = read_karpathy(flickr)
    assert [r.split for r in dataset.images] == ["train", "train", "test"]
    assert dataset.split_counts() == {"train": 2, "test": 1}


def test_karpathy_coco_style_filepath_and_cocoid(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    _png(root / "val2014" / "COCO_val2014_000000000042.jpg")
    path = _write_json(
        tmp_path / "dataset_coco.json",
        {
            "images": [
                {
                    "filepath": "val2014",
                    "filename": "COCO_val2014_000000000042.jpg",
                    "imgid": 0,
                    "cocoid": 42,
                    "split": "val",
                    "sentences": [{"raw": "a tiny image", "sentid": 7}, {"raw": "red"}],
                }
            ]
        },
    )
    dataset = read_karpathy(path, image_root=root)
    record = dataset.images[0]
    assert record.image_id == "42"  # cocoid wins over imgid
    assert record.path == root / "val2014" / "COCO_val2014_000000000042.jpg"
    assert [c.caption_id for c in record.captions] == ["7", "42#1"]  # no sentid → image_id#k
    assert dataset.name == "dataset_coco"  # no top-level "dataset" → file stem
    dataset.check_files()


def test_karpathy_explicit_image_id_and_concept_and_path_fallback(tmp_path: Path) -> None:
    path = _write_json(
        tmp_path / "d.json",
        {
            "images": [
                {
                    "filename": "x.png",
                    "image_id": "emoji_1f600",
                    "imgid": 3,
                    "concept": "grinning face",
                    "split": "train",
                    "sentences": [{"raw": "grinning face"}],
                },
                {"filename": "y.png", "filepath": "sub", "split": "val", "sentences": [{"raw": "y"}]},
            ]
        },
    )
    dataset = read_karpathy(path, name="custom")
    assert dataset.name == "custom"
    assert dataset.images[0].image_id == "emoji_1f600"
    assert dataset.images[0].concept == "grinning face"
    assert dataset.images[1].image_id == "sub/y.png"
    assert dataset.images[1].concept == ""
    assert dataset.caption_ids() == ["emoji_1f600#0", "sub/y.png#0"]


def test_karpathy_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "images"
    records = [
        ImageRecord("img-a", _png(root / "a.png"), "train", (Caption("5", "first"), Caption("img-a#1", "second"))),
        ImageRecord("img-b", _png(root / "nested" / "b.png"), "val", (Caption("b:0", "third"),), concept="b"),
        ImageRecord("img-c", _png(tmp_path / "elsewhere" / "c.png"), "test", (Caption("c#x", "fourth"),)),
    ]
    original = make_dataset("mini", records, source=str(tmp_path / "out" / "dataset.json"))
    out = tmp_path / "out" / "dataset.json"
    write_karpathy(original, out, image_root=root)
    assert not list(out.parent.glob("*.tmp"))  # atomic write leaves no temp file behind
    written = json.loads(out.read_text(encoding="utf-8"))["images"]
    assert written[1]["filepath"] == "nested" and written[1]["filename"] == "b.png"
    assert "filepath" not in written[0]
    back = read_karpathy(out, image_root=root)
    assert back == original
    assert back.images[2].path == tmp_path / "elsewhere" / "c.png"  # outside the root: absolute


def test_karpathy_round_trip_default_root(tmp_path: Path) -> None:
    records = [ImageRecord("0", _png(tmp_path / "imgs" / "a.png"), "train", (Caption("0", "a"),))]
    original = make_dataset("x", records, source=str(tmp_path / "dataset.json"))
    write_karpathy(original, tmp_path / "dataset.json")
    assert read_karpathy(tmp_path / "dataset.json") == original


def _one_image(**overrides: Any) -> dict[str, Any]:
    image: dict[str, Any] = {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "ok"}]}
    image.update(overrides)
    return {k: v for k, v in image.items() if v is not None}


@pytest.mark.parametrize(
    ("image", "pattern"),
    [
        (
            _one_image(split="tst"),
            r"dataset\.json: images\[1\] field 'split' has value 'tst' \(valid: train, val, test, restval\)",
        ),
        (_one_image(split=None), r"dataset\.json: images\[1\] has no field 'split'"),
        (_one_image(sentences=None), r"dataset\.json: images\[1\] has no field 'sentences'"),
        (_one_image(sentences=[]), r"dataset\.json: images\[1\] field 'sentences' is empty"),
        (_one_image(sentences="a dog"), r"images\[1\] field 'sentences' is a str, expected a list"),
        (
            _one_image(sentences=[{"raw": "ok"}, {"raw": "   "}]),
            r"dataset\.json: images\[1\]\.sentences\[1\] field 'raw' is empty",
        ),
        (_one_image(sentences=[{"raw": "ok"}, {}]), r"images\[1\]\.sentences\[1\] has no field 'raw'"),
        (
            _one_image(sentences=[{"raw": 5}]),
            r"images\[1\]\.sentences\[0\] field 'raw' has value 5 \(expected a string\)",
        ),
        (
            _one_image(sentences=[{"raw": "x", "sentid": 1.5}]),
            r"images\[1\]\.sentences\[0\] field 'sentid' has value 1\.5",
        ),
        (_one_image(filename=None), r"dataset\.json: images\[1\] has no field 'filename'"),
        (_one_image(filename=""), r"images\[1\] field 'filename' is empty"),
        (_one_image(filepath=3), r"images\[1\] field 'filepath' has value 3 \(expected a string\)"),
        (_one_image(concept=["x"]), r"images\[1\] field 'concept' has value \['x'\]"),
        ("not an object", r"dataset\.json: images\[1\] is a str, expected an object"),
    ],
)
def test_karpathy_bad_image_names_file_index_field_value(tmp_path: Path, image: Any, pattern: str) -> None:
    path = _write_json(tmp_path / "dataset.json", {"images": [_one_image(), image]})
    with pytest.raises(DatasetError, match=pattern):
        read_karpathy(path)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ("[1, 2]", r"dataset\.json: top level is a list, expected an object with an 'images' list"),
        ('{"annotations": []}', r"dataset\.json: top level has no field 'images' \(fields: annotations\)"),
        ('{"images": {}}', r"dataset\.json: top level field 'images' is a dict, expected a list"),
        (
            '{"images": [\n  {"filename": "a.jpg",,}\n]}',
            r"dataset\.json: invalid JSON at line 2 column 24: Expecting property name",
        ),
    ],
)
def test_karpathy_bad_file(tmp_path: Path, content: str, pattern: str) -> None:
    path = tmp_path / "dataset.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DatasetError, match=pattern):
        read_karpathy(path)


def test_karpathy_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "dataset.json"
    path.write_bytes('{"images": [{"filename": "é"}]}'.encode("latin-1"))
    with pytest.raises(
        DatasetError, match=r"dataset\.json: images\[0\] field 'filename' is not valid UTF-8 \(byte 0xe9\)"
    ):
        read_karpathy(path)


def test_karpathy_duplicate_image_id(tmp_path: Path) -> None:
    image = _one_image(imgid=4)
    path = _write_json(tmp_path / "dataset.json", {"images": [image, {**image, "filename": "b.jpg"}]})
    with pytest.raises(DatasetError, match=r"dataset\.json: images\[1\] duplicate image id '4' \(images #0 and #1\)"):
        read_karpathy(path)


# --- CSV / TSV --------------------------------------------------------------------------------


def test_csv_groups_repeated_paths_in_row_order(tmp_path: Path) -> None:
    _png(tmp_path / "imgs" / "a.png")
    _png(tmp_path / "imgs" / "b.png")
    path = tmp_path / "train.csv"
    path.write_text(
        'filepath,title\nimgs/a.png,first a\nimgs/b.png,only b\nimgs/a.png,"second a, with comma"\n',
        encoding="utf-8",
    )
    dataset = read_csv(path)
    assert dataset.name == "train"
    assert [r.image_id for r in dataset.images] == ["imgs/a.png", "imgs/b.png"]
    assert dataset.image_paths() == [tmp_path / "imgs" / "a.png", tmp_path / "imgs" / "b.png"]
    assert dataset.texts() == ["first a", "second a, with comma", "only b"]
    assert dataset.caption_ids() == ["imgs/a.png#row1", "imgs/a.png#row3", "imgs/b.png#row2"]
    assert dataset.text_to_image() == [0, 0, 1]
    assert {r.split for r in dataset.images} == {"train"}
    dataset.check_files()


def test_tsv_separator_custom_keys_split_column_and_root(tmp_path: Path) -> None:
    root = tmp_path / "pics"
    path = tmp_path / "meta.tsv"
    path.write_text("img\tcap\tpart\nx.png\ta, b, c\ttest\ny.png\tplain\trestval\n", encoding="utf-8")
    dataset = read_csv(path, image_root=root, img_key="img", caption_key="cap", split_key="part", name="m")
    assert dataset.name == "m"
    assert dataset.texts() == ["a, b, c", "plain"]  # commas stay inside a TSV field
    assert [r.split for r in dataset.images] == ["test", "train"]
    assert dataset.image_paths() == [root / "x.png", root / "y.png"]


def test_csv_split_argument(tmp_path: Path) -> None:
    path = tmp_path / "v.csv"
    path.write_text("filepath,title\na.png,x\n", encoding="utf-8")
    assert read_csv(path, split="val").images[0].split == "val"
    with pytest.raises(DatasetError, match=r"split 'dev' for .*v\.csv is not valid"):
        read_csv(path, split="dev")


def test_csv_missing_column_message(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("a,b\n1,2\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"column 'filepath' not found in \S*train\.csv \(columns: a, b\)$"):
        read_csv(path)
    with pytest.raises(DatasetError, match=r"column 'title' not found in \S*train\.csv \(columns: a, b\)$"):
        read_csv(path, img_key="a")


@pytest.mark.parametrize(
    ("body", "kwargs", "pattern"),
    [
        ("a.png,ok\nb.png,  \n", {}, r"train\.csv: row 2 column 'title' is empty \(image 'b\.png'\)"),
        ("a.png,ok\n,caption\n", {}, r"train\.csv: row 2 column 'filepath' is empty"),
        (
            "a.png,ok,train\nb.png,ok,tst\n",
            {"split_key": "s"},
            r"train\.csv: row 2 column 's' has value 'tst' \(valid: train, val, test, restval\)",
        ),
        (
            "a.png,ok,train\na.png,ok,test\n",
            {"split_key": "s"},
            r"row 2 column 's' has value 'test' but row 1 put image 'a\.png' in split 'train'",
        ),
    ],
)
def test_csv_bad_rows(tmp_path: Path, body: str, kwargs: dict[str, Any], pattern: str) -> None:
    path = tmp_path / "train.csv"
    header = "filepath,title,s\n" if "split_key" in kwargs else "filepath,title\n"
    path.write_text(header + body, encoding="utf-8")
    with pytest.raises(DatasetError, match=pattern):
        read_csv(path, **kwargs)


def test_csv_bad_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"empty\.csv: file is empty"):
        read_csv(empty)
    header_only = tmp_path / "header.csv"
    header_only.write_text("filepath,title\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"header\.csv: has a header but no data rows"):
        read_csv(header_only)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("filepath,title\na.png,café\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"latin\.csv: row 1 column 'title' is not valid UTF-8 \(byte 0xe9\)"):
        read_csv(latin)


# --- folder -----------------------------------------------------------------------------------


def _pair(root: Path, stem: str, text: str, suffix: str = ".png") -> None:
    _png(root / f"{stem}{suffix}")
    (root / f"{stem}.txt").write_text(text, encoding="utf-8")


def test_folder_reader_recursive_sorted(tmp_path: Path) -> None:
    _pair(tmp_path, "b", "bee\n\n  second bee  \n")
    _pair(tmp_path, "a", "ay", suffix=".jpg")
    _pair(tmp_path / "sub", "c", "sea", suffix=".webp")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "notes.txt").write_text("ignored", encoding="utf-8")
    dataset = read_folder(tmp_path, split="val", name="mine")
    assert dataset.name == "mine"
    assert [r.image_id for r in dataset.images] == ["a", "b", "sub/c"]
    assert dataset.image_paths() == [tmp_path / "a.jpg", tmp_path / "b.png", tmp_path / "sub" / "c.webp"]
    assert dataset.texts() == ["ay", "bee", "second bee", "sea"]
    assert dataset.caption_ids() == ["a#0", "b#0", "b#1", "sub/c#0"]
    assert {r.split for r in dataset.images} == {"val"}


def test_folder_image_without_txt(tmp_path: Path) -> None:
    _pair(tmp_path, "a", "ok")
    _png(tmp_path / "sub" / "lonely.jpeg")
    with pytest.raises(DatasetError, match=r"sub/lonely\.jpeg has no caption file \(expected sub/lonely\.txt\)"):
        read_folder(tmp_path)


def test_folder_txt_without_image(tmp_path: Path) -> None:
    _pair(tmp_path, "a", "ok")
    (tmp_path / "orphan.txt").write_text("words", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"orphan\.txt has no image \(looked for orphan\.\{jpg/jpeg/png/webp\}\)"):
        read_folder(tmp_path)


def test_folder_empty_txt(tmp_path: Path) -> None:
    _pair(tmp_path, "a", " \n\n")
    with pytest.raises(DatasetError, match=r"a\.txt is empty \(expected one caption per line\)"):
        read_folder(tmp_path)


def test_folder_two_images_same_stem(tmp_path: Path) -> None:
    _pair(tmp_path, "a", "ok", suffix=".jpg")
    _png(tmp_path / "a.png")
    with pytest.raises(DatasetError, match=r"a\.jpg and a\.png share the stem 'a'"):
        read_folder(tmp_path)


def test_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("x", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"folder holds no images \(looked for \*\.jpg, \*\.jpeg"):
        read_folder(tmp_path)


# --- load_dataset -----------------------------------------------------------------------------


def test_load_dataset_directory_with_dataset_json(flickr: Path) -> None:
    dataset = load_dataset(flickr.parent)
    assert dataset.name == "flickr8k"
    assert len(dataset) == 3


def test_load_dataset_json_file_with_images_root(tmp_path: Path) -> None:
    _png(tmp_path / "imgs" / "a.jpg")
    path = _write_json(tmp_path / "splits.json", {"images": [_one_image()]})
    dataset = load_dataset(path, images=tmp_path / "imgs")
    assert dataset.image_paths() == [tmp_path / "imgs" / "a.jpg"]


def test_load_dataset_csv_and_tsv(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    (tmp_path / "d.csv").write_text("filepath,title\na.png,x\n", encoding="utf-8")
    (tmp_path / "d.tsv").write_text("path\tcaption\na.png\ty\n", encoding="utf-8")
    assert load_dataset(tmp_path / "d.csv").texts() == ["x"]
    tsv = load_dataset(str(tmp_path / "d.tsv"), img_key="path", caption_key="caption")
    assert tsv.texts() == ["y"]


def test_load_dataset_folder(tmp_path: Path) -> None:
    _pair(tmp_path / "sub", "a", "x")
    dataset = load_dataset(tmp_path, split="test")
    assert dataset.image_paths() == [tmp_path / "sub" / "a.png"]
    assert dataset.images[0].split == "test"


def test_load_dataset_explicit_format(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    (tmp_path / "table.txt").write_text("filepath\ttitle\na.png\tx\n", encoding="utf-8")
    dataset = load_dataset(tmp_path / "table.txt", fmt="csv", sep="\t")
    assert dataset.texts() == ["x"]


def test_load_dataset_unrecognised(tmp_path: Path) -> None:
    (tmp_path / "readme.md").write_text("x", encoding="utf-8")
    looked_for = (
        r"cannot tell the dataset format of .*: looked for a directory containing dataset\.json "
        r".*a \.json file .*a \.csv/\.tsv file .*a directory of images"
    )
    with pytest.raises(DatasetError, match=looked_for):
        load_dataset(tmp_path)
    with pytest.raises(DatasetError, match=r"cannot tell the dataset format of .*readme\.md"):
        load_dataset(tmp_path / "readme.md")


def test_load_dataset_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"dataset path .*nowhere does not exist"):
        load_dataset(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match=r"unknown dataset format 'parquet'; valid formats: auto, karpathy, csv"):
        load_dataset(tmp_path, fmt="parquet")
    (tmp_path / "d.csv").write_text("filepath,title\na.png,x\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"option 'caption' is not accepted by the csv reader \(options: img_key"):
        load_dataset(tmp_path / "d.csv", caption="x")


def test_load_dataset_missing_images(tmp_path: Path) -> None:
    images = [_one_image(filename=f"img{i}.jpg", imgid=i) for i in range(7)]
    _png(tmp_path / "img3.jpg")
    path = _write_json(tmp_path / "dataset.json", {"images": images})
    with pytest.raises(MissingImagesError, match=r"6 image file\(s\) listed in .*dataset\.json are missing: ") as info:
        load_dataset(tmp_path)
    message = str(info.value)
    shown = [f"img{i}.jpg" for i in (0, 1, 2, 4, 5)]
    assert all(name in message for name in shown)
    assert "img6.jpg" not in message and "(and 1 more)" in message
    assert info.value.missing[-1] == tmp_path / "img6.jpg"
    assert isinstance(load_dataset(path, check_files=False), PairedDataset)  # opt-out still reads


# --- Karpathy's own files in a folder ------------------------------------------------------------


def _karpathy(folder: Path, file_name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for index, split in enumerate(["train", "val", "test"]):
        Image.new("RGB", (8, 8), (index * 80, 0, 0)).save(folder / f"{index}.jpg")
        sentences = [{"raw": f"c {index}"}]
        images.append({"filename": f"{index}.jpg", "imgid": index, "split": split, "sentences": sentences})
    (folder / file_name).write_text(json.dumps({"dataset": file_name, "images": images}), encoding="utf-8")


@pytest.mark.parametrize("file_name", ["dataset_coco.json", "dataset_flickr30k.json", "dataset_flickr8k.json"])
def test_a_folder_with_karpathys_own_file_is_read_as_karpathy(tmp_path: Path, file_name: str) -> None:
    _karpathy(tmp_path / "data", file_name)
    assert detect_format(tmp_path / "data") == "karpathy"  # not an image folder
    dataset = load_dataset(tmp_path / "data")
    assert dataset.split_counts() == {"train": 1, "val": 1, "test": 1}
    assert dataset.source == str(tmp_path / "data" / file_name)


def test_two_karpathy_files_in_one_folder_are_refused_naming_both(tmp_path: Path) -> None:
    _karpathy(tmp_path, "dataset_coco.json")
    _karpathy(tmp_path, "dataset_flickr30k.json")
    with pytest.raises(DatasetError, match=r"dataset_coco\.json, dataset_flickr30k\.json.*FOLDER/FILE\.json"):
        load_dataset(tmp_path)
