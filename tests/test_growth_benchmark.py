"""benchmarks/growth.py's pure parts: the scaled data sets (counts, splits kept, every copy's pixels
and captions its own), the run folder's disk use, the growth ratios, and the generated block
(rendered, or skipped while no result exists)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def _load(name: str) -> ModuleType:
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))  # the scripts import _record and results_doc from beside them
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def growth() -> ModuleType:
    return _load("growth")


def _source(root: Path) -> Path:
    """Ten 16 px images, 8 train / 1 val / 1 test, in the emoji build's layout; among them an
    all-white one and a symmetric one (a variant of those differs by its tint alone), and a
    caption that two images share."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = []
    for index in range(10):
        if index == 0:
            pixels = np.full((16, 16, 3), 255, np.uint8)
        elif index == 1:
            pixels = np.full((16, 16, 3), 255, np.uint8)
            pixels[4:12, 4:12] = (200, 30, 30)
        else:
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{index:02d}.png")
        split = {4: "val", 7: "test"}.get(index, "train")
        sentences = [{"raw": f"thing {index}"}, {"raw": "a shared caption"}]
        images.append({"filename": f"{index:02d}.png", "filepath": "images", "split": split, "sentences": sentences})
    (root / "dataset.json").write_text(json.dumps({"dataset": "tiny", "images": images}))
    return root / "dataset.json"


def test_scaled_counts_and_splits(growth: ModuleType, tmp_path: Path) -> None:
    source = _source(tmp_path / "src")
    counts = growth.scale_dataset(source, tmp_path / "x3", 3)
    assert counts == {
        "images": 30,
        "captions": 60,
        "distinct_captions": 33,  # 11 distinct in the source, each copy its own
        "splits": {"train": 24, "val": 3, "test": 3},
    }
    doc = json.loads((tmp_path / "x3" / "dataset.json").read_text())
    assert len({image["image_id"] for image in doc["images"]}) == 30
    sentids = [s["sentid"] for image in doc["images"] for s in image["sentences"]]
    assert sentids == list(range(60))
    by_source: dict[str, list[dict[str, Any]]] = {}
    for image in doc["images"]:
        by_source.setdefault(image["image_id"].split("__v")[0], []).append(image)
    for copies in by_source.values():
        assert [c["copy"] for c in copies] == [0, 1, 2]
        assert len({c["split"] for c in copies}) == 1  # a copy keeps its source's split

    from clipdistill.data.karpathy import read_karpathy

    assert len(read_karpathy(tmp_path / "x3" / "dataset.json")) == 30  # the reader takes it as it is


def test_every_copy_differs_in_pixels_and_captions(growth: ModuleType, tmp_path: Path) -> None:
    source = _source(tmp_path / "src")
    factor = growth.MAX_FACTOR
    growth.scale_dataset(source, tmp_path / "scaled", factor)
    doc = json.loads((tmp_path / "scaled" / "dataset.json").read_text())
    per_image: dict[str, list[dict[str, Any]]] = {}
    for image in doc["images"]:
        per_image.setdefault(image["image_id"].split("__v")[0], []).append(image)
    assert len(per_image) == 10
    for name, copies in per_image.items():
        assert len(copies) == factor
        pixels = [np.asarray(Image.open(tmp_path / "scaled" / "images" / c["filename"]).convert("RGB")) for c in copies]
        original = np.asarray(Image.open(tmp_path / "src" / "images" / copies[0]["filename"]).convert("RGB"))
        assert np.array_equal(pixels[0], original)  # copy 0 is the image as built
        for a, b in itertools.combinations(range(factor), 2):
            assert not np.array_equal(pixels[a], pixels[b]), (name, a, b)
        captions = [{s["raw"] for s in c["sentences"]} for c in copies]
        for a, b in itertools.combinations(range(factor), 2):
            assert not captions[a] & captions[b], (name, a, b)
    words = [growth.variant_words(copy) for copy in range(factor)]
    assert words[0] == "" and len(set(words)) == factor
    assert words[1] == "rotated 90 degrees and tinted red"
    assert words[4] == "mirrored and tinted green"


def test_factor_beyond_the_tints_is_refused(growth: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="factor"):
        growth.scale_dataset(_source(tmp_path / "src"), tmp_path / "x", growth.MAX_FACTOR + 1)
    with pytest.raises(SystemExit, match="does not exist"):
        growth.scale_dataset(tmp_path / "missing" / "dataset.json", tmp_path / "y", 1)


def test_base_images_keep_each_split_and_the_order(growth: ModuleType, tmp_path: Path) -> None:
    source = _source(tmp_path / "src")
    images = json.loads(source.read_text())["images"]
    kept = growth.first_images(images, 4)
    assert [image["filename"] for image in kept] == ["00.png", "01.png", "04.png", "07.png"]
    assert growth.first_images(images, None) == images
    counts = growth.scale_dataset(source, tmp_path / "x2", 2, base_images=4)
    assert counts["images"] == 8 and counts["splits"] == {"train": 4, "val": 2, "test": 2}


def test_finished_set_is_reused(growth: ModuleType, tmp_path: Path) -> None:
    source = _source(tmp_path / "src")
    target = tmp_path / "x2" / "dataset.json"
    first = growth.scale_dataset(source, tmp_path / "x2", 2)
    stamp = target.stat().st_mtime_ns
    assert growth.scale_dataset(source, tmp_path / "x2", 2) == first
    assert target.stat().st_mtime_ns == stamp
    growth.scale_dataset(source, tmp_path / "x2", 2, base_images=5)  # other inputs: written again
    assert json.loads(target.read_text())["scaled"]["base_images"] == 5


