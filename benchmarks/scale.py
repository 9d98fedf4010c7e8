"""Scale-out cost model: throughput of cache building, training and embedding at 1 and 2
processes (``torchrun --standalone --nproc_per_node N``) on this machine.

Each task runs as its own torchrun job, so a figure includes what a real run pays: process
group setup, per-process model loading, gathers and the merge. Reported per task and N:

- ``cache``: teacher cache rows (image × augmentation + caption) per second, wall clock of the
  sharded build including the verified merge;
- ``train``: student samples per second from the trainer's own step clock (``train_seconds``:
  steps only, no evaluation), distilling with ``openclip`` from that cache;
- ``embed``: images (+ their first caption) per second, wall clock of the sharded embed + merge.

Models are the demo's architectures with random weights (speed does not depend on the
weights): teacher = LiT (timm resnet10t at 64 px + MiniLM-L6), student = the ``tiny`` preset.
The data is synthetic (random PNGs with captions) so the script runs on a fresh clone.

    PYTHONPATH=src .venv/bin/python benchmarks/scale.py --images 512 --out benchmarks/results/scale.json
    PYTHONPATH=src .venv/bin/python benchmarks/scale.py --threads 1 --out benchmarks/results/scale_1thread.json
    PYTHONPATH=src .venv/bin/python benchmarks/scale.py --project benchmarks/results/scale_1thread.json

``--threads`` sets the OpenMP threads of every process (default: the cores split between the
processes). On a box whose cores other jobs also use, 2 intra-op threads in one process
collapse (threads spin-waiting for a busy core: training steps of 1.8-17 s instead of ~1.1 s
with one thread, measured here), so compare processes at ``--threads 1``. Projections
(``--project``) scale the 1-process rate by the process count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _record import run_header

SRC = Path(__file__).resolve().parents[1] / "src"


def write_dataset(root: Path, n_images: int, seed: int = 0) -> Path:
    """``n_images`` random 64 px PNGs, 2 captions each, Karpathy format, 90 % train."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, sentid = [], 0
    words = ["red", "green", "blue", "small", "large", "round", "square", "bright", "dark", "striped"]
    for index in range(n_images):
        pixels = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{index:06d}.png")
        a, b = rng.choice(words, 2, replace=False)
        images.append(
            {
                "imgid": index,
                "filename": f"{index:06d}.png",
                "filepath": "images",
                "split": "train" if index % 10 else "val",
                "sentences": [
                    {"raw": f"a {a} {b} thing", "sentid": sentid},
                    {"raw": f"{b} and {a}", "sentid": sentid + 1},
                ],
            }
        )
        sentid += 2
    (root / "dataset.json").write_text(json.dumps({"dataset": "synthetic", "images": images}))
    return root


def write_teacher(folder: Path) -> str:
    import torch

    from clipdistill.models.lit import LiTConfig, LiTModel

    torch.manual_seed(0)
    LiTModel(LiTConfig()).save(folder)
    return f"run:{folder}"


# --- what one torchrun process does ---------------------------------------------------------------
def worker(task: str, work: Path, nproc: int, batch_size: int, epochs: int) -> None:
    from clipdistill.data.loading import load_dataset
    from clipdistill.io import atomic_write_json
    from clipdistill.train.distributed import context_from_env

    teacher = f"run:{work / 'teacher'}"
    data = work / "data"
    ctx = context_from_env()
    result: dict[str, Any] = {}
    if task == "cache":
        from clipdistill.sharded import build_cache_sharded

        dataset = load_dataset(data)
        started = time.perf_counter()
        out = build_cache_sharded(
            teacher, dataset, work / f"cache{nproc}", k_augmentations=2, shard_size=64, batch_size=64, progress=False
        )
        seconds = time.perf_counter() - started
        counts = json.loads((out / "manifest.json").read_text())["counts"]
        rows = counts["image_rows"] + counts["text_rows"]
        result = {"rows": rows, "seconds": seconds, "per_second": rows / seconds}
    elif task == "embed":
        from clipdistill.sharded import embed_sharded

        started = time.perf_counter()
        manifest = embed_sharded(
            teacher, data, work / f"emb{nproc}", split="all", shard_size=64, batch_size=64, progress=False
        )
        seconds = time.perf_counter() - started
        result = {"images": manifest["count"], "seconds": seconds, "per_second": manifest["count"] / seconds}
    elif task == "train":
        from clipdistill.config import TrainConfig, from_dict
        from clipdistill.train.trainer import train

        config = from_dict(
            TrainConfig,
            {
                "name": f"train{nproc}",
                "out_dir": str(work / "runs"),
                "method": "openclip",
                "data": {"path": str(data), "image_size": 64},
                "teacher": {"spec": teacher, "cache": str(work / "cache1")},
                "augment": {"k": 2},
                "optim": {"epochs": epochs, "batch_size": batch_size, "warmup_steps": 1},
                "log_every": 1000,
            },
        )
        summary = train(config, progress=False)
        samples = summary["steps"] * batch_size
        result = {"samples": samples, "seconds": summary["train_seconds"]}
        result["per_second"] = samples / summary["train_seconds"]
    if ctx.is_main:
        atomic_write_json(work / f"{task}{nproc}.json", result)


