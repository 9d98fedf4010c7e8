"""``clipdistill serve --port 0`` prints the port the kernel picked, and that URL answers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from clipdistill.cli.serve_cmd import server_url
from test_service import ensure_service_index


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory, shapes_dataset_dir: Path) -> Path:
    return ensure_service_index(tmp_path_factory.getbasetemp(), shapes_dataset_dir)


def _read_serving_line(process: subprocess.Popen[str], deadline: float) -> str:
    assert process.stderr is not None
    seen = []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith("serving "):
            return line
    raise AssertionError("no 'serving ...' line; stderr so far:\n" + "".join(seen))


def test_port_zero_prints_the_bound_port(index_dir: Path) -> None:
    command = [sys.executable, "-m", "clipdistill.cli.main", "serve", str(index_dir), "--port", "0"]
    env = {**os.environ, "COLUMNS": "80"}  # a narrow terminal must not break the URL
    process = subprocess.Popen(
        [*command, "--no-caption-search", "--no-access-log"], stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        line = _read_serving_line(process, time.monotonic() + 120)
        match = re.search(r"on http://127\.0\.0\.1:(\d+)/ ", line)
        assert match, line
        port = int(match.group(1))
        assert port != 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as response:
            assert response.status == 200
    finally:
        process.send_signal(signal.SIGTERM)  # uvicorn shuts down gracefully on SIGTERM
        try:
            code = process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
    rest = process.stderr.read() if process.stderr else ""
    # uvicorn re-raises the signal after its graceful shutdown, so the shell sees a SIGTERM stop
    assert code in (0, -signal.SIGTERM) and "Finished server process" in rest, (code, rest)


def test_server_url_brackets_ipv6() -> None:
    assert server_url("127.0.0.1", 8000) == "http://127.0.0.1:8000/"
    assert server_url("::1", 8080) == "http://[::1]:8080/"