def test_disk_use_sums_file_sizes_once(growth: ModuleType, tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "cache" / "shards").mkdir(parents=True)
    (run / "cache" / "a.bin").write_bytes(b"x" * 100)
    (run / "cache" / "shards" / "b.bin").write_bytes(b"x" * 50)
    (run / "students").mkdir()
    (run / "students" / "c.bin").write_bytes(b"x" * 7)
    os.link(run / "students" / "c.bin", run / "students" / "c-link.bin")  # a hard link: counted once
    (run / "students" / "to-cache").symlink_to(run / "cache")  # not followed
    (run / "report.json").write_bytes(b"{}")
    (run / "empty").mkdir()
    assert growth.disk_use(run) == {
        "total_bytes": 159,
        "entries": {"cache": 150, "empty": 0, "report.json": 2, "students": 7},
    }
    with pytest.raises(SystemExit, match="does not exist"):
        growth.disk_use(tmp_path / "missing")


def _row(factor: int, scale: float) -> dict[str, Any]:
    return {
        "factor": factor,
        "images": 100 * factor,
        "captions": 500 * factor,
        "distinct_captions": 400 * factor,
        "splits": {"train": 80 * factor, "val": 10 * factor, "test": 10 * factor},
        "memory": {
            "peak_rss_mb": 1000 * scale,
            "per_stage": "reset",
            "stages": {"teacher": 1000 * scale, "students": 800.0},
            "seconds": {"teacher": 10.0 * factor, "students": 20.0 * factor, "deploy": 0.0},
        },
        "wall_seconds": 31.0 * factor,
        "process_wall_s": 40.0 * factor,
        "ru_maxrss_mb": 900.0,
        "disk": {"total_bytes": 3_000_000 * factor, "entries": {"cache": 2_000_000 * factor, "index": 1_000_000}},
    }


def test_growth_ratios(growth: ModuleType) -> None:
    rows = [_row(1, 1.0), _row(2, 1.2), _row(4, 1.5)]
    ratios = growth.growth_ratios(rows)
    assert ratios["from_factor"] == 1 and ratios["to_factor"] == 4
    figures = ratios["figures"]
    assert figures["images"] == 4.0 and figures["distinct_captions"] == 4.0
    assert figures["peak_rss_mb"] == 1.5 and figures["stage_mb.students"] == 1.0
    assert figures["stage_seconds_total"] == 4.0 and figures["stage_seconds.teacher"] == 4.0
    assert "stage_seconds.deploy" not in figures  # zero at the first factor: no ratio
    assert figures["disk_bytes"] == 4.0 and figures["disk.index"] == 1.0
    rows[-1]["memory"] = None  # a run whose report had no memory: those figures are left out
    assert "peak_rss_mb" not in growth.growth_ratios(rows)["figures"]
    assert growth.growth_ratios(rows[:1]) == {}


def _result(growth: ModuleType) -> dict[str, Any]:
    rows = [_row(1, 1.0), _row(4, 1.5)]
    return {
        "benchmark": "growth",
        "date": "2026-01-02T03:04:05+00:00",
        "machine": {"platform": "Linux-test", "cpus": 2, "python": "3.12.0"},
        "complete": True,
        "dataset": {"source": "emoji", "base_images": None},
        "settings": {
            "preset": "quick",
            "methods": ["clip", "mcad"],
            "seeds": 1,
            "overrides": [],
            "factors": [1, 4],
            "budget": {"teacher_epochs": 4, "fusion_epochs": 1, "student_epochs": 2},
        },
        "rows": rows,
        "ratios": growth.growth_ratios(rows),
    }


def test_markdown_block(growth: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "growth.json"
    path.write_text(json.dumps(_result(growth)))
    growth.main(["--markdown", str(path)])
    text = capsys.readouterr().out
    assert text.startswith("<!-- generated: growth -->\n") and text.endswith("<!-- end generated -->\n")
    assert "(Linux-test, 2 CPUs, Python 3.12.0; 2026-01-02T03:04:05+00:00)" in text
    assert "| x1 | 100 (80 / 10 / 10) | 500 (400) | 1000 | teacher 1000 | 30 | 40 | 3.0 |" in text
    assert "| x4 | 400 (320 / 40 / 40) | 2,000 (1,600) | 1500 | teacher 1500 | 120 | 160 | 12.0 |" in text
    assert (
        "From x1 to x4 (4.0x the images, 4.0x the distinct captions): peak memory grows 1.5x (most added: teacher "
        "+500 MiB, 1.5x), the stages' summed time 4.0x (most added: students +60 s, 4.0x), the job's wall clock "
        "4.0x and the run folder 4.0x (most added: cache +6 MB, 4.0x)."
    ) in text
    with pytest.raises(SystemExit, match="does not exist"):
        growth.main(["--markdown", str(tmp_path / "missing.json")])


def test_results_doc_skips_the_block_until_measured(growth: ModuleType, tmp_path: Path) -> None:
    results_doc = _load("results_doc")
    text = "# Doc\n\n<!-- generated: growth -->\nNot measured yet.\n<!-- end generated -->\n"
    assert results_doc.rewrite(text, tmp_path, {}) == (text, [], ["growth"])
    (tmp_path / "growth.json").write_text(json.dumps(_result(growth)))
    new, changed, skipped = results_doc.rewrite(text, tmp_path, {})
    assert changed == ["growth"] and not skipped
    assert "Not measured yet" not in new and "| x4 | 400 (320 / 40 / 40) |" in new
