"""Teacher vs students in ONNX Runtime: per-item latency, FLOPs, share of the matmul peak.

The demo report's latency column is eager torch at batch 1, which moved 1x-4x between runs for
the same networks (issue 17). This times the exported graphs instead (``eval/onnx_timing.py``):
the teacher and the given students in ONE process, interleaved, median of ``--repeats`` per
item at batch 1 and 64, and runs that whole measurement ``--reruns`` times so the spread between
reruns is part of the result (the issue asks them to agree within 15%).

    PYTHONPATH=src .venv/bin/python benchmarks/onnx_latency.py --teacher run:runs/demo/teacher \\
        --student conaclip=local-dir:runs/demo/students/conaclip-s0/model --out benchmarks/results/onnx_latency.json

Run it on a quiet machine (one job at a time): interleaving makes the ratio between models
robust to a busy neighbour, not their absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from _record import run_header
from clipdistill.eval.onnx_timing import onnx_efficiency, speedup
from clipdistill.io import atomic_write_json
from clipdistill.models.teachers import load_model


def _spread(values: list[float]) -> float:
    """(max - min) / min over the reruns: 0.15 means the slowest rerun took 15% longer."""
    return (max(values) - min(values)) / min(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="model spec of the teacher")
    parser.add_argument("--student", action="append", required=True, help="NAME=SPEC, repeatable")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--reruns", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    models = {"teacher": load_model(args.teacher)}
    for item in args.student:
        name, _, spec = item.partition("=")
        if not spec:
            parser.error(f"--student {item!r}: expected NAME=SPEC")
        models[name] = load_model(spec)
    runs = [onnx_efficiency(models, repeats=args.repeats, threads=args.threads) for _ in range(args.reruns)]

    rows: dict[str, Any] = {}
    print(f"{'model':<12} {'entry':<10} " + " ".join(f"run{i + 1:>2} ms" for i in range(args.reruns)) + "  spread")
    for name in models:
        rows[name] = {"onnx_ms": {}, "spread": {}, "flops": runs[0]["models"][name]["flops"]}
        for entry in runs[0]["models"][name]["onnx_ms"]:
            values = [run["models"][name]["onnx_ms"][entry] for run in runs]
            rows[name]["onnx_ms"][entry] = sorted(values)[len(values) // 2]
            rows[name]["spread"][entry] = round(_spread(values), 4)
            print(f"{name:<12} {entry:<10} " + " ".join(f"{v:8.3f}" for v in values) + f"  {_spread(values):6.1%}")
    for name in models:
        if name == "teacher":
            continue
        for batch in (1, 64):
            ratio = speedup(rows["teacher"]["onnx_ms"], rows[name]["onnx_ms"], batch)
            rows[name][f"speedup_b{batch}"] = round(ratio, 2)
            print(f"speed-up teacher / {name}, batch {batch}: {ratio:.1f}x")
    result = {
        **run_header("onnx_latency"),
        "teacher": args.teacher,
        "students": dict(item.partition("=")[::2] for item in args.student),
        "threads": args.threads,
        "repeats": args.repeats,
        "matmul_peak_gflops": [run["matmul_peak_gflops"] for run in runs],
        "models": rows,
        "runs": runs,
    }
    atomic_write_json(args.out, result)
    print(json.dumps({"out": str(args.out)}))


if __name__ == "__main__":
    main()
