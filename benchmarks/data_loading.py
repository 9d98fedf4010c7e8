"""Preloaded vs per-batch image decoding in training: samples/s and peak memory.

``data.preload: true`` decodes the whole training split into one uint8 tensor before the
first step; ``data.preload: false`` decodes each step's rows when the step needs them, in
``data.workers`` DataLoader processes (``src/clipdistill/data/pixels.py``). This measures what
each costs on this machine, training the ``tiny`` student with ``clip`` for a few epochs on
synthetic JPEG photos-sized data (random smooth images, so the JPEGs are photo-like in size):

- ``samples_per_s``: the trainer's own step clock (``train_seconds``; it includes waiting for
  decoded images, and excludes evaluation);
- ``start_s``: from process start to the first step (includes the preload's decode);
- ``peak_rss_mb``: the training process's peak resident memory. Decoding workers are not in
  it: they are forked from the trainer, so their own peak RSS counts the trainer's pages they
  share copy-on-write, and would mislead.

Each mode runs in its own Python process, one after the other (never concurrently: on a
small box two jobs at once measure the contention, not the mode).

    PYTHONPATH=src .venv/bin/python benchmarks/data_loading.py --out benchmarks/results/data_loading.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _record import run_header

SRC = Path(__file__).resolve().parents[1] / "src"
MODES = {"preload": (True, 0), "decode, 0 workers": (False, 0), "decode, 1 worker": (False, 1)}


def _slug(mode: str) -> str:
    """A mode's run name and result file stem: "decode, 1 worker" -> "decode-1worker"."""
    return mode.replace(", ", "-").replace(" ", "")


def write_dataset(root: Path, n_images: int, side: int, seed: int = 0) -> Path:
    """``n_images`` JPEGs of ``side`` px (upsampled noise: smooth like a photo), 1 caption each."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(n_images):
        coarse = rng.integers(0, 256, size=(side // 16, side // 16, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((side, side), Image.Resampling.BICUBIC)
        image.save(root / "images" / f"{index:06d}.jpg", quality=90)
        records.append(
            {
                "imgid": index,
                "filename": f"{index:06d}.jpg",
                "filepath": "images",
                "split": "train" if index % 10 else "val",
                "sentences": [{"raw": f"picture number {index}", "sentid": index}],
            }
        )
    (root / "dataset.json").write_text(json.dumps({"dataset": "synthetic-jpeg", "images": records}))
    return root


def worker(work: Path, mode: str, image_size: int, batch_size: int, epochs: int) -> None:
    """One training run in this process; writes its figures to ``work/MODE.json``."""
    import resource

    from clipdistill.config import TrainConfig, from_dict
    from clipdistill.io import atomic_write_json, read_jsonl
    from clipdistill.train.trainer import Trainer

    started = time.perf_counter()
    preload, workers = MODES[mode]
    slug = _slug(mode)
    config = from_dict(
        TrainConfig,
        {
            "name": slug,
            "out_dir": str(work / "runs"),
            "method": "clip",
            "data": {"path": str(work / "data"), "image_size": image_size, "preload": preload, "workers": workers},
            "optim": {"epochs": epochs, "batch_size": batch_size, "warmup_steps": 1},
            "log_every": 1,
        },
    )
    trainer = Trainer(config, progress=False)
    ready = time.perf_counter()
    summary = trainer.fit()
    first_step = read_jsonl(config.run_dir / "log.jsonl")[0]["seconds"]
    samples = summary["steps"] * trainer.batch_size
    atomic_write_json(
        work / f"{slug}.json",
        {
            "mode": mode,
            "samples": samples,
            "train_seconds": summary["train_seconds"],
            "samples_per_s": samples / summary["train_seconds"],
            "start_s": ready - started,
            "first_step_s": first_step,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--side", type=int, default=256, help="stored JPEG side in pixels")
    parser.add_argument("--image-size", type=int, default=224, help="data.image_size (decode size)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads of the training process")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/data_loading.json"))
    parser.add_argument("--worker", choices=tuple(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.work, args.worker, args.image_size, args.batch_size, args.epochs)
        return

    from clipdistill.io import atomic_write_json

    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env["OMP_NUM_THREADS"] = str(args.threads)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="data-loading-") as tmp:
        work = Path(tmp)
        write_dataset(work / "data", args.images, args.side)
        for mode in MODES:
            command = [sys.executable, __file__, "--worker", mode, "--work", str(work)]
            command += ["--image-size", str(args.image_size), "--batch-size", str(args.batch_size)]
            command += ["--epochs", str(args.epochs)]
            completed = subprocess.run(command, capture_output=True, text=True, env=env)
            if completed.returncode != 0:
                raise SystemExit(f"mode {mode!r} failed:\n{completed.stderr[-3000:]}")
            slug = _slug(mode)
            results[mode] = json.loads((work / f"{slug}.json").read_text())
            entry = results[mode]
            print(
                f"{mode:18s} {entry['samples_per_s']:7.1f} samples/s  start {entry['start_s']:6.1f} s  "
                f"peak RSS {entry['peak_rss_mb']:7.0f} MB",
                flush=True,
            )
    base = results["preload"]["samples_per_s"]
    table = [
        "| mode | samples/s | vs preload | start-up (s) | peak RSS of the trainer (MB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode, entry in results.items():
        table.append(
            f"| {mode} | {entry['samples_per_s']:.1f} | {entry['samples_per_s'] / base:.2f}x | "
            f"{entry['start_s']:.1f} | {entry['peak_rss_mb']:.0f} |"
        )
    print("\n".join(table))
    atomic_write_json(
        args.out,
        {
            **run_header("data_loading"),
            "settings": {
                "images": args.images,
                "jpeg_side": args.side,
                "image_size": args.image_size,
                "batch_size": args.batch_size,
                "epochs": args.epochs,
                "omp_threads": args.threads,
                "student": "tiny",
                "method": "clip",
            },
            "results": results,
            "table": table,
        },
    )


if __name__ == "__main__":
    main()
