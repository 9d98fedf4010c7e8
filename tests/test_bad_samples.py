"""``--on-bad-sample error|skip`` for every kind of bad input, in every reader.

Each case builds a small dataset with good samples and exactly one bad one, then checks both
policies: ``error`` stops with the file, the place (``images[2]``, ``row 3``, ``c.txt``) and
the reason; ``skip`` drops just that sample, counts it and names it. Problems with a whole
file (not the expected JSON schema, a CSV without its column) stop under either policy.
"""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from clipdistill.data import DatasetError, load_dataset
from clipdistill.data.images import image_problem, open_rgb

GOOD = ("a", "b", "c")


def _png(path: Path, colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def _noise(fmt: str) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png() -> bytes:
    """A valid ~70-byte PNG header claiming 100,000 x 100,000 pixels: what a decompression bomb looks like."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _chunk(b"IEND", b"")
    )


BAD_FILES: dict[str, tuple[Callable[[], bytes | None], str]] = {
    "corrupt_bytes": (lambda: b"this is not an image at all" * 10, r"cannot be decoded: cannot identify image file"),
    "truncated_png": (lambda: _noise("PNG")[:2000], r"cannot be decoded"),
    "truncated_jpeg": (lambda: _noise("JPEG")[:1500], r"cannot be decoded: image file is truncated"),
    "zero_byte": (lambda: b"", r"is an empty \(zero-byte\) file"),
    "decompression_bomb": (
        _bomb_png,
        r"is 100000x100000 pixels, over the .*-pixel limit|is too large to decode safely",
    ),
    "missing": (lambda: None, r"file does not exist|missing"),
}


def _karpathy(root: Path, images: list[dict[str, Any]]) -> Path:
    path = root / "dataset.json"
    path.write_text(json.dumps({"images": images}), encoding="utf-8")
    return root


def _entry(name: str, captions: list[Any] | None = None, **extra: Any) -> dict[str, Any]:
    sentences = [{"raw": c} for c in (captions or [f"a {name} thing"])]
    return {"filename": f"{name}.png", "split": "train", "sentences": sentences, **extra}


def _good_karpathy(root: Path, bad: dict[str, Any]) -> Path:
    for name in GOOD:
        _png(root / f"{name}.png")
    return _karpathy(root, [_entry(name) for name in GOOD] + [bad])


# --- image files: every reader goes through the same up-front check ---------------------------


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_image_file_error_names_file_place_reason(tmp_path: Path, case: str) -> None:
    make, reason = BAD_FILES[case]
    root = _good_karpathy(tmp_path, _entry("bad"))
    content = make()
    if content is not None:
        (root / "bad.png").write_bytes(content)
    with pytest.raises(DatasetError, match=r"dataset\.json.*bad\.png") as info:
        load_dataset(root)
    assert re.search(reason, str(info.value)), str(info.value)
    if case != "missing":  # missing files are listed all together (count + first five)
        assert "images[3]" in str(info.value) and "--on-bad-sample skip" in str(info.value)


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_image_file_skip_drops_it_and_reports(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    make, reason = BAD_FILES[case]
    root = _good_karpathy(tmp_path, _entry("bad"))
    content = make()
    if content is not None:
        (root / "bad.png").write_bytes(content)
    dataset = load_dataset(root, on_bad_sample="skip")
    assert [r.path.name for r in dataset.images] == ["a.png", "b.png", "c.png"]
    summary = dataset.skipped.summary()  # type: ignore[union-attr]
    assert (summary["policy"], summary["skipped_images"], summary["skipped_captions"]) == ("skip", 1, 0)
    assert re.search(r"images\[3\] image .*bad\.png " + f"(?:{reason})", summary["first"][0])
    assert "skipped 1 image(s) and 0 caption(s)" in capsys.readouterr().err  # never silent


def test_skip_keeps_the_split_views_consistent(tmp_path: Path) -> None:
    root = _good_karpathy(tmp_path, _entry("bad"))
    (root / "bad.png").write_bytes(b"")
    train = load_dataset(root, on_bad_sample="skip").split("train")
    assert len(train) == 3 and train.texts() == ["a a thing", "a b thing", "a c thing"]
    assert train.skipped is not None and train.skipped.count("image") == 1


# --- unusual but valid images decode, to the right colours ------------------------------------


def _save(path: Path, image: Image.Image, **kwargs: Any) -> Path:
    image.save(path, **kwargs)
    return path


@pytest.mark.parametrize(
    ("name", "make", "expected"),
    [
        ("cmyk.jpg", lambda: Image.new("CMYK", (8, 8), (0, 255, 255, 0)), (255, 0, 0)),  # cyan-free = red
        ("grey.png", lambda: Image.new("L", (8, 8), 100), (100, 100, 100)),
        ("grey_alpha.png", lambda: Image.new("LA", (8, 8), (0, 0)), (255, 255, 255)),  # transparent -> white
        ("rgba.png", lambda: Image.new("RGBA", (8, 8), (0, 0, 255, 0)), (255, 255, 255)),
        ("half_alpha.png", lambda: Image.new("RGBA", (8, 8), (0, 0, 0, 128)), (127, 127, 127)),
        ("palette.png", lambda: Image.new("P", (8, 8), 0), (0, 0, 0)),
        ("grey16.png", lambda: Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)), (156, 156, 156)),
    ],
)
def test_cmyk_greyscale_alpha_and_16_bit_images_decode(
    tmp_path: Path, name: str, make: Callable[[], Image.Image], expected: tuple[int, int, int]
) -> None:
    path = _save(tmp_path / name, make())
    assert image_problem(path) is None
    pixel = np.asarray(open_rgb(path, 8))[4, 4]
    assert np.abs(pixel.astype(int) - np.array(expected)).max() <= 2, (name, pixel)


# --- captions, ids and schema: Karpathy -------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "error", "skipped"),
    [
        (
            _entry("d", ["fine", "   "]),
            r"dataset\.json: images\[3\]\.sentences\[1\] field 'raw' is empty",
            {"images": 0, "captions": 1, "texts": 4},
        ),
        (
            _entry("d", [""]),
            r"images\[3\]\.sentences\[0\] field 'raw' is empty",
            {"images": 1, "captions": 1, "texts": 3},
        ),
        (
            _entry("d", ["ok", 7]),
            r"images\[3\]\.sentences\[1\] field 'raw' has value 7 \(expected a string\)",
            {"images": 0, "captions": 1, "texts": 4},
        ),
        (
            _entry("a", imgid=0) | {"filename": "a2.png"},
            r"images\[3\] duplicate image id '0' \(images #0 and #3\)",
            {"images": 1, "captions": 0, "texts": 3},
        ),
        (
            _entry("d", ["x"]) | {"sentences": [{"raw": "dup", "sentid": 5}]},
            r"duplicate caption id '5'",
            {"images": 1, "captions": 1, "texts": 3},
        ),
        (
            _entry("d", split="dev"),
            r"images\[3\] field 'split' has value 'dev'",
            {"images": 1, "captions": 0, "texts": 3},
        ),
    ],
)
def test_karpathy_bad_caption_or_id(tmp_path: Path, bad: dict[str, Any], error: str, skipped: dict[str, int]) -> None:
    images = [_entry(name) for name in GOOD]
    if "dup" in json.dumps(bad):
        images[0]["sentences"][0]["sentid"] = 5
    if "imgid" in bad:
        images[0]["imgid"] = 0
    for name in (*GOOD, "d", "a2"):
        _png(tmp_path / f"{name}.png")
    root = _karpathy(tmp_path, [*images, bad])
    with pytest.raises(DatasetError, match=error):
        load_dataset(root)
    dataset = load_dataset(root, on_bad_sample="skip")
    assert dataset.skipped is not None
    counts = {"images": dataset.skipped.count("image"), "captions": dataset.skipped.count("caption")}
    assert counts == {k: skipped[k] for k in ("images", "captions")}
    assert len(dataset.texts()) == skipped["texts"]
    assert any(re.search(error, message) for message in dataset.skipped.summary()["first"])


def test_karpathy_caption_with_invalid_utf8(tmp_path: Path) -> None:
    for name in (*GOOD, "d"):
        _png(tmp_path / f"{name}.png")
    text = json.dumps({"images": [_entry(n) for n in GOOD] + [_entry("d", ["fine", "caf@"])]})
    (tmp_path / "dataset.json").write_bytes(text.encode("utf-8").replace(b"caf@", b"caf\xe9"))
    with pytest.raises(DatasetError, match=r"images\[3\]\.sentences\[1\] field 'raw' is not valid UTF-8 \(byte 0xe9\)"):
        load_dataset(tmp_path)
    dataset = load_dataset(tmp_path, on_bad_sample="skip")
    assert dataset.texts()[-1] == "fine" and dataset.skipped.count("caption") == 1  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ('{"annotations": []}', r"top level has no field 'images'"),
        ('{"images": {"a": 1}}', r"field 'images' is a dict, expected a list"),
        ("[]", r"top level is a list"),
        ('{"images": [', r"invalid JSON at line 1"),
    ],
)
def test_json_that_is_not_the_expected_schema_stops_even_with_skip(tmp_path: Path, content: str, error: str) -> None:
    (tmp_path / "dataset.json").write_text(content, encoding="utf-8")
    for policy in ("error", "skip"):
        with pytest.raises(DatasetError, match=error):
            load_dataset(tmp_path, on_bad_sample=policy)


def test_every_sample_bad_is_an_error_even_with_skip(tmp_path: Path) -> None:
    _karpathy(tmp_path, [_entry("gone")])
    with pytest.raises(DatasetError, match=r"no usable sample left after skipping 1 bad one\(s\); first: .*gone\.png"):
        load_dataset(tmp_path, on_bad_sample="skip")


def test_unknown_policy_is_refused(tmp_path: Path) -> None:
    _good_karpathy(tmp_path, _entry("a") | {"filename": "b.png", "image_id": "x"})
    with pytest.raises(DatasetError, match=r"on_bad_sample 'ignore' is not a policy; valid: error, skip"):
        load_dataset(tmp_path, on_bad_sample="ignore")


# --- CSV ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "error"),
    [
        (b"d.png,", r"row 4 column 'title' is empty \(image 'd\.png'\)"),
        (b",a caption", r"row 4 column 'filepath' is empty"),
        (b"d.png,caf\xe9", r"row 4 column 'title' is not valid UTF-8 \(byte 0xe9\)"),
        (b"d\xff.png,fine", r"row 4 column 'filepath' is not valid UTF-8 \(byte 0xff\)"),
    ],
)
def test_csv_bad_row(tmp_path: Path, row: bytes, error: str) -> None:
    for name in (*GOOD, "d"):
        _png(tmp_path / f"{name}.png")
    body = b"".join(f"{name}.png,a {name} thing\n".encode() for name in GOOD)
    path = tmp_path / "data.csv"
    path.write_bytes(b"filepath,title\n" + body + row + b"\n")
    with pytest.raises(DatasetError, match=r"data\.csv: " + error):
        load_dataset(path)
    dataset = load_dataset(path, on_bad_sample="skip")
    assert dataset.texts() == [f"a {name} thing" for name in GOOD]
    assert dataset.skipped is not None and dataset.skipped.summary()["skipped_captions"] == 1


def test_csv_missing_column_stops_even_with_skip(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("path,title\na.png,x\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"column 'filepath' not found in .*data\.csv \(columns: path, title\)"):
        load_dataset(path, on_bad_sample="skip")


def test_csv_bad_image_names_its_row(tmp_path: Path) -> None:
    for name in GOOD:
        _png(tmp_path / f"{name}.png")
    (tmp_path / "d.png").write_bytes(b"\x89PNG broken")
    path = tmp_path / "data.csv"
    path.write_text("filepath,title\n" + "".join(f"{n}.png,{n}\n" for n in (*GOOD, "d")), encoding="utf-8")
    with pytest.raises(DatasetError, match=r"data\.csv: row 4 image .*d\.png cannot be decoded"):
        load_dataset(path)


# --- folder ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "error", "kind"),
    [
        (lambda root: (_png(root / "d.png"), (root / "d.txt").write_text(" \n")), r"d\.txt is empty", "image"),
        (
            lambda root: (_png(root / "d.png"), (root / "d.txt").write_bytes(b"caf\xe9\n")),
            r"d\.txt is not valid UTF-8 \(byte 0xe9",
            "image",
        ),
        (lambda root: _png(root / "d.png"), r"d\.png has no caption file", "image"),
        (lambda root: (root / "d.txt").write_text("orphan"), r"d\.txt has no image", "caption"),
        (
            lambda root: (_png(root / "a.jpg"), None),
            r"a\.jpg and a\.png share the stem 'a'",
            "image",
        ),
        (lambda root: (root / "d.png").write_bytes(b""), r"d\.txt image .*d\.png is an empty", "image"),
    ],
)
def test_folder_bad_pair(tmp_path: Path, setup: Callable[[Path], Any], error: str, kind: str) -> None:
    for name in GOOD:
        _png(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(f"a {name} thing\n", encoding="utf-8")
    setup(tmp_path)
    if (tmp_path / "d.png").exists() and (tmp_path / "d.png").stat().st_size == 0:
        (tmp_path / "d.txt").write_text("zero bytes behind me\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=error):
        load_dataset(tmp_path)
    dataset = load_dataset(tmp_path, on_bad_sample="skip")
    assert dataset.texts() == [f"a {name} thing" for name in GOOD]
    assert dataset.skipped is not None and dataset.skipped.count(kind) >= 1


# --- the policy through training: stops before any step, or trains on the rest and says so -----


def test_training_stops_before_any_step_or_skips_and_records(shapes_dataset_dir: Path, tmp_path: Path) -> None:
    import shutil

    from typer.testing import CliRunner

    from clipdistill.cli.main import app
    from clipdistill.config import TrainConfig, from_dict
    from clipdistill.train.trainer import train

    shutil.copytree(shapes_dataset_dir, tmp_path / "data")
    (tmp_path / "data" / "images" / "red_circle.png").write_bytes(_noise("PNG")[:300])  # a train image
    raw = {
        "name": "bad",
        "out_dir": str(tmp_path / "runs"),
        "data": {"path": str(tmp_path / "data"), "image_size": 32},
        "optim": {"epochs": 1, "batch_size": 2},
    }
    config_path = tmp_path / "c.yaml"
    config_path.write_text(json.dumps(raw))  # JSON is YAML
    stopped = CliRunner().invoke(app, ["train", str(config_path), "--no-progress"])
    assert stopped.exit_code == 2
    assert re.search(r"dataset\.json: images\[0\] image .*red_circle\.png cannot be decoded", stopped.output)
    assert not (tmp_path / "runs" / "bad").exists()  # stopped before anything was written or trained
    refused = CliRunner().invoke(app, ["train", str(config_path), "--on-bad-sample", "maybe"])
    assert refused.exit_code == 2 and "key 'data.on_bad_sample' has value 'maybe'; valid: error, skip" in refused.output

    config = from_dict(TrainConfig, {**raw, "data": {**raw["data"], "on_bad_sample": "skip"}})
    summary = train(config, progress=False)
    assert summary["bad_samples"]["skipped_images"] == 1 and "red_circle.png" in summary["bad_samples"]["first"][0]
    recorded = json.loads((config.run_dir / "bad_samples.json").read_text())
    assert recorded["all"][0]["where"].startswith("images[0] image") and recorded["all"][0]["kind"] == "image"
    assert summary["steps"] == 2  # 5 usable train images, batch 2


def test_report_lists_skipped_samples() -> None:
    from clipdistill.report import _bad_samples_lines

    bad = {"skipped_images": 2, "skipped_captions": 1, "first": ["d.json: images[3] image x.png is empty"]}
    lines = _bad_samples_lines(bad)
    assert "## Skipped samples" in lines and "- `d.json: images[3] image x.png is empty`" in lines
    assert "left out 2 image(s) and 1 caption(s)" in "\n".join(lines)
    assert _bad_samples_lines(None) == []
