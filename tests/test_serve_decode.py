"""The service's image decode path: only the advertised formats, every decoder failure a 4xx
(a seeded mutation fuzz across the accepted formats), and decoded pixels bounded by the
decode budget however many image queries arrive at once.

The fast suite runs 10,000 mutated images (about 6 s); ``-m slow`` runs 50,000.
"""

from __future__ import annotations

import io
import random
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient
from PIL import Image

from clipdistill.serve.app import create_app, decode_image
from clipdistill.serve.app.budget import DecodeBudget, decode_cost
from clipdistill.serve.app.limits import ACCEPTED_FORMATS, STATIC_DIR
from test_service import assert_error, b64, ensure_service_index


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory, shapes_dataset_dir: Path) -> Path:
    return ensure_service_index(tmp_path_factory.getbasetemp(), shapes_dataset_dir)


@pytest.fixture(scope="module")
def client(index_dir: Path) -> TestClient:
    return TestClient(create_app({"shapes": index_dir}, warmup=False), raise_server_exceptions=False)


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def gradient(mode: str, size: tuple[int, int]) -> Image.Image:
    width, height = size
    rgb = Image.new("RGB", size)
    rgb.putdata([((x * 255) // width, (y * 255) // height, (x * y) % 256) for y in range(height) for x in range(width)])
    return rgb.convert(mode) if mode != "P" else rgb.quantize(16)


def seeds() -> list[tuple[str, bytes]]:
    """Valid images in every accepted format, in the modes and options each format writes."""
    out: list[tuple[str, bytes]] = []
    for size in ((1, 1), (17, 9), (48, 40)):
        out.append(("JPEG", encoded(gradient("RGB", size), "JPEG", quality=80)))
        out.append(("JPEG", encoded(gradient("L", size), "JPEG", progressive=True)))
        out.append(("JPEG", encoded(gradient("CMYK", size), "JPEG")))
        for mode in ("RGB", "RGBA", "L", "LA", "P", "1", "I;16"):
            out.append(("PNG", encoded(gradient(mode, size), "PNG")))
        out.append(("PNG", encoded(gradient("RGB", size), "PNG", optimize=True)))
        out.append(("WEBP", encoded(gradient("RGB", size), "WEBP", quality=70)))
        out.append(("WEBP", encoded(gradient("RGBA", size), "WEBP", lossless=True)))
        out.append(("GIF", encoded(gradient("P", size), "GIF")))
        frames = [gradient("P", size), gradient("P", size).transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
        out.append(("GIF", encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)))
    return out


SEEDS = seeds()


def other_formats() -> list[tuple[str, bytes]]:
    """Valid images in formats Pillow writes but the service does not accept."""
    small = gradient("RGB", (8, 8))
    out = [(fmt, encoded(small, fmt)) for fmt in ("TIFF", "BMP", "PPM", "TGA", "PCX", "SGI", "IM", "ICO")]
    out.append(("DDS", encoded(gradient("RGBA", (8, 8)), "DDS")))
    out.append(("EPS", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"))  # would go to Ghostscript
    return out


OTHER = other_formats()
# the fuzz mutates refused formats too: a mutated TIFF or DDS must be a 415 as well, never reach a decoder
FUZZ_SEEDS = SEEDS + [(fmt, data) for fmt, data in OTHER if fmt != "EPS"]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to three seeded mutations: bit flips, interesting bytes, big integers written over
    header fields, truncation, deleted / duplicated / inserted runs."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(7)
        pos = rng.randrange(len(buf)) if buf else 0
        if kind == 0 and buf:
            buf[pos] ^= 1 << rng.randrange(8)
        elif kind == 1 and buf:
            buf[pos] = rng.choice((0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF))
        elif kind == 2 and len(buf) > 4:
            at = rng.randrange(min(len(buf) - 4, 64))  # header fields live near the start
            buf[at : at + 4] = rng.choice((0xFFFFFFFF, 0x7FFFFFFF, 0x00010000, 0, 6000, 65535)).to_bytes(4, "big")
        elif kind == 3:
            del buf[rng.randrange(len(buf) + 1) :]
        elif kind == 4 and buf:
            del buf[pos : pos + rng.randint(1, 32)]
        elif kind == 5 and buf:
            buf[pos:pos] = buf[pos : pos + rng.randint(1, 64)]
        else:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return bytes(buf)


def run_fuzz(cases: int, seed: int) -> dict[str, int]:
    """Every mutated image either decodes to the model size or is a 4xx; anything else fails
    with the case number to reproduce it."""
    rng = random.Random(seed)
    budget = DecodeBudget(256 * 1024 * 1024)
    outcomes: dict[str, int] = {}
    for case in range(cases):
        fmt, data = FUZZ_SEEDS[case % len(FUZZ_SEEDS)]
        mutated = mutate(data, rng)
        try:
            image = decode_image(mutated, budget=budget, size=(24, 32))
        except HTTPException as error:
            assert 400 <= error.status_code < 500, (seed, case, fmt, error.status_code)
            assert isinstance(error.detail, str) and error.detail
            key = str(error.status_code)
        except Exception as error:  # the failure the test exists for: report it reproducibly
            raise AssertionError(f"seed {seed} case {case} ({fmt}): {type(error).__name__}: {error}") from error
        else:
            assert image.mode == "RGB" and image.size == (32, 24), (seed, case, fmt)
            key = "decoded"
        outcomes[key] = outcomes.get(key, 0) + 1
    assert budget.in_use == 0
    return outcomes


def test_fuzzed_images_are_decoded_or_4xx() -> None:
    """10,000 mutated images (about 6 s). The decode path before this fuzz let a mutated DDS
    through as NotImplementedError (a 500) about once in 500 cases of this corpus."""
    outcomes = run_fuzz(10_000, seed=20)
    assert sum(outcomes.values()) == 10_000, outcomes
    assert outcomes.get("decoded", 0) > 1000 and outcomes.get("415", 0) > 1000, outcomes  # both paths exercised


@pytest.mark.slow
def test_fuzzed_images_are_decoded_or_4xx_50000() -> None:
    outcomes = run_fuzz(50_000, seed=2020)
    assert sum(outcomes.values()) == 50_000 and outcomes.get("decoded", 0) > 5000, outcomes


def test_fuzzed_images_through_http_are_never_5xx(client: TestClient) -> None:
    rng = random.Random(7)
    for case in range(60):
        fmt, data = SEEDS[case % len(SEEDS)]
        mutated = mutate(data, rng)
        response = (
            client.post("/search", json={"image_b64": b64(mutated), "k": 2})
            if case % 2
            else client.post("/search", files={"image": ("q", mutated, "application/octet-stream")})
        )
        if not mutated:
            assert response.status_code == 422
            continue
        assert response.status_code in (200, 413, 415), (case, fmt, response.status_code, response.text[:200])


@pytest.mark.parametrize(("fmt", "data"), OTHER, ids=[f for f, _ in OTHER])
def test_formats_the_page_does_not_advertise_are_not_decoded(client: TestClient, fmt: str, data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as probe:  # Pillow itself reads it ...
        assert probe.format == fmt
    response = client.post("/search", files={"image": (f"q.{fmt.lower()}", data, "application/octet-stream")})
    assert_error(response, 415, "not an image in an accepted format", "JPEG, PNG, WEBP, GIF")  # ... the service not


def test_the_page_advertises_exactly_the_decoded_formats() -> None:
    page = (STATIC_DIR / "index.html").read_text()
    accept = re.search(r'<input id="file" type="file" accept="([^"]+)"', page)
    assert accept is not None
    assert accept.group(1).split(",") == list(ACCEPTED_FORMATS.values())


# ----------------------------------------------------------------------------- bounded memory


def test_decode_budget_bounds_concurrent_decodes() -> None:
    budget = DecodeBudget(100)
    inside, most = 0, 0
    lock = threading.Lock()

    def work(cost: int) -> None:
        nonlocal inside, most
        cost = min(cost, 100)  # what reserve() holds for an image over the whole budget
        with budget.reserve(cost):
            with lock:
                inside += cost
                most = max(most, inside)
            threading.Event().wait(0.01)
            with lock:
                inside -= cost

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, [40, 30, 60, 10, 500, 25, 40, 70] * 3))  # 500: over the budget, waits alone
    assert most <= 100 and budget.peak <= 100 and budget.in_use == 0
    assert most >= 70  # several at once when they fit


def test_concurrent_large_image_queries_stay_inside_the_decode_budget(index_dir: Path) -> None:
    """8 concurrent 1,500 x 1,500 PNG queries (each reserves 27 MB to decode) under a 60 MB budget:
    every one answers, and decoded pixels never exceed the budget at once."""
    big = encoded(gradient("RGB", (64, 64)).resize((1500, 1500)), "PNG")
    cost = decode_cost(1500, 1500, "RGB")
    app = create_app({"s": index_dir}, warmup=False, slots=8, decode_memory=60 * 1024 * 1024, caption_search=False)
    client = TestClient(app)
    with ThreadPoolExecutor(8) as pool:
        responses = list(
            pool.map(lambda _: client.post("/search", files={"image": ("b.png", big, "image/png")}), range(8))
        )
    assert [r.status_code for r in responses] == [200] * 8
    budget = app.state.service.budget
    assert budget.peak <= 60 * 1024 * 1024 and budget.peak >= cost and budget.in_use == 0
    assert budget.peak < 3 * cost  # at most two decodes at once (the executor alone would allow 8)


def test_decoded_query_equals_the_searcher_path(index_dir: Path) -> None:
    """Resizing at decode time (to free the budget early) gives the same vector as the Searcher,
    which resizes inside the preprocessor."""
    import numpy as np

    from clipdistill.serve.search import Searcher

    searcher = Searcher.open(index_dir)
    data = encoded(gradient("RGBA", (300, 200)), "PNG")
    resized = decode_image(data, size=searcher.encoders.preprocess.size)
    np.testing.assert_array_equal(searcher.embed_query(image=resized), searcher.embed_query(image=data))
