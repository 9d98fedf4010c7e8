"""One decoder for training, cache, embed and serve (clipdistill.imaging).

Training reads pixels through ``data.images`` (``open_rgb`` / ``decode_uint8``), the service and
``clipdistill embed`` through ``serve.preprocess`` (``open_image`` / ``ImagePreprocessor``). These
tests decode the same files both ways and demand identical pixels, on the inputs where two
decoders would differ (16-bit, float, EXIF-rotated) and on the ordinary ones.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipdistill.data.images import decode_uint8, open_rgb
from clipdistill.imaging import ImageDecodeError, decode_rgb
from clipdistill.serve.preprocess import ImageInputError, ImagePreprocessor, open_image, to_rgb

RNG = np.random.default_rng(0)


def _rgba_noise() -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (12, 10, 4), dtype=np.uint8), "RGBA")


def _grey16() -> Image.Image:
    return Image.fromarray((np.arange(120, dtype=np.uint16).reshape(12, 10) * 500).astype(np.uint16))


def _float(scale: float) -> Callable[[], Image.Image]:
    return lambda: Image.fromarray((np.arange(120, dtype=np.float32).reshape(12, 10) / 119.0 * scale), "F")


def _palette() -> Image.Image:
    image = Image.fromarray(RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8), "RGB")
    return image.quantize(16)


def _cmyk() -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (12, 10, 4), dtype=np.uint8), "CMYK")


def _rotated() -> Image.Image:
    """A 10x12 image whose EXIF says 'rotate 90 degrees clockwise to view' (orientation 6)."""
    array = np.zeros((12, 10, 3), dtype=np.uint8)
    array[0, :, 0] = 255  # a red top row
    image = Image.fromarray(array, "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    image.info["exif"] = exif.tobytes()
    return image


CASES = {
    "rgba.png": _rgba_noise,
    "grey16.png": _grey16,
    "float01.tiff": _float(1.0),
    "float255.tiff": _float(255.0),
    "palette.png": _palette,
    "cmyk.jpg": _cmyk,
    "cmyk.tiff": _cmyk,
    "grey_alpha.png": lambda: Image.fromarray(RNG.integers(0, 256, (12, 10, 2), dtype=np.uint8), "LA"),
    "rotated.png": _rotated,
}


def _write(tmp_path: Path, name: str) -> Path:
    image = CASES[name]()
    path = tmp_path / name
    exif = image.info.get("exif")
    image.save(path, **({"exif": exif} if exif else {}))
    return path


@pytest.mark.parametrize("name", sorted(CASES))
def test_training_and_serving_decode_the_same_pixels(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path, name)
    training = np.asarray(open_rgb(path))
    serving = np.asarray(open_image(path))
    uploaded = np.asarray(open_image(path.read_bytes()))
    with Image.open(path) as opened:
        opened.load()
        handed = np.asarray(to_rgb(opened))  # what the service does with an image it opened itself
    assert training.dtype == np.uint8 and training.shape[2] == 3
    for other in (serving, uploaded, handed):
        assert np.array_equal(training, other), name
    # ... and through the model-size paths: decode_uint8 (training) vs ImagePreprocessor (serve, embed)
    tensor = decode_uint8(path, 8).permute(1, 2, 0).numpy()
    unit = ImagePreprocessor(size=(8, 8), mean=(0, 0, 0), std=(1, 1, 1)).unit_pixels(path)
    assert np.array_equal(np.round(unit.transpose(1, 2, 0) * 255).astype(np.uint8), tensor), name


def test_16_bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "g.png"
    Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16)).save(path)
    expected = round(40000 / 65535 * 255)  # 156; Pillow's plain convert gives 255 (white)
    assert np.asarray(open_image(path))[0, 0].tolist() == [expected] * 3
    assert np.asarray(open_rgb(path))[0, 0].tolist() == [expected] * 3


@pytest.mark.parametrize(("scale", "value", "expected"), [(1.0, 0.5, 128), (255.0, 100.0, 100)])
def test_float_images_are_mapped_by_their_range(tmp_path: Path, scale: float, value: float, expected: int) -> None:
    array = np.full((4, 4), value, dtype=np.float32)
    array[0, 0] = scale  # the maximum decides the range: [0, 1] or [0, 255]
    array[0, 1] = np.nan  # NaN reads as 0
    path = tmp_path / "f.tiff"
    Image.fromarray(array, "F").save(path)
    pixels = np.asarray(open_image(path))
    assert pixels[2, 2].tolist() == [expected] * 3  # a float TIFF in [0, 1] is not decoded black
    assert pixels[0, 0].tolist() == [255] * 3
    assert pixels[0, 1].tolist() == [0] * 3


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    path = _write(tmp_path, "rotated.png")
    for pixels in (np.asarray(open_rgb(path)), np.asarray(open_image(path))):
        assert pixels.shape == (10, 12, 3)  # stored 10 wide x 12 high, shown 12 wide x 10 high
        assert pixels[:, -1, 0].tolist() == [255] * 10  # the stored top row is now the right column
        assert pixels[:, 0, 0].tolist() == [0] * 10


def test_palette_transparency_and_cmyk_colours(tmp_path: Path) -> None:
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 1  # index 1 (red) is transparent -> white
    palette.save(tmp_path / "p.png")
    assert np.asarray(open_image(tmp_path / "p.png"))[0, 0].tolist() == [255, 255, 255]
    rgb_trns = Image.new("RGB", (4, 4), (10, 20, 30))
    rgb_trns.save(tmp_path / "t.png", transparency=(10, 20, 30))  # tRNS colour key: transparent
    assert np.asarray(open_rgb(tmp_path / "t.png"))[0, 0].tolist() == [255, 255, 255]
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.tiff")
    assert np.asarray(open_image(tmp_path / "c.tiff"))[0, 0].tolist() == [255, 0, 0]


def _previous_decoder(path: Path) -> np.ndarray:
    """The training decoder before clipdistill.imaging (data/images.py at 0598723), for inputs
    without EXIF orientation or tRNS transparency: the new decoder must give the same bytes."""
    with Image.open(path) as image:
        image.load()
        if image.mode.startswith("I") or image.mode == "F":
            array = np.asarray(image, dtype=np.float64)
            top = 65535.0
            if image.mode == "F":
                top = 1.0 if array.size and float(np.nanmax(array)) <= 1.0 else 255.0
            grey = np.clip(np.nan_to_num(array) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
            return np.asarray(Image.fromarray(grey, "L").convert("RGB"))
        if image.mode in ("RGBA", "LA", "P", "PA"):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("name", sorted(set(CASES) - {"rotated.png"}))
def test_inputs_without_orientation_decode_as_before(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path, name)
    assert np.array_equal(np.asarray(open_rgb(path)), _previous_decoder(path)), name


def test_demo_emoji_and_shapes_decode_bitwise_as_before(tmp_path: Path, shapes_dataset_dir: Path) -> None:
    """The quick demo's images (rendered emoji PNGs, the shapes fixture) decode exactly as before,
    so the only pipeline change (distill/cache.py PIPELINE v3) is EXIF orientation and tRNS."""
    paths = sorted(shapes_dataset_dir.rglob("*.png"))
    from clipdistill.data import emoji

    if emoji.DEFAULT_FONT.is_file():
        renderer = emoji.GlyphRenderer(emoji.load_font())
        for index, text in enumerate(["\U0001f600", "\U0001f431", "\u2764\ufe0f", "\U0001f680", "\U0001f34e"]):
            image, _ = renderer.render(text, 64)
            assert image is not None
            (tmp_path / f"e{index}.png").write_bytes(emoji._png_bytes(image))
            paths.append(tmp_path / f"e{index}.png")
    assert paths
    for path in paths:
        assert np.array_equal(np.asarray(open_rgb(path)), _previous_decoder(path)), path


def test_undecodable_input_is_named_with_the_exception_type(tmp_path: Path) -> None:
    path = tmp_path / "bad.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(ImageDecodeError, match=r"cannot decode image .*bad\.png: .+ \(\w+(Error|Exception)\)$"):
        decode_rgb(path, str(path))
    with pytest.raises(ImageInputError, match=r"bad\.png"):
        open_image(path)
    with pytest.raises(ImageInputError, match=r"uploaded bytes"):
        open_image(path.read_bytes())
    with pytest.raises(ImageInputError):
        open_image(io.BytesIO(b"").getvalue() + b"GIF89a")
