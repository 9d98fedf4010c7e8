"""The HTTP service (serve/app/) through FastAPI's TestClient: every route, every bad input
the API promises a 4xx for, a hypothesis fuzz of the JSON body (never a 5xx), concurrency, and
the ``clipdistill serve`` command.

``ensure_service_index`` builds one small index (the 12 shapes, tiny untrained student) per
test run; test_browser.py serves the same one.
"""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import struct
import subprocess
import sys
import textwrap
import time
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from clipdistill.serve.app import MAX_BODY_BYTES, MAX_IMAGE_BYTES, create_app, parse_index_option
from clipdistill.serve.search import Searcher
from test_export import ensure_export


def ensure_service_index(base: Path, data_dir: Path) -> Path:
    """The shapes set (all 12 images) embedded by the tiny student and indexed (Flat)."""
    from clipdistill.serve.embed import embed_dataset
    from clipdistill.serve.index import build_index

    out = base / "service" / "index"
    if (out / "manifest.json").is_file():
        return out
    export = ensure_export(base / "deploy", data_dir)
    emb = base / "service" / "emb"
    embed_dataset(export, data_dir, emb, split="all", progress=False)
    build_index(emb, out, factory="Flat", thumb_size=48)
    return out


def png_bytes(colour: str = "red", size: tuple[int, int] = (40, 40), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def forged_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no pixel data): a decompression-bomb probe."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory, shapes_dataset_dir: Path) -> Path:
    return ensure_service_index(tmp_path_factory.getbasetemp(), shapes_dataset_dir)


@pytest.fixture(scope="module")
def client(index_dir: Path) -> TestClient:
    return TestClient(create_app({"shapes": index_dir, "copy": index_dir}), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def searcher(index_dir: Path) -> Searcher:
    return Searcher.open(index_dir)


def assert_error(response, status: int, *needles: str) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail
    for needle in needles:
        assert needle.lower() in detail.lower(), detail


# ----------------------------------------------------------------------------- routes


def test_healthz_and_indexes(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "indexes": {"shapes": 12, "copy": 12}}
    indexes = client.get("/indexes").json()
    assert [i["name"] for i in indexes] == ["shapes", "copy"]
    assert [i["default"] for i in indexes] == [True, False]
    first = indexes[0]
    assert first["count"] == 12 and first["factory"] == "Flat" and first["variant"] == "fp32"
    assert first["model"].startswith("local-dir:") and first["dim"] > 0 and first["dataset"] == "shapes"


def test_text_search_matches_the_searcher(client: TestClient, searcher: Searcher) -> None:
    response = client.post("/search", json={"text": "a red circle", "k": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"hits", "timing_ms", "index", "target", "query"}
    assert body["index"] == "shapes" and body["query"] == "text" and body["target"] == "image"
    hits = body["hits"]
    assert len(hits) == 5 and set(hits[0]) == {"id", "score", "caption", "image_url"}
    expected = searcher.search(text="a red circle", k=5)
    assert [h["id"] for h in hits] == [h["id"] for h in expected]
    assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in expected], abs=1e-5)
    assert [h["caption"] for h in hits] == [h["caption"] for h in expected]
    timing = body["timing_ms"]
    assert set(timing) == {"encode", "search", "total"} and all(v >= 0 for v in timing.values())
    assert timing["total"] >= timing["encode"]
    assert len(client.post("/search", json={"text": "a red circle", "k": 100}).json()["hits"]) == 12  # k > count


def test_image_search_json_and_multipart_agree(client: TestClient, searcher: Searcher) -> None:
    data = png_bytes("blue")
    expected = [h["id"] for h in searcher.search(image=data, k=4)]
    plain = client.post("/search", json={"image_b64": b64(data), "k": 4})
    data_url = client.post("/search", json={"image_b64": "data:image/png;base64," + b64(data), "k": 4})
    upload = client.post("/search", files={"image": ("q.png", data, "image/png")}, data={"k": "4"})
    for response in (plain, data_url, upload):
        assert response.status_code == 200, response.text
        assert response.json()["query"] == "image"
        assert [h["id"] for h in response.json()["hits"]] == expected
    rgba = client.post("/search", files={"image": ("q.png", png_bytes((0, 0, 0, 0), mode="RGBA"), "image/png")})
    assert rgba.status_code == 200 and len(rgba.json()["hits"]) == 10  # transparency on white, default k
    gif = io.BytesIO()
    Image.new("P", (20, 20)).save(gif, format="GIF")
    assert client.post("/search", json={"image_b64": b64(gif.getvalue())}).status_code == 200


