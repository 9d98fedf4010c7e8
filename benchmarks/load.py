"""Load test of the search service: ``clipdistill serve`` in a subprocess on 127.0.0.1.

A bounded mix of text queries (3 in 4) and image queries (1 in 4, JSON base64) is sent at
concurrency 1, 4 and 16, 2,000 requests per level (plus 50 warm-up requests, not counted);
each level also stops after ``--max-seconds``. Every client thread keeps one HTTP/1.1
keep-alive connection. Reports QPS, p50/p95/p99 latency (client side, per query kind) and
errors, the server's own mean encode/search time per level (from /metrics), writes JSON and
prints a table. Targets (tiny student, 10k-item index, 2 cores): 0 errors, text p99 < 50 ms
at concurrency 1. The client runs on the same cores as the server, so high-concurrency QPS is
a floor.

The 10k-item index is built once under ``--work`` (reused on a rerun): 10,000 distinct
rendered images (10 colours x 5 shapes x 3 sizes x 9 positions x 4 backgrounds x filled or
outlined, 64 px, each with its caption, e.g. "a large outlined red star at the top left on a
grey background"), embedded by the tiny student (an untrained seeded one unless ``--model``
is given: latency does not depend on the weights) and indexed with HNSW32.

    .venv/bin/python benchmarks/load.py [--index INDEX_DIR] [--requests 2000] [--levels 1 4 16]
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import http.client
import io
import itertools
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from _server import wait_until_healthy
from clipdistill.io import atomic_write_json

COLOURS = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (235, 210, 30),
    "green": (30, 160, 60),
    "teal": (20, 150, 150),
    "blue": (40, 70, 220),
    "purple": (130, 50, 190),
    "pink": (240, 120, 180),
    "brown": (120, 75, 35),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
SIZES = {"small": 0.3, "medium": 0.5, "large": 0.75}
POSITIONS = {
    f"{v} {h}".replace("middle center", "center"): (x, y)
    for v, y in (("top", 0.25), ("middle", 0.5), ("bottom", 0.75))
    for h, x in (("left", 0.25), ("center", 0.5), ("right", 0.75))
}
BACKGROUNDS = {"white": (255, 255, 255), "grey": (200, 200, 200), "cream": (250, 240, 200), "sky": (200, 225, 250)}
STYLES = ("filled", "outlined")
SIDE = 64


def draw(
    colour: str, shape: str, size: str, position: str, background: str, style: str, side: int = SIDE
) -> Image.Image:
    image = Image.new("RGB", (side, side), BACKGROUNDS[background])
    pen = ImageDraw.Draw(image)
    cx, cy = (c * side for c in POSITIONS[position])
    r = SIZES[size] * side / 2
    fill, outline, width = (COLOURS[colour], None, 1) if style == "filled" else (None, COLOURS[colour], 3)
    if shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=outline, width=width)
    elif shape == "square":
        pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=outline, width=width)
    else:
        points = {
            "triangle": [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)],
            "diamond": [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)],
            "star": [
                (cx + (r if i % 2 == 0 else r * 0.45) * _cos(i), cy + (r if i % 2 == 0 else r * 0.45) * _sin(i))
                for i in range(10)
            ],
        }[shape]
        pen.polygon(points, fill=fill, outline=outline, width=width)
    return image


def _cos(i: int) -> float:
    import math

    return math.cos(math.pi / 5 * i - math.pi / 2)


def _sin(i: int) -> float:
    import math

    return math.sin(math.pi / 5 * i - math.pi / 2)


def caption(colour: str, shape: str, size: str, position: str, background: str, style: str) -> str:
    return f"a {size} {style} {colour} {shape} at the {position} on a {background} background"


def write_dataset(root: Path, n: int, seed: int = 0) -> Path:
    """n distinct rendered images in Karpathy format (all in the test split)."""
    combos = list(itertools.product(COLOURS, SHAPES, SIZES, POSITIONS, BACKGROUNDS, STYLES))
    if n > len(combos):
        raise SystemExit(f"--n {n} is more than the {len(combos)} distinct images this renderer makes")
    random.Random(seed).shuffle(combos)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images = []
    for i, combo in enumerate(combos[:n]):
        name = f"{i:05d}.png"
        path = root / "images" / name
        if not path.is_file():
            draw(*combo).save(path)
        sentence = {"raw": caption(*combo), "sentid": i}
        images.append({"imgid": i, "filename": name, "filepath": "images", "split": "test", "sentences": [sentence]})
    path = root / "dataset.json"
    path.write_text(json.dumps({"dataset": f"shapes{n // 1000}k", "images": images}))
    return root


def build_index(work: Path, n: int, model: str | None) -> Path:
    """The 10k-item index under ``work`` (each stage skipped when its output exists)."""
    index = work / "index"
    if (index / "manifest.json").is_file():
        return index
    from clipdistill.export.onnx import export_model
    from clipdistill.serve.embed import embed_dataset
    from clipdistill.serve.index import build_index as build

    started = time.perf_counter()
    data = write_dataset(work / "data", n)
    print(f"rendered {n} images in {time.perf_counter() - started:.0f} s", flush=True)
    if model is None:
        import torch

        from clipdistill.models.students import build_student, save_student

        torch.manual_seed(0)
        save_student(build_student("tiny"), work / "student")
        model = f"local-dir:{work / 'student'}"
    if not (work / "export" / "export.json").is_file():
        export_model(model, work / "export")
    embed_dataset(work / "export", data, work / "emb", split="all", progress=False)
    print(f"embedded in {time.perf_counter() - started:.0f} s", flush=True)
    build(work / "emb", index, factory="HNSW32")
    print(f"index built in {time.perf_counter() - started:.0f} s total", flush=True)
    return index


def query_pool(seed: int, count: int = 400) -> list[tuple[str, bytes]]:
    """(kind, JSON body) pairs: 3 text queries to 1 image query, in a fixed shuffled order."""
    rng = random.Random(seed)
    pool: list[tuple[str, bytes]] = []
    for i in range(count):
        combo = [rng.choice(list(options)) for options in (COLOURS, SHAPES, SIZES, POSITIONS, BACKGROUNDS, STYLES)]
        if i % 4 == 3:
            buffer = io.BytesIO()
            draw(*combo, side=rng.choice((64, 128, 256))).save(buffer, format="PNG")
            body = {"image_b64": base64.b64encode(buffer.getvalue()).decode(), "k": 10}
            pool.append(("image", json.dumps(body).encode()))
        else:
            words = caption(*combo).split(" ")
            text = " ".join(words[: rng.choice((3, 5, len(words)))])  # short and long phrasings
            pool.append(("text", json.dumps({"text": text, "k": 10}).encode()))
    return pool


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(index: Path, port: int, threads: int | None) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-c", "from clipdistill.cli.main import main; main()", "serve", str(index)]
    command += ["--name", "load"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--no-access-log"]
    if threads:
        command += ["--threads", str(threads)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return wait_until_healthy(process, port, timeout_s=120)


def stage_means(port: int) -> dict[tuple[str, str], tuple[float, float]]:
    """{(stage, query kind): (sum seconds, count)} from the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out: dict[tuple[str, str], list[float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "clipdistill_search_stage_seconds":
            continue
        for sample in family.samples:
            key = (sample.labels["stage"], sample.labels["query"])
            if sample.name.endswith("_sum"):
                out.setdefault(key, [0.0, 0.0])[0] += sample.value
            elif sample.name.endswith("_count"):
                out.setdefault(key, [0.0, 0.0])[1] += sample.value
    return {key: (v[0], v[1]) for key, v in out.items()}


def run_level(
    port: int, pool: list[tuple[str, bytes]], concurrency: int, requests: int, max_seconds: float
) -> dict[str, Any]:
    """``requests`` POST /search from ``concurrency`` threads; stops early at ``max_seconds``."""
    counter = itertools.count()
    lock = threading.Lock()
    records: list[tuple[str, float, int]] = []  # (kind, seconds, status; 0 = connection error)
    errors: list[str] = []
    deadline = time.monotonic() + max_seconds

    def worker() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        local: list[tuple[str, float, int]] = []
        while time.monotonic() < deadline:
            with lock:
                i = next(counter)
            if i >= requests:
                break
            kind, body = pool[i % len(pool)]
            started = time.perf_counter()
            try:
                connection.request("POST", "/search", body=body, headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                payload = response.read()
                status = response.status
                if status != 200:
                    errors.append(f"{status}: {payload[:200]!r}")
            except (OSError, http.client.HTTPException) as error:
                status = 0
                errors.append(repr(error))
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            local.append((kind, time.perf_counter() - started, status))
        connection.close()
        with lock:
            records.extend(local)

    before = stage_means(port)
    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    after = stage_means(port)

    def summary(kind: str | None) -> dict[str, Any]:
        rows = [r for r in records if kind is None or r[0] == kind]
        ok = sorted(1e3 * seconds for _, seconds, status in rows if status == 200)
        return {
            "requests": len(rows),
            "errors": sum(1 for r in rows if r[2] != 200),
            "p50_ms": _quantile(ok, 0.50),
            "p95_ms": _quantile(ok, 0.95),
            "p99_ms": _quantile(ok, 0.99),
            "mean_ms": round(statistics.fmean(ok), 2) if ok else None,
        }

    server = {}
    for (stage, kind), (total, count) in after.items():
        prior = before.get((stage, kind), (0.0, 0.0))
        if count > prior[1]:
            server[f"{kind}_{stage}_mean_ms"] = round(1e3 * (total - prior[0]) / (count - prior[1]), 2)
    return {
        "concurrency": concurrency,
        "wall_s": round(wall, 2),
        "qps": round(len(records) / wall, 1),
        "stopped_by_time": len(records) < requests,
        "all": summary(None),
        "text": summary("text"),
        "image": summary("image"),
        "server": dict(sorted(server.items())),
        "error_samples": errors[:5],
    }


def _quantile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return round(sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, default=None, help="serve this index (default: build the 10k one)")
    parser.add_argument("--work", type=Path, default=Path("runs/load"), help="where the 10k index is built")
    parser.add_argument("--n", type=int, default=10_000, help="items in the built index")
    parser.add_argument("--model", default=None, help="student spec to embed with (default: untrained tiny)")
    parser.add_argument("--requests", type=int, default=2000, help="requests per concurrency level")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-seconds", type=float, default=300, help="time cap per level")
    parser.add_argument("--threads", type=int, default=None, help="server onnxruntime threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/load.json"))
    args = parser.parse_args()

    index = args.index or build_index(args.work, args.n, args.model)
    load_before = os.getloadavg()  # the client shares the machine with the server, and so may others
    manifest = json.loads((index / "manifest.json").read_text())
    pool = query_pool(args.seed)
    port = free_port()
    server = start_server(index, port, args.threads)
    levels = []
    try:
        run_level(port, pool, 2, 50, 60)  # warm-up, not reported
        for concurrency in args.levels:
            level = run_level(port, pool, concurrency, args.requests, args.max_seconds)
            levels.append(level)
            print(f"concurrency {concurrency}: {level['qps']} QPS, p99 {level['all']['p99_ms']} ms", flush=True)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()

    errors = sum(level["all"]["errors"] for level in levels)
    first = next((level for level in levels if level["concurrency"] == 1), None)
    text_p99 = first["text"]["p99_ms"] if first else None
    target = errors == 0 and text_p99 is not None and text_p99 < 50
    result = {
        "levels": levels,
        "index": {
            "path": str(index),
            "count": manifest["count"],
            "factory": manifest["factory"],
            "model": manifest["model"]["spec"],
            "dataset": manifest["data"]["dataset"]["name"],
        },
        "mix": "3 text : 1 image (JSON base64 PNG, 64-256 px), k=10, one keep-alive connection per client thread",
        "requests_per_level": args.requests,
        "target": {"errors": errors, "text_p99_ms_at_c1": text_p99, "met": target},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "load_average_1_5_15_before": [round(x, 2) for x in load_before],
        "load_average_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    atomic_write_json(args.out, result)

    print()
    print("| concurrency | queries | requests | errors | QPS | p50 ms | p95 ms | p99 ms | server encode / search ms |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for level in levels:
        for kind in ("all", "text", "image"):
            row = level[kind]
            stages = ""
            if kind != "all":
                s = level["server"]
                stages = f"{s.get(f'{kind}_encode_mean_ms', '-')} / {s.get(f'{kind}_search_mean_ms', '-')}"
            qps = f"{level['qps']}" if kind == "all" else ""
            print(
                f"| {level['concurrency']} | {kind} | {row['requests']} | {row['errors']} | {qps} | "
                f"{row['p50_ms']} | {row['p95_ms']} | {row['p99_ms']} | {stages} |"
            )
    print(f"\ntarget (0 errors, text p99 < 50 ms at concurrency 1): {'met' if target else 'NOT met'}; wrote {args.out}")


if __name__ == "__main__":
    main()
