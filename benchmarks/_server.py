"""Waiting for a `clipdistill serve` process the benchmarks started (shared by load.py and
serve_memory.py); not a benchmark itself."""

from __future__ import annotations

import subprocess
import time
import urllib.request


def wait_until_healthy(process: subprocess.Popen[bytes], port: int, timeout_s: float) -> subprocess.Popen[bytes]:
    """Poll ``/healthz`` until it answers; a server that exits or misses ``timeout_s`` stops the
    benchmark with the end of its output."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise SystemExit("server did not start:\n" + process.communicate()[0].decode()[-3000:]) from None
            time.sleep(0.25)