def test_multipart_text_and_index_fields(client: TestClient) -> None:
    fields = {"text": "a green square", "k": "3", "index": "copy", "target": "text"}
    response = client.post("/search", files=[(key, (None, value)) for key, value in fields.items()])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["index"] == "copy" and body["target"] == "text" and len(body["hits"]) == 3


def test_target_text_ranks_captions(client: TestClient, searcher: Searcher) -> None:
    caption = str(searcher.metadata["caption"].iat[7])
    response = client.post("/search", json={"text": caption, "k": 3, "target": "text"})
    assert response.status_code == 200, response.text
    hits = response.json()["hits"]
    assert hits[0]["caption"] == caption and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert response.json()["target"] == "text"
    image = client.post("/search", json={"image_b64": b64(png_bytes()), "k": 2, "target": "text"})
    assert image.status_code == 200 and len(image.json()["hits"]) == 2


def test_images_route_serves_thumbnails(client: TestClient, index_dir: Path) -> None:
    hit = client.post("/search", json={"text": "a yellow triangle", "k": 1}).json()["hits"][0]
    assert hit["image_url"].startswith("/images/") and "index=shapes" in hit["image_url"]
    response = client.get(hit["image_url"])
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(response.content)) as thumb:
        assert max(thumb.size) <= 48
    assert client.get(f"/images/{hit['id']}?index=copy").content == response.content
    assert client.get(f"/images/{hit['id']}").status_code == 200  # default index


def test_metrics_count_requests_and_stages(client: TestClient) -> None:
    client.post("/search", json={"text": "a blue circle"})
    client.post("/search", json={"text": "x" * 2000})
    client.get("/images/no-such-id")
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'clipdistill_http_requests_total{method="POST",route="/search",status="200"}' in text
    assert 'clipdistill_http_requests_total{method="POST",route="/search",status="422"}' in text
    assert 'route="/images/{image_id:path}",status="404"' in text  # one series per route, not per id
    for stage in ("encode", "search", "total"):
        assert (
            f'clipdistill_search_stage_seconds_bucket{{index="shapes",le="0.05",query="text",stage="{stage}"}}' in text
        )
    assert 'clipdistill_index_items{index="copy"} 12.0' in text
    assert 'clipdistill_searches_total{index="shapes",query="text",target="image"}' in text


