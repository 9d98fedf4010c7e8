"""Fuzz: mutated images in every format Pillow can write never crash the dataset check or the decoder.

Every mutated file must either pass ``image_problem`` and then decode through training's and
the service's decoder, or be named by ``image_problem`` with a reason (and then refused by both
decoders with their own error types). A crash is any other exception. Seeded, small images; the
default suite runs 1,000 cases, ``-m slow`` the full 10,000.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clipdistill.data.images as images_module
from clipdistill.data.dataset import DatasetError
from clipdistill.data.images import image_problem, open_rgb
from clipdistill.serve.preprocess import ImageInputError, open_image

# Pillow warns about the damage it reads past (truncated TIFF tags, ...): expected here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")

MODES = ("RGB", "L", "RGBA", "P", "1", "I;16", "F", "CMYK")


def _base(mode: str, rng: np.random.Generator) -> Image.Image:
    rgb = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), "RGB")
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (12, 16), dtype=np.uint16))
    if mode == "F":
        return Image.fromarray(rng.random((12, 16), dtype=np.float32), "F")
    if mode == "P":
        return rgb.quantize(8)
    return rgb.convert(mode)


def writable_samples() -> list[tuple[str, str, bytes]]:
    """(format, mode, bytes) for every format in ``Image.SAVE`` and every mode it accepts."""
    Image.init()
    rng = np.random.default_rng(0)
    samples = []
    for fmt in sorted(Image.SAVE):
        for mode in MODES:
            buffer = io.BytesIO()
            try:
                _base(mode, rng).save(buffer, fmt)
            except Exception:  # this format does not write this mode (or has no writer installed)
                continue
            samples.append((fmt, mode, buffer.getvalue()))
    return samples


def mutate(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """One seeded mutation: flip bytes anywhere, truncate, mangle the header, or splice junk."""
    array = bytearray(data)
    kind = ("flip", "truncate", "header", "splice")[int(rng.integers(4))]
    if kind == "flip":
        for _ in range(int(rng.integers(1, 9))):
            array[int(rng.integers(len(array)))] ^= 1 << int(rng.integers(8))
    elif kind == "truncate":
        array = array[: int(rng.integers(1, len(array)))]
    elif kind == "header":
        span = min(len(array), 64)
        for _ in range(int(rng.integers(1, 5))):
            array[int(rng.integers(span))] = int(rng.integers(256))
    else:
        at = int(rng.integers(len(array)))
        junk = rng.integers(0, 256, int(rng.integers(1, 33)), dtype=np.uint8).tobytes()
        array = array[:at] + junk + array[at + int(rng.integers(0, 33)) :]
    return kind, bytes(array)


def run_fuzz(tmp_path: Path, cases: int, seed: int) -> dict[str, int]:
    samples = writable_samples()
    formats = {fmt for fmt, _, _ in samples}
    assert {"PNG", "JPEG", "TIFF", "BMP", "GIF", "WEBP", "DDS", "IM"} <= formats, formats
    rng = np.random.default_rng(seed)
    counts = {"cases": 0, "named": 0, "decoded": 0, "formats": len(formats)}
    path = tmp_path / "fuzzed"
    for case in range(cases):
        fmt, mode, data = samples[case % len(samples)]
        kind, mutated = mutate(data, rng)
        path.write_bytes(mutated)
        where = f"case {case}: {fmt}/{mode} {kind}"
        problem = image_problem(path)  # any exception escaping here fails the test: a crash
        if problem is None:
            # passed the check: training's and the service's decoders must both take it
            training = np.asarray(open_rgb(path))
            serving = np.asarray(open_image(mutated))
            assert np.array_equal(training, serving), where
            counts["decoded"] += 1
        else:
            assert isinstance(problem, str) and problem.strip(), where
            for decode, error in ((open_rgb, DatasetError), (open_image, ImageInputError)):
                with contextlib.suppress(error):  # refused with the decoder's own error, never another
                    decode(path)
            counts["named"] += 1
        counts["cases"] += 1
    return counts


@pytest.fixture
def small_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """A mangled header can claim millions of pixels; a low limit keeps every case fast (and
    sends those cases down the decompression-bomb path, which must name them too)."""
    monkeypatch.setattr(images_module, "MAX_PIXELS", 4_000_000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4_000_000)


def test_every_writable_format_is_fuzzed(tmp_path: Path, small_limits: None) -> None:
    counts = run_fuzz(tmp_path, 1_000, seed=1)
    assert counts["cases"] == 1_000
    assert counts["named"] > 300 and counts["decoded"] > 50, counts  # both outcomes exercised


@pytest.mark.slow
def test_ten_thousand_mutated_images(tmp_path: Path, small_limits: None) -> None:
    counts = run_fuzz(tmp_path, int(os.environ.get("CLIPDISTILL_FUZZ_CASES", "10000")), seed=2)
    assert counts["cases"] >= 10_000, counts
    print(counts)
