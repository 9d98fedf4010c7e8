"""Shared fixtures: a tiny rendered dataset (coloured shapes) in Karpathy format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")


def _draw(shape: str, colour: tuple[int, int, int], size: int = 32) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    box = (6, 6, size - 6, size - 6)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(size // 2, 5), (size - 5, size - 5), (5, size - 5)], fill=colour)
    return image


def write_shapes_dataset(root: Path) -> Path:
    """12 images (4 colours x 3 shapes), 2 captions each; blue shapes are the test split,
    yellow ones val, the rest train. Returns the dataset.json path."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    images = []
    sentid = 0
    for imgid, (colour, shape) in enumerate((c, s) for c in COLOURS for s in SHAPES):
        filename = f"{colour}_{shape}.png"
        _draw(shape, COLOURS[colour]).save(root / "images" / filename)
        split = {"blue": "test", "yellow": "val"}.get(colour, "train")
        sentences = [
            {"raw": f"a {colour} {shape}", "sentid": sentid},
            {"raw": f"{shape} in {colour}", "sentid": sentid + 1},
        ]
        sentid += 2
        images.append(
            {"imgid": imgid, "filename": filename, "filepath": "images", "split": split, "sentences": sentences}
        )
    path = root / "dataset.json"
    path.write_text(json.dumps({"dataset": "shapes", "images": images}))
    return path


@pytest.fixture(scope="session")
def shapes_dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(root)
    return root


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("clipdistill")
    group.addoption(
        "--screenshot", action="store_true", help="test_browser.py: save the search page to docs/screenshot.png"
    )
    group.addoption(
        "--screenshot-index", default=None, help="index folder to serve for the screenshot (default: the test index)"
    )
    group.addoption("--screenshot-query", default=None, help="text query shown in the screenshot")