def test_page_and_static_files(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for needle in ('id="q"', 'id="file"', 'id="k"', 'id="index"', 'id="results"', 'id="error"', "/static/app.js"):
        assert needle in page.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/style.css").status_code == 200
    assert_error(client.get("/static/../app.py"), 404)


def test_openapi_documents_both_request_bodies(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/search"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    assert {"/indexes", "/healthz", "/metrics", "/images/{image_id}"} <= set(spec["paths"])
    schema = body["application/json"]["schema"]
    assert {"text", "image_b64", "k", "index", "target"} <= set(schema["properties"])
    assert schema["properties"]["k"]["maximum"] == 100 and schema["additionalProperties"] is False
    assert {"422", "413", "415"} <= set(spec["paths"]["/search"]["post"]["responses"])


def test_docs_page_and_its_assets_come_from_the_service_not_a_cdn(client: TestClient) -> None:
    """Offline and edge machines cannot reach a CDN: every script and stylesheet /docs loads is
    served by the app itself, and the files are the real Swagger UI."""
    page = client.get("/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert any(url.endswith(".js") for url in assets) and any(url.endswith(".css") for url in assets)
    for url in assets:
        assert url.startswith("/docs-assets/"), url
        response = client.get(url)
        assert response.status_code == 200 and len(response.content) > 500, url
    assert "SwaggerUIBundle" in client.get("/docs-assets/swagger-ui-bundle.js").text
    assert "/openapi.json" in page.text


# ----------------------------------------------------------------------------- bad input


BAD_JSON = [
    ({}, 422, "exactly one", "neither"),
    ({"text": "a red circle", "image_b64": b64(png_bytes())}, 422, "exactly one", "both"),
    ({"text": ""}, 422, "text", "at least 1"),
    ({"text": " \n\t "}, 422, "empty"),
    ({"text": "x" * 1001}, 422, "text", "at most 1000"),
    ({"text": "a", "k": 0}, 422, "k:", "greater than or equal to 1"),
    ({"text": "a", "k": 101}, 422, "k:", "less than or equal to 100"),
    ({"text": "a", "k": "ten"}, 422, "k:"),
    ({"text": "a", "k": 2.5}, 422, "k:"),
    ({"text": "a", "index": "nope"}, 422, "unknown index", "shapes"),
    ({"text": "a", "target": "audio"}, 422, "target"),
    ({"text": "a", "query": "typo"}, 422, "query", "extra"),
    ({"text": 42}, 422, "text"),
    ({"image_b64": "not base64!"}, 400, "base64"),
    ({"image_b64": "data:image/png,abc"}, 400, "base64"),
    ({"image_b64": ""}, 422, "image_b64"),
    ({"image_b64": b64(b"hello, this is text")}, 415, "not an image"),
    ({"image_b64": b64(png_bytes()[:60])}, 415, "cannot be decoded"),
    ({"image_b64": b64(forged_png(8000, 6000))}, 413, "48.0 megapixels", "limit is 40"),
    ({"image_b64": b64(forged_png(40000, 40000))}, 413, "megapixels"),
]


@pytest.mark.parametrize(("body", "status", "needles"), [(b, s, n) for b, s, *n in BAD_JSON])
def test_bad_json_bodies_are_4xx_with_a_reason(client: TestClient, body: dict, status: int, needles: list) -> None:
    assert_error(client.post("/search", json=body), status, *needles)


@pytest.mark.parametrize(
    ("content", "content_type", "status", "needle"),
    [
        (b"{not json", "application/json", 422, "invalid json"),
        (b'["text"]', "application/json", 422, "object"),
        (b'{"text": "\\ud800"}', "application/json", 422, "json"),
        (b"\xff\xfe\x00", "application/json", 422, "json"),
        (b"text=a", "text/plain", 415, "application/json or multipart"),
        (b"", "application/json", 422, "json"),
    ],
)
def test_bad_raw_bodies(client: TestClient, content: bytes, content_type: str, status: int, needle: str) -> None:
    assert_error(client.post("/search", content=content, headers={"content-type": content_type}), status, needle)


def test_bad_multipart_forms(client: TestClient) -> None:
    image = ("q.png", png_bytes(), "image/png")
    assert_error(client.post("/search", files={"image": ("n.txt", b"plain text", "text/plain")}), 415, "not an image")
    assert_error(client.post("/search", files={"image": ("e.png", b"", "image/png")}), 422, "empty")
    assert_error(client.post("/search", files={"image": image}, data={"text": "a red circle"}), 422, "both")
    assert_error(client.post("/search", files={"image": image}, data={"k": "0"}), 422, "k:")
    assert_error(client.post("/search", files={"image": image}, data={"index": "nope"}), 422, "unknown index")
    assert_error(client.post("/search", files={"photo": image}), 422, "'image'")
    assert_error(client.post("/search", files={"image": image}, data={"colour": "red"}), 422, "colour", "extra")
    assert_error(client.post("/search", files=[("k", (None, "3"))]), 422, "neither")
    big = forged_png(9000, 9000)
    assert_error(client.post("/search", files={"image": ("b.png", big, "image/png")}), 413, "megapixels")
    broken = b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\nabc'
    response = client.post("/search", content=broken, headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert 400 <= response.status_code < 500 and isinstance(response.json()["detail"], str)


def test_images_over_10_mb_are_refused(client: TestClient) -> None:
    big = png_bytes() + b"\x00" * (MAX_IMAGE_BYTES + 1 - len(png_bytes()))
    assert_error(client.post("/search", json={"image_b64": b64(big)}), 413, "limit is 10485760 bytes")
    assert_error(client.post("/search", files={"image": ("b.png", big, "image/png")}), 413, "10 MB")


def test_oversized_bodies_are_refused_before_reading(client: TestClient) -> None:
    response = client.post(
        "/search",
        content=b"{}",
        headers={"content-type": "application/json", "content-length": str(MAX_BODY_BYTES + 1)},
    )
    assert_error(response, 413, "request body", "limit")

    def chunks():  # no Content-Length: the cap applies while reading
        for _ in range(16):
            yield b" " * (1024 * 1024)

    assert_error(client.post("/search", content=chunks(), headers={"content-type": "application/json"}), 413, "over")
    assert_error(client.post("/search", content=b"{}", headers={"content-length": "ten"}), 400, "content-length")


@pytest.mark.parametrize(
    ("path", "status", "needle"),
    [
        ("/images/no-such-id", 404, "unknown image id"),
        ("/images/0?index=nope", 404, "unknown index"),
        ("/images/..%2F..%2Fetc%2Fpasswd", 400, "looks like a path"),
        ("/images/%2Fetc%2Fpasswd", 400, "looks like a path"),
        ("/images/..%5C..%5Cmanifest.json", 400, "looks like a path"),
        ("/images/C:%5Cwindows", 400, "looks like a path"),
        ("/images/thumbs%2F..%2F..%2Fmanifest.json", 400, "looks like a path"),
        ("/images/a%00b", 400, "control characters"),
        ("/images/" + "x" * 600, 400, "1 to 512"),
        ("/images/%2E%2E", 400, "looks like a path"),
    ],
)
def test_image_ids_are_looked_up_never_joined(client: TestClient, path: str, status: int, needle: str) -> None:
    assert_error(client.get(path), status, needle)


def rerecord_metadata(index: Path) -> None:
    """After a test edits metadata.parquet on purpose: record its new sha256 in the manifest, so
    the index opens (an unrecorded edit is refused, see test_service_hardening.py)."""
    from clipdistill.serve.checksums import file_sha256

    manifest = json.loads((index / "manifest.json").read_text())
    manifest["data"]["metadata_sha256"] = file_sha256(index / "metadata.parquet")
    (index / "manifest.json").write_text(json.dumps(manifest))


def test_thumbnails_outside_the_store_are_never_served(tmp_path: Path, index_dir: Path) -> None:
    """A row without a thumbnail is a 404 and has no image_url. Entries that point outside
    INDEX_DIR/thumbs now stop the index at open (test_service_hardening.py), so they never
    reach /images at all."""
    import shutil

    copy = tmp_path / "index"
    shutil.copytree(index_dir, copy)
    metadata = pd.read_parquet(copy / "metadata.parquet")
    metadata.loc[2, "thumbnail"] = None
    metadata.to_parquet(copy / "metadata.parquet", index=False)
    rerecord_metadata(copy)
    client = TestClient(create_app({"t": copy}, warmup=False))
    image_id = str(metadata["id"].iat[2])
    assert_error(client.get(f"/images/{image_id}"), 404, "no thumbnail")
    hits = client.post("/search", json={"text": "a red circle", "k": 12}).json()["hits"]
    urls = {h["id"]: h["image_url"] for h in hits}
    assert urls[str(metadata["id"].iat[2])] is None and urls[str(metadata["id"].iat[5])] is not None


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
FIELD_VALUES = {
    "text": st.none() | st.text(max_size=40) | st.text(min_size=990, max_size=1010) | JSON_VALUES,
    "image_b64": st.none() | st.text(max_size=40) | st.binary(max_size=80).map(b64) | st.just(b64(png_bytes())),
    "k": st.integers(min_value=-5, max_value=120) | JSON_VALUES,
    "index": st.sampled_from([None, "shapes", "copy", "nope", "../x", ""]) | JSON_VALUES,
    "target": st.sampled_from(["image", "text", "IMAGE", ""]) | JSON_VALUES,
}
BODIES = st.fixed_dictionaries({}, optional=FIELD_VALUES) | st.dictionaries(st.text(max_size=8), JSON_VALUES)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=BODIES | JSON_VALUES)
def test_fuzzed_json_bodies_never_yield_5xx(client: TestClient, body: object) -> None:
    response = client.post("/search", json=body)
    assert response.status_code < 500, (body, response.text[:300])
    if response.status_code >= 400:
        assert isinstance(response.json()["detail"], str)
    else:
        assert len(response.json()["hits"]) >= 1


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=200), content_type=st.sampled_from(["application/json", "multipart/form-data"]))
def test_fuzzed_raw_bodies_never_yield_5xx(client: TestClient, content: bytes, content_type: str) -> None:
    response = client.post("/search", content=content, headers={"content-type": content_type})
    assert 400 <= response.status_code < 500, response.text[:300]


# ----------------------------------------------------------------------------- concurrency, CLI, no torch


def test_concurrent_requests_match_sequential_ones(client: TestClient) -> None:
    queries = [{"text": f"a {c} {s}", "k": 5} for c in ("red", "green", "blue") for s in ("circle", "square")]
    queries += [{"image_b64": b64(png_bytes(c)), "k": 5} for c in ("red", "blue")]
    expected = [client.post("/search", json=q).json()["hits"] for q in queries]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda q: client.post("/search", json=q), queries * 4))
    for i, response in enumerate(results):
        assert response.status_code == 200
        assert response.json()["hits"] == expected[i % len(queries)]


