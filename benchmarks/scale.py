r"""Scale-out cost model: throughput of cache building, training and embedding at 1 and 2
processes (``torchrun --standalone --nproc_per_node N``) on this machine.

Each task runs as its own torchrun job, so a figure includes what a real run pays: process
group setup, per-process model loading, gathers and the merge. Reported per task and N:

- ``cache``: teacher cache rows (image × augmentation + caption) per second, wall clock of the
  sharded build including the verified merge;
- ``train``: student samples per second from the trainer's own step clock (``train_seconds``:
  steps only, no evaluation), distilling with ``openclip`` from that cache;
- ``embed``: images (+ their first caption) per second, wall clock of the sharded embed + merge.

Models are the quick demo's architectures (``clipdistill/presets/quick.yaml``, read at start-up)
with random weights (speed does not depend on the weights; nothing is downloaded): teacher =
``lit:efficientnet-lite0`` (the EfficientNet-Lite0 trunk at its native 224 px + frozen MiniLM-L6,
384-d), data decoded at the demo's cache size (128 px), student = the ``lite0`` preset at 96 px
(Lite0 trunk + a 2 x 256 text tower, 384-d) with its stem and stages 0-4 frozen. ``--teacher
lit:TRUNK[@SIZE]``, ``--decode-size``, ``--student PRESET`` (or an open_clip model-config JSON),
``--student-size`` and ``--student-frozen-stages`` choose others; the JSON records them under
``models``. The data is synthetic (random PNGs at the decode size, 2 captions each) so the
script runs on a fresh clone.

    PYTHONPATH=src .venv/bin/python benchmarks/scale.py --images 2048 --threads 1 \
        --out benchmarks/results/scale_1thread.json
    PYTHONPATH=src .venv/bin/python benchmarks/scale.py --images 2048 --out benchmarks/results/scale.json
    PYTHONPATH=src .venv/bin/python benchmarks/scale.py --project benchmarks/results/scale_1thread.json
    PYTHONPATH=src .venv/bin/python benchmarks/scale.py \
        --markdown benchmarks/results/scale_1thread.json benchmarks/results/scale.json

The retired demo's models: ``--teacher lit:resnet10t@64 --decode-size 64 --student tiny
--student-size 64 --student-frozen-stages 0``.

``--threads`` sets the OpenMP threads of every process (default: the cores split between the
processes). On a box whose cores other jobs also use, 2 intra-op threads in one process
collapse (threads spin-waiting for a busy core: training steps of 1.8-17 s instead of ~1.1 s
with one thread, measured here), so compare processes at ``--threads 1``. Projections
(``--project``) scale the 1-process rate by the process count. ``--markdown`` prints the
generated blocks of docs/scale.md (``scale``, ``scale-projection``) from result JSONs, as
``benchmarks/results_doc.py`` writes them there once the JSONs are in ``benchmarks/results/``.
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


def write_dataset(root: Path, n_images: int, size: int = 64, seed: int = 0) -> Path:
    """``n_images`` random ``size`` px PNGs, 2 captions each, Karpathy format, 80 % train, 10 % val,
    10 % test (all three given: data without a test split gets one carved from train by the
    trainer, which would then no longer match the cache's train split)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, sentid = [], 0
    words = ["red", "green", "blue", "small", "large", "round", "square", "bright", "dark", "striped"]
    for index in range(n_images):
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{index:06d}.png")
        a, b = rng.choice(words, 2, replace=False)
        images.append(
            {
                "imgid": index,
                "filename": f"{index:06d}.png",
                "filepath": "images",
                "split": {0: "val", 1: "test"}.get(index % 10, "train"),
                "sentences": [
                    {"raw": f"a {a} {b} thing", "sentid": sentid},
                    {"raw": f"{b} and {a}", "sentid": sentid + 1},
                ],
            }
        )
        sentid += 2
    (root / "dataset.json").write_text(json.dumps({"dataset": "synthetic", "images": images}))
    return root


# --- the models: the quick demo's unless chosen -----------------------------------------------
def quick_demo_models() -> dict[str, Any]:
    """The teacher, decode size and student of the quick demo preset (``presets/quick.yaml`` over
    ``run_config.py``'s defaults), as this script's option defaults."""
    from clipdistill.run_config import resolve_run_config

    config = resolve_run_config(preset="quick")
    return {
        "teacher": config.teacher.spec,
        "teacher_frozen_stages": config.teacher.frozen_stages,
        "decode_size": config.cache.image_size,
        "student": config.student.preset,
        "student_size": config.student.image_size,
        "student_frozen_stages": config.student.frozen_stages,
    }


def describe_models(args: argparse.Namespace) -> dict[str, Any]:
    """What the JSON header records: the specs as given and the architectures they resolve to."""
    from clipdistill.models.students import student_config
    from clipdistill.train.lit import teacher_train_config

    teacher = teacher_train_config(args.teacher, args.teacher_frozen_stages).model
    student = student_config(args.student, image_size=args.student_size or None)
    text = student["text_cfg"]
    return {
        "weights": "random",
        "teacher": args.teacher,
        "teacher_trunk": teacher.image_model,
        "teacher_image_size": teacher.image_size,
        "teacher_frozen_stages": teacher.frozen_stages,
        "teacher_dim": teacher.embed_dim,
        "decode_size": args.decode_size,
        "student": args.student,
        "student_trunk": student["vision_cfg"].get("timm_model_name", "open_clip vision tower"),
        "student_image_size": student["vision_cfg"]["image_size"],
        "student_text": f"{text['layers']} x {text['width']}",
        "student_frozen_stages": args.student_frozen_stages,
        "student_dim": student["embed_dim"],
    }


def write_teacher(folder: Path, spec: str, frozen_stages: int | None) -> str:
    """The ``lit:TRUNK[@SIZE]`` architecture with random weights, saved as a trained teacher would
    be (no pretrained trunk weights are read)."""
    import torch

    from clipdistill.models.lit import LiTModel
    from clipdistill.train.lit import teacher_train_config

    torch.manual_seed(0)
    LiTModel(teacher_train_config(spec, frozen_stages).model, load_pretrained=False).save(folder)
    return f"run:{folder}"


# --- what one torchrun process does ---------------------------------------------------------------
def worker(task: str, work: Path, nproc: int, batch_size: int, epochs: int) -> None:
    from clipdistill.data.loading import load_dataset
    from clipdistill.io import atomic_write_json
    from clipdistill.train.distributed import context_from_env

    teacher = f"run:{work / 'teacher'}"
    data = work / "data"
    models = json.loads((work / "models.json").read_text())
    ctx = context_from_env()
    result: dict[str, Any] = {}
    if task == "cache":
        from clipdistill.sharded import build_cache_sharded

        dataset = load_dataset(data)
        started = time.perf_counter()
        out = build_cache_sharded(
            teacher,
            dataset,
            work / f"cache{nproc}",
            k_augmentations=2,
            image_size=models["decode_size"],
            shard_size=64,
            batch_size=64,
            progress=False,
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
                "data": {"path": str(data), "image_size": models["decode_size"]},
                "student": {
                    "preset": models["student"],
                    "image_size": models["student_image_size"],
                    "frozen_stages": models["student_frozen_stages"],
                },
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
    processes: tuple[int, ...] = (1, 8, 64),
) -> list[str]:
    """Markdown tables: time at the measured 1-process rate × processes (assumes a free core per
    process and communication that is small next to compute: see docs/scale.md), cache disk
    (fp32 rows + ~40 B of keys per row), index RAM. The embedding widths are the JSON's
    ``models`` (a JSON from before it was recorded: the retired 384-d teacher, 256-d student)."""
    models = measured.get("models", {})
    teacher_dim, student_dim = models.get("teacher_dim", 384), models.get("student_dim", 256)
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


def models_line(models: dict[str, Any]) -> str:
    """One sentence naming the models a JSON measured (the first line of its projection)."""
    frozen = models["student_frozen_stages"]
    return (
        f"Models (random weights): teacher `{models['teacher']}` ({models['teacher_trunk']} at "
        f"{models['teacher_image_size']} px, {models['teacher_dim']}-d), data decoded at {models['decode_size']} px; "
        f"student `{models['student']}` ({models['student_trunk']} at {models['student_image_size']} px"
        + (f", stem + stages 0-{frozen - 1} frozen" if frozen else "")
        + f", {models['student_text']} text tower, {models['student_dim']}-d)."
    )


def markdown(paths: list[Path]) -> list[str]:
    """The generated blocks of docs/scale.md from result JSONs (1-thread first, then cores split),
    rendered by ``benchmarks/results_doc.py``'s own renderers."""
    import results_doc

    sources = [(str(path), json.loads(path.read_text(encoding="utf-8"))) for path in paths]
    lines = ["<!-- generated: scale -->", *results_doc.render_scale(sources), "<!-- end generated -->", ""]
    name, first = sources[0]
    if first.get("projection"):
        block = results_doc.render_lines("projection")(name, first)
        lines += ["<!-- generated: scale-projection -->", *block, "<!-- end generated -->"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo = quick_demo_models()
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64, help="global training batch")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scale.json"))
    parser.add_argument("--tasks", type=lambda v: v.split(","), default=["cache", "train", "embed"])
    parser.add_argument("--procs", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2])
    parser.add_argument("--threads", type=int, default=0, help="OMP threads per process (0: the cores / N)")
    parser.add_argument("--project", type=Path, help="print the projection tables from a results JSON and exit")
    parser.add_argument(
        "--markdown",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="print docs/scale.md's generated blocks from results JSONs (1-thread first) and exit",
    )
    models = parser.add_argument_group("models (default: the quick demo's)")
    models.add_argument("--teacher", default=demo["teacher"], help="lit:TRUNK[@SIZE] (default: %(default)s)")
    models.add_argument(
        "--teacher-frozen-stages",
        type=int,
        default=demo["teacher_frozen_stages"],
        help="default: the LiT trainer's for that trunk (no effect on speed: the teacher only infers)",
    )
    models.add_argument(
        "--decode-size", type=int, default=demo["decode_size"], help="px the data is decoded at (default: %(default)s)"
    )
    models.add_argument("--student", default=demo["student"], help="student preset or model-config JSON (%(default)s)")
    models.add_argument(
        "--student-size",
        type=int,
        default=demo["student_size"] or 0,
        help="student input px, 0: the preset's own (default: %(default)s)",
    )
    models.add_argument(
        "--student-frozen-stages",
        type=int,
        default=demo["student_frozen_stages"],
        help="student trunk stages kept fixed (default: %(default)s)",
    )
    parser.add_argument("--worker", choices=("cache", "train", "embed"), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.work, args.processes, args.batch_size, args.epochs)
        return
    if args.project:
        measured = json.loads(args.project.read_text())
        print("\n".join(([models_line(measured["models"]), ""] if "models" in measured else []) + project(measured)))
        return
    if args.markdown:
        print("\n".join(markdown(args.markdown)))
        return

    from clipdistill.io import atomic_write_json

    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        work = Path(tmp)
        models = describe_models(args)
        print(models_line(models), flush=True)
        atomic_write_json(work / "models.json", models)
        write_dataset(work / "data", args.images, size=args.decode_size)
        write_teacher(work / "teacher", args.teacher, args.teacher_frozen_stages)
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
    measured = {"models": models, "results": results}
    complete = all(f"{task}@2" in results for task in units)
    projection = [models_line(models), "", *project(measured)] if complete else None
    if projection:
        print("\n".join(projection))
    atomic_write_json(
        args.out,
        {
            **run_header("scale"),
            "models": models,
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
            "projection": projection,
        },
    )


if __name__ == "__main__":
    main()
