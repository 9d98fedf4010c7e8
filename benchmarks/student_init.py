"""Student initialisation ablation (issue 17): one method, the demo's student and budget, each
starting point of ``student.image_init`` x ``student.text_init``, several seeds; test rsum
mean ± std and val rsum mean per starting point.

    .venv/bin/python benchmarks/student_init.py --data runs/demo/data \\
        --teacher run:runs/demo/teacher --cache runs/demo/cache --runs runs/bench/init

Each starting point is one ``benchmarks/methods.py --tuned`` run (its own runs folder, so an
interrupted ablation resumes where it stopped); this script only chooses the grid and puts the
rows side by side. Random weights get every stage trained (freezing random stages would only
measure the freezing); the demo's own row keeps its frozen stages.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from _record import run_header
from clipdistill.io import atomic_write_json

# (label, student.image_init, student.text_init, student.frozen_stages)
STARTS: tuple[tuple[str, str, str, int], ...] = (
    ("random / random", "random", "random", 0),
    ("ImageNet / inherited", "imagenet", "teacher", 0),
    ("teacher / random", "teacher", "random", 0),
    ("teacher / inherited", "teacher", "teacher", 0),
    ("teacher / inherited, stages 0-4 frozen (demo)", "teacher", "teacher", 5),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--method", default="conaclip")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=128, help="decode size (cache and training)")
    parser.add_argument("--student", default="lite0")
    parser.add_argument("--student-image-size", type=int, default=96)
    parser.add_argument("--runs", default="runs/bench/init", help="folder of the training runs")
    parser.add_argument("--out", default="benchmarks/results/student_init.json")
    args = parser.parse_args()

    runs = Path(args.runs)
    rows: dict[str, Any] = {}
    for label, image_init, text_init, frozen in STARTS:
        folder = runs / f"{image_init}-{text_init}-frozen{frozen}"
        part = folder / "methods.json"
        command = [sys.executable, str(Path(__file__).with_name("methods.py")), "--tuned"]
        command += ["--data", args.data, "--teacher", args.teacher, "--cache", args.cache]
        command += ["--methods", args.method, "--seeds", str(args.seeds), "--epochs", str(args.epochs)]
        command += ["--warmup-steps", str(args.warmup_steps), "--image-size", str(args.image_size)]
        command += ["--student", args.student, "--student-image-size", str(args.student_image_size)]
        command += ["--image-init", image_init, "--text-init", text_init, "--frozen-stages", str(frozen)]
        command += ["--runs", str(folder), "--out", str(part)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        result = json.loads(part.read_text(encoding="utf-8"))
        entry = result["methods"][args.method]
        rows[label] = {
            "image_init": image_init,
            "text_init": text_init,
            "frozen_stages": frozen,
            "test_rsum": [run["rsum"] for run in entry["runs"]],
            "test_rsum_mean_std": entry["mean_std"]["rsum"],
            "val_rsum": entry["val_rsum"],
            "train_seconds": entry["train_seconds"],
        }
        teacher_rsum = result["teacher"]["test"]["rsum"]

    budget = f"{args.student_image_size} px, {args.epochs} epochs, {args.seeds} seeds"
    print(f"\n{args.method}, {args.student} student at {budget}")
    print(f"{'image / text start':48s}{'test rsum':>16s}{'% teacher':>11s}{'val rsum':>10s}{'s/run':>7s}")
    for label, row in rows.items():
        mean, std = row["test_rsum_mean_std"]
        print(
            f"{label:48s}{mean:9.1f} ± {std:4.1f}{100 * mean / teacher_rsum:10.0f}%"
            f"{statistics.mean(row['val_rsum']):10.1f}{statistics.mean(row['train_seconds']):7.0f}"
        )
    print(f"teacher test rsum {teacher_rsum:.1f}")
    report = {
        **run_header("student_init"),
        "method": args.method,
        "budget": {k: getattr(args, k) for k in ("seeds", "epochs", "warmup_steps", "image_size", "student")}
        | {"student_image_size": args.student_image_size},
        "teacher": {"spec": args.teacher, "test_rsum": teacher_rsum},
        "starts": rows,
    }
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