def test_lone_surrogates_are_refused_by_the_model() -> None:
    from pydantic import ValidationError

    from clipdistill.serve.app import SearchParams

    with pytest.raises(ValidationError, match="unicode"):  # pydantic refuses lone surrogates itself
        SearchParams(text="a \ud800 b")


def test_parse_index_option() -> None:
    assert parse_index_option("emoji=runs/index") == ("emoji", Path("runs/index"))
    for bad in ("emoji", "=dir", "name=", "bad name=dir", "../x=dir"):
        with pytest.raises(ValueError, match=r"NAME=DIR|index name"):
            parse_index_option(bad)


def test_serve_command_refuses_bad_indexes(tmp_path: Path, index_dir: Path) -> None:
    from clipdistill.cli.main import app

    runner = CliRunner()
    result = runner.invoke(app, ["serve", str(tmp_path)])
    assert result.exit_code == 2 and "manifest.json is missing" in result.output
    result = runner.invoke(app, ["serve", str(index_dir), "--index", "oops"])
    assert result.exit_code == 2 and "NAME=DIR" in result.output
    result = runner.invoke(app, ["serve", str(index_dir), "--name", "a", "--index", f"a={index_dir}"])
    assert result.exit_code == 2 and "given twice" in result.output


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


BLOCK_TORCH = """
import sys

class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
        return None

sys.meta_path.insert(0, BlockTorch())
"""


def test_serve_command_runs_uvicorn_without_torch(index_dir: Path) -> None:
    """``clipdistill serve`` in a subprocess where torch cannot be imported: it binds 127.0.0.1,
    answers /healthz and a search, and stops on SIGTERM."""
    port = free_port()
    script = BLOCK_TORCH + textwrap.dedent(
        f"""
        from clipdistill.cli.main import app
        app(["serve", {str(index_dir)!r}, "--name", "shapes", "--index", "two={index_dir}",
             "--port", "{port}", "--no-access-log"])
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                    health = json.loads(response.read())
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(process.communicate(timeout=5)[0].decode()[-3000:]) from None
                time.sleep(0.2)
        assert health == {"status": "ok", "indexes": {"shapes": 12, "two": 12}}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/search",
            data=json.dumps({"text": "a red circle", "k": 3, "index": "two"}).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert len(json.loads(response.read())["hits"]) == 3
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0].decode()
    assert "serving shapes (12 items), two (12 items) on http://127.0.0.1" in output, output[-2000:]