def launch(task: str, work: Path, nproc: int, batch_size: int, epochs: int, threads: int = 0) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    # intra-op threads per process: given, or the cores split between the processes
    env["OMP_NUM_THREADS"] = str(threads or max(1, (os.cpu_count() or 1) // nproc))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command += [__file__, "--worker", task, "--work", str(work), "--processes", str(nproc)]
    command += ["--batch-size", str(batch_size), "--epochs", str(epochs)]
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    if completed.returncode != 0:
        raise SystemExit(f"{task} with {nproc} process(es) failed:\n{completed.stderr[-3000:]}")
    result = json.loads((work / f"{task}{nproc}.json").read_text())
    return {**result, "command_wall_s": time.perf_counter() - started}


# --- projections from the measured figures ------------------------------------------------------
# (name, training images, training captions, images to index): Karpathy splits for Flickr30K
# and COCO (restval in train), one caption per image for a LAION-style 100M-pair set.
DATASETS = (
    ("Flickr30K", 29_000, 145_000, 31_783),
    ("COCO", 113_287, 566_747, 123_287),
    ("100M pairs", 100_000_000, 100_000_000, 100_000_000),
)


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def _size(num_bytes: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if num_bytes >= size:
            return f"{num_bytes / size:.1f} {unit}"
    return f"{num_bytes / 1e3:.0f} kB"


def project(
    measured: dict[str, Any],
    k: int = 2,
    epochs: int = 10,
    teacher_dim: int = 384,
    student_dim: int = 256,
    processes: tuple[int, ...] = (1, 8, 64),
) -> list[str]:
    """Markdown tables: time at the measured 1-process rate × processes (assumes a free core per
    process and communication that is small next to compute: see docs/scale.md), cache disk
    (fp32 rows + ~40 B of keys per row), index RAM."""
    rate = {task: measured["results"][f"{task}@1"]["per_second"] for task in ("cache", "train", "embed")}
    lines = [
        f"| data set | processes | cache build (k={k}) | training ({epochs} epochs) | embedding | cache disk |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, images, captions, index_images in DATASETS:
        rows = images * k + captions
        for count in processes:
            lines.append(
                f"| {name} | {count} | {_duration(rows / (rate['cache'] * count))} | "
                f"{_duration(images * epochs / (rate['train'] * count))} | "
                f"{_duration(index_images / (rate['embed'] * count))} | {_size(rows * (teacher_dim * 4 + 40))} |"
            )
    lines += [
        "",
        f"| data set | vectors (d={student_dim}) | Flat | HNSW32 | IVF-PQ (PQ32) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, _, _, n in DATASETS:
        nlist = min(65536, 2 ** round(math.log2(4 * math.sqrt(n))))  # FAISS guidance: ~4·sqrt(N) lists
        flat = n * student_dim * 4
        hnsw = n * (student_dim * 4 + 2 * 32 * 4 + 8)  # vectors + level-0 links (2M ids) + upper levels (~1/M)
        ivfpq = n * (32 + 8) + nlist * student_dim * 4  # codes + ids per vector, coarse centroids
        lines.append(f"| {name} | {n:,} | {_size(flat)} | {_size(hnsw)} | {_size(ivfpq)} (IVF{nlist},PQ32) |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64, help="global training batch")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scale.json"))
    parser.add_argument("--tasks", type=lambda v: v.split(","), default=["cache", "train", "embed"])
    parser.add_argument("--procs", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2])
    parser.add_argument("--threads", type=int, default=0, help="OMP threads per process (0: the cores / N)")
    parser.add_argument("--project", type=Path, help="print the projection tables from a results JSON and exit")
    parser.add_argument("--worker", choices=("cache", "train", "embed"), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.work, args.processes, args.batch_size, args.epochs)
        return
    if args.project:
        print("\n".join(project(json.loads(args.project.read_text()))))
        return

    from clipdistill.io import atomic_write_json

    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        work = Path(tmp)
        write_dataset(work / "data", args.images)
        write_teacher(work / "teacher")
        results: dict[str, dict[str, Any]] = {}
        if "train" in args.tasks and "cache" not in args.tasks:
            launch("cache", work, 1, args.batch_size, args.epochs, args.threads)  # train reads cache1 (not reported)
        for task in args.tasks:
            for nproc in args.procs:
                results[f"{task}@{nproc}"] = launch(task, work, nproc, args.batch_size, args.epochs, args.threads)
                entry = results[f"{task}@{nproc}"]
                print(
                    f"{task:6s} {nproc} proc: {entry['per_second']:9.1f}/s  ({entry['seconds']:.1f} s measured, "
                    f"{entry['command_wall_s']:.1f} s command)",
                    flush=True,
                )
    table = ["| task | unit | 1 process | 2 processes | speed-up |", "|---|---|---:|---:|---:|"]
    units = {"cache": "teacher rows/s", "train": "samples/s", "embed": "images/s"}
    for task in args.tasks:
        if f"{task}@1" in results and f"{task}@2" in results:
            one, two = results[f"{task}@1"]["per_second"], results[f"{task}@2"]["per_second"]
            table.append(f"| {task} | {units[task]} | {one:.1f} | {two:.1f} | {two / one:.2f}x |")
    print("\n".join(table))
    measured = {"results": results}
    complete = all(f"{task}@2" in results for task in units)
    if complete:
        print("\n".join(project(measured)))
    atomic_write_json(
        args.out,
        {
            **run_header("scale"),
            "settings": {
                "images": args.images,
                "batch_size": args.batch_size,
                "epochs": args.epochs,
                "k": 2,
                "tasks": args.tasks,
                "processes": args.procs,
                "threads_per_process": args.threads or "cores / processes",
            },
            "results": results,
            "table": table,
            "projection": project(measured) if complete else None,
        },
    )


if __name__ == "__main__":
    main()
