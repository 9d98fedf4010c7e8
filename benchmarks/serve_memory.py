"""Peak memory of ``clipdistill serve`` under 8 concurrent 36-megapixel PNG queries.

A 6,000 x 6,000 PNG of flat shapes is about 100-150 kB on the wire and decodes to 144 MB
(Pillow keeps RGB at 4 bytes a pixel), 288 MB with its RGB copy. Before the decode budget, 8
concurrent uploads of one raised the server's resident memory by 5.4 GB (issue 20). This
script starts the real server (uvicorn, a subprocess, 127.0.0.1) over a small index, sends
the 8 uploads at once (multipart, as the web page does), and reports the increase of the
server's peak resident set over its idle level, from the kernel's own high-water mark
(``VmHWM``, reset through ``/proc/PID/clear_refs`` where allowed) and from sampling ``VmRSS``
every 5 ms. Target: at most 1 GiB, with a 4xx or an answer for every query.

Each configuration runs in a fresh server: the defaults (slots = cores, 512 MiB budget) and
``--slots 8`` (eight searches at once: the budget, not the slot count, must bound the pixels).

    nice -n 10 .venv/bin/python benchmarks/serve_memory.py [--work DIR] [--queries 8]
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from _record import run_header
from _server import wait_until_healthy
from clipdistill.io import atomic_write_json
from load import build_index, free_port

GIB = 1024**3
RESULTS = Path(__file__).parent / "results" / "serve_memory.json"


def big_png(side: int = 6000) -> bytes:
    """A side x side RGB PNG of a few flat shapes (small on the wire, huge decoded)."""
    image = Image.new("RGB", (side, side), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    draw.ellipse((side // 8, side // 8, side // 2, side // 2), fill=(220, 30, 30))
    draw.rectangle((side // 2, side // 2, side - side // 8, side - side // 8), fill=(40, 70, 220))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs "5"); False where not permitted."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def start(index: Path, port: int, extra: list[str]) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-c", "from clipdistill.cli.main import main; main()", "serve", str(index)]
    command += ["--name", "mem", "--port", str(port), "--no-access-log", "--no-caption-search", *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return wait_until_healthy(process, port, timeout_s=180)


def upload(port: int, data: bytes) -> tuple[int, float, str]:
    boundary = uuid.uuid4().hex
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
    head += "Content-Type: image/png\r\n\r\n"
    tail = f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n5\r\n--{boundary}--\r\n'
    body = head.encode() + data + tail.encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/search",
        data=body,
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            response.read()
            return response.status, time.perf_counter() - started, ""
    except urllib.error.HTTPError as error:
        return error.code, time.perf_counter() - started, json.loads(error.read()).get("detail", "")[:120]


def measure(index: Path, data: bytes, queries: int, label: str, extra: list[str]) -> dict[str, Any]:
    port = free_port()
    process = start(index, port, extra)
    try:
        upload(port, big_png(64))  # one small image query: onnxruntime's lazy set-up is not the decode's
        time.sleep(1.0)
        idle_kib = proc_kib(process.pid, "VmRSS")
        hwm_reset = reset_peak(process.pid)
        idle_hwm_kib = proc_kib(process.pid, "VmHWM")
        sampled = [idle_kib]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                sampled.append(proc_kib(process.pid, "VmRSS"))
                time.sleep(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        with ThreadPoolExecutor(queries) as pool:
            outcomes = list(pool.map(lambda _: upload(port, data), range(queries)))
        wall = time.perf_counter() - started
        stop.set()
        sampler.join()
        peak_hwm_kib = proc_kib(process.pid, "VmHWM")
    finally:
        process.terminate()
        process.communicate(timeout=60)
    hwm_increase = (peak_hwm_kib - idle_kib) * 1024 if hwm_reset else None
    sampled_increase = (max(sampled) - idle_kib) * 1024
    increase = max(hwm_increase or 0, sampled_increase)
    statuses = [status for status, _, _ in outcomes]
    return {
        "config": label,
        "server_args": extra,
        "queries": queries,
        "statuses": statuses,
        "details": sorted({detail for _, _, detail in outcomes if detail}),
        "latency_s": [round(seconds, 3) for _, seconds, _ in outcomes],
        "wall_s": round(wall, 3),
        "idle_rss_bytes": idle_kib * 1024,
        "idle_hwm_bytes": idle_hwm_kib * 1024,
        "hwm_reset": hwm_reset,
        "peak_increase_hwm_bytes": hwm_increase,
        "peak_increase_sampled_bytes": sampled_increase,
        "peak_increase_bytes": increase,
        "within_1_gib": increase <= GIB,
        "every_query_answered_or_4xx": all(status == 200 or 400 <= status < 500 for status in statuses),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/clipdistill-serve-memory"))
    parser.add_argument("--index", type=Path, help="An index folder to serve (default: build a 200-item one).")
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--side", type=int, default=6000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    index = args.index or build_index(args.work, 200, None)
    data = big_png(args.side)
    print(f"query: {args.side}x{args.side} PNG, {len(data) / 1e3:.0f} kB; {args.queries} at once", flush=True)
    configs = [("defaults", []), ("--slots 8", ["--slots", "8"])]
    rows = [measure(index, data, args.queries, label, extra) for label, extra in configs]
    print(f"\n{'config':<12} {'statuses':<34} {'idle RSS':>10} {'peak +':>10} {'wall':>7}  <= 1 GiB")
    for row in rows:
        print(
            f"{row['config']:<12} {','.join(map(str, row['statuses'])):<34} "
            f"{row['idle_rss_bytes'] / 2**20:>8.0f}MB {row['peak_increase_bytes'] / 2**20:>8.0f}MB "
            f"{row['wall_s']:>6.1f}s  {'yes' if row['within_1_gib'] else 'NO'}"
        )
    record = {
        **run_header("serve_memory"),
        "image": {"side": args.side, "format": "PNG", "bytes": len(data)},
        "target": "peak RSS increase <= 1 GiB, a 4xx or an answer for every query",
        "rows": rows,
    }
    atomic_write_json(args.out, record)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
