"""The service stays answerable and bounded: ``/healthz`` (and the other light routes) answer
while many searches wait, the caption index exists before the first request, ``/metrics``
labels cannot be grown by clients, the BPE cache is bounded, unknown ``Host`` names are refused,
a slow body times out, and ``clipdistill serve`` hands uvicorn its concurrency and timeouts.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from clipdistill.serve.app import allowed_hosts, create_app
from test_service import assert_error, ensure_service_index


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory, shapes_dataset_dir: Path) -> Path:
    return ensure_service_index(tmp_path_factory.getbasetemp(), shapes_dataset_dir)


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """uvicorn on a free 127.0.0.1 port in a thread (as ``clipdistill serve`` runs it)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def timed_get(url: str) -> tuple[float, int]:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=10) as response:
        response.read()
        return time.perf_counter() - started, response.status


@pytest.mark.parametrize("waiting", [32, 64])
def test_healthz_answers_while_searches_wait(index_dir: Path, waiting: int) -> None:
    """``waiting`` searches block on a gate this test holds (2 of them inside the 2 search
    slots, the rest queued); /healthz, /metrics, /indexes and /images still answer, each
    within 100 ms (median of 5). Before searches had their own executor, 40 waiting searches
    held all of Starlette's threads and these sync routes hung until the gate opened."""
    app = create_app({"s": index_dir}, slots=2, warmup=False, caption_search=False)
    searcher = app.state.indexes["s"].searcher
    gate, entered = threading.Event(), threading.Semaphore(0)
    original = searcher.embed_query

    def gated(**kwargs: Any) -> Any:
        entered.release()
        gate.wait(60)
        return original(**kwargs)

    searcher.embed_query = gated  # type: ignore[method-assign]
    with serve(app) as url:
        image_id = str(searcher.metadata["id"].iat[0])
        body = json.dumps({"text": "a red circle", "k": 1}).encode()

        def search(_: int) -> int:
            request = urllib.request.Request(f"{url}/search", data=body, headers={"content-type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status

        with ThreadPoolExecutor(waiting) as pool:
            futures = [pool.submit(search, i) for i in range(waiting)]
            try:
                for _ in range(2):  # both slots taken ...
                    assert entered.acquire(timeout=30)
                time.sleep(0.5)  # ... and the other requests arrived and queued
                assert not any(f.done() for f in futures)
                latencies = {}
                for route in ("/healthz", "/metrics", "/indexes", f"/images/{image_id}"):
                    runs = [timed_get(url + route) for _ in range(5)]
                    assert all(status == 200 for _, status in runs), route
                    latencies[route] = statistics.median(seconds for seconds, _ in runs)
                assert not any(f.done() for f in futures)  # the searches were still waiting throughout
            finally:
                gate.set()
            assert [f.result(timeout=60) for f in futures] == [200] * waiting
    print(
        f"median latency with {waiting} searches waiting: "
        + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in latencies.items())
    )
    assert all(seconds < 0.1 for seconds in latencies.values()), latencies


def test_caption_index_is_built_at_start_up(index_dir: Path) -> None:
    app = create_app({"s": index_dir}, warmup=False)
    served = app.state.indexes["s"]
    assert served.caption_index is not None and served.caption_index.ntotal == served.count
    calls: list[int] = []
    encoders = served.searcher.encoders
    original = encoders.encode_texts

    def counting(texts: Any) -> Any:
        calls.append(len(texts))
        return original(texts)

    encoders.encode_texts = counting  # type: ignore[method-assign]
    response = TestClient(app).post("/search", json={"text": "a red circle", "k": 3, "target": "text"})
    assert response.status_code == 200 and len(response.json()["hits"]) == 3
    assert calls == [1]  # the query only: no caption is embedded inside the request
    off = TestClient(create_app({"s": index_dir}, warmup=False, caption_search=False))
    assert_error(off.post("/search", json={"text": "a", "target": "text"}), 422, "--no-caption-search")
    assert off.post("/search", json={"text": "a"}).status_code == 200


def test_metrics_method_label_is_bounded(index_dir: Path) -> None:
    client = TestClient(create_app({"s": index_dir}, warmup=False, caption_search=False))
    for method in ("FOOBAR", "BREW", "X" * 200):
        client.request(method, "/healthz")
    text = client.get("/metrics").text
    assert "FOOBAR" not in text and "BREW" not in text and "XXXX" not in text
    assert 'clipdistill_http_requests_total{method="other",route="/healthz",status="405"} 3.0' in text


def test_bpe_cache_is_bounded(monkeypatch: pytest.MonkeyPatch, index_dir: Path) -> None:
    from clipdistill.serve import tokenize

    path = index_dir / "encoders" / tokenize.BPE_FILE
    reference = tokenize.ClipBpeTokenizer(path, 77)
    monkeypatch.setattr(tokenize, "BPE_CACHE_SIZE", 16)
    small = tokenize.ClipBpeTokenizer(path, 77)
    words = ["".join(chr(97 + (i // 26**p) % 26) for p in range(3)) for i in range(600)]  # 600 distinct words
    texts = [" ".join(words[i : i + 3]) for i in range(0, 600, 3)]
    assert (small(texts) == reference(texts)).all()
    assert small.bpe.cache_info().currsize == 16 and small.bpe.cache_info().maxsize == 16
    assert reference.bpe.cache_info().maxsize == 65536  # the default


def test_unknown_host_names_are_refused(index_dir: Path) -> None:
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends Host: evil.example."""
    hosts = allowed_hosts("127.0.0.1", ["search.internal"])
    assert hosts == ["127.0.0.1", "localhost", "::1", "search.internal"]
    app = create_app({"s": index_dir}, warmup=False, caption_search=False, allowed_hosts=hosts)
    client = TestClient(app)
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "testserver"):
        assert_error(
            client.get("/healthz", headers={"host": host}), 400, "not one this server answers to", "--allow-host"
        )
    for host in ("127.0.0.1:8000", "localhost", "LOCALHOST:80", "[::1]:8000", "search.internal"):
        assert client.get("/healthz", headers={"host": host}).status_code == 200, host
    any_host = TestClient(create_app({"s": index_dir}, warmup=False, caption_search=False, allowed_hosts=["*"]))
    assert any_host.get("/healthz", headers={"host": "evil.example"}).status_code == 200
    wide = allowed_hosts("0.0.0.0")
    assert "localhost" in wide and "0.0.0.0" not in wide and len(wide) >= 4


def test_a_slow_body_times_out(index_dir: Path) -> None:
    """The body must arrive within body_timeout: a client trickling it gets a 408."""
    app = create_app({"s": index_dir}, warmup=False, caption_search=False, body_timeout=0.3)
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/search",
        "raw_path": b"/search",
        "query_string": b"",
        "headers": [(b"host", b"testserver"), (b"content-type", b"application/json")],
        "http_version": "1.1",
        "scheme": "http",
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 1),
        "root_path": "",
    }
    sent: list[dict[str, Any]] = []

    def trickle(chunks: list[bytes], gap: float) -> Any:
        async def receive() -> dict[str, Any]:
            await anyio.sleep(gap)
            chunk = chunks.pop(0) if chunks else b""
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

        return receive

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    anyio.run(app, scope, trickle([b'{"text": ', b'"a red circle"}'], 0.1), send)  # 0.2 s in all
    assert sent[0]["status"] == 200
    sent.clear()
    anyio.run(app, scope, trickle([b'{"text": ', b'"a red', b' circle"}'], 0.25), send)  # 0.75 s
    assert sent[0]["status"] == 408
    assert b"did not arrive within 0.3 seconds" in b"".join(m.get("body", b"") for m in sent)


def test_serve_command_bounds_uvicorn(monkeypatch: pytest.MonkeyPatch, index_dir: Path) -> None:
    import uvicorn

    from clipdistill.cli.main import app as cli
    from clipdistill.serve.app import budget

    calls: list[Any] = []  # the uvicorn configs the command would serve (on the socket it bound)

    def run(self: Any, sockets: Any = None) -> None:
        calls.append(self.config)
        self.started = True

    monkeypatch.setattr(uvicorn.Server, "run", run)
    heap: list[bool] = []
    original = budget.return_freed_pixels_to_the_os
    monkeypatch.setattr(budget, "return_freed_pixels_to_the_os", lambda: heap.append(original()) or heap[-1])
    args = ["serve", str(index_dir), "--no-caption-search", "--allow-host", "search.internal", "--port", "0"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    (call,) = calls
    assert heap == [True]  # glibc here: freed image blocks go back to the OS (benchmarks/serve_memory.py)
    assert call.limit_concurrency == 64 and call.timeout_keep_alive == 5 and call.host == "127.0.0.1"
    assert "answering to Host: 127.0.0.1, localhost, ::1, search.internal" in result.output
    client = TestClient(call.app)
    assert client.get("/healthz", headers={"host": "search.internal"}).status_code == 200
    assert client.get("/healthz", headers={"host": "evil.example"}).status_code == 400
    result = CliRunner().invoke(cli, [*args, "--limit-concurrency", "8", "--timeout-keep-alive", "2"])
    assert calls[-1].limit_concurrency == 8 and calls[-1].timeout_keep_alive == 2
