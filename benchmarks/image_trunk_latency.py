"""What a bigger teacher or a smaller student input buys: EfficientNet-Lite trunks in ONNX Runtime.

Issue 17 asks for a teacher/student speed-up of 10x at batch 64 and 5x at batch 1 (image +
caption). The demo's teacher image tower is Lite0 at 224 px, its student's the same trunk at
96 px; this times the trunks a larger teacher (Lite1 at 240, Lite2 at 260: their native sizes)
or a cheaper student (Lite0 at 64-88 px, Lite2 at 64-80) would use, the way the demo's
efficiency stage times towers: fp32 graphs, one process, interleaved, median of ``--repeats``,
ms per item at batch 1 and 64, worker threads that sleep between calls. Only the trunk with its
pooled features is timed (the towers' linear heads cost well under 1%), weights random (the
timing does not depend on them), FLOPs from torch's counter.

    .venv/bin/python benchmarks/image_trunk_latency.py --out benchmarks/results/image_trunk_latency.json

With ``--report runs/demo/report.json`` it adds the speed-ups each teacher trunk would give
against each student trunk, with the caption times that demo measured (text towers unchanged).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch

from _record import run_header
from clipdistill.eval.efficiency import count_flops
from clipdistill.eval.onnx_timing import time_interleaved
from clipdistill.io import atomic_write_json
from clipdistill.ort_session import cpu_session

TEACHERS = (("tf_efficientnet_lite0", 224), ("tf_efficientnet_lite1", 240), ("tf_efficientnet_lite2", 260))
STUDENTS = (
    ("tf_efficientnet_lite0", 96),
    ("tf_efficientnet_lite0", 88),
    ("tf_efficientnet_lite0", 80),
    ("tf_efficientnet_lite0", 64),
    ("tf_efficientnet_lite2", 80),
    ("tf_efficientnet_lite2", 64),
)
BATCHES = (1, 64)


def trunk_session(name: str, size: int, threads: int) -> tuple[Any, int]:
    """(an ORT session of the pooled trunk, its FLOPs per image)."""
    model = timm.create_model(name, pretrained=False, num_classes=0).eval()
    example = torch.zeros(1, 3, size, size)
    buffer = io.BytesIO()
    torch.onnx.export(
        model, example, buffer, input_names=["pixels"], output_names=["features"],
        dynamic_axes={"pixels": {0: "batch"}}, dynamo=False,
    )  # fmt: skip
    with torch.no_grad():
        flops = count_flops(lambda: model(example))
    return cpu_session(buffer.getvalue(), threads, inter_op_threads=1, spin=False), flops


def label(name: str, size: int) -> str:
    return f"{name.removeprefix('tf_efficientnet_')}@{size}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--report", default=None, help="a demo report.json: caption times for the speed-ups")
    parser.add_argument("--out", default="benchmarks/results/image_trunk_latency.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    sessions, flops = {}, {}
    for name, size in TEACHERS + STUDENTS:
        sessions[label(name, size)], flops[label(name, size)] = trunk_session(name, size, args.threads)
    rng = np.random.default_rng(0)
    calls = {}
    for key, session in sessions.items():
        size = int(key.split("@")[1])
        for batch in BATCHES:
            pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
            calls[f"{key} b{batch}"] = lambda s=session, p=pixels: s.run(None, {"pixels": p})
    times = time_interleaved(calls, repeats=args.repeats)
    trunks = {
        key: {
            "mflops": round(flops[key] / 1e6, 1),
            **{f"ms_b{b}": round(statistics.median(times[f"{key} b{b}"]) / b, 3) for b in BATCHES},
        }
        for key in sessions
    }
    print(f"{'trunk':12s} {'MFLOPs':>8s} {'ms b1':>8s} {'ms b64':>8s}")
    for key, row in trunks.items():
        print(f"{key:12s} {row['mflops']:8.1f} {row['ms_b1']:8.3f} {row['ms_b64']:8.3f}")
    result: dict[str, Any] = {**run_header("image_trunk_latency"), "threads": args.threads, "repeats": args.repeats}
    result["trunks"] = trunks
    if args.report:
        report = json.loads(Path(args.report).read_text(encoding="utf-8"))
        teacher_text = report["teacher"]["onnx_ms"]
        student_text = report["students"][0]["onnx_ms"]
        speedups = {}
        print("\nspeed-up (image + caption; captions as measured in the report), b1 / b64")
        for teacher in (label(*t) for t in TEACHERS):
            for student in (label(*s) for s in STUDENTS):
                pair = {
                    f"b{b}": round(
                        (trunks[teacher][f"ms_b{b}"] + teacher_text[f"text_b{b}"])
                        / (trunks[student][f"ms_b{b}"] + student_text[f"text_b{b}"]),
                        2,
                    )
                    for b in BATCHES
                }
                speedups[f"{teacher} / {student}"] = pair
                print(f"{teacher:10s} / {student:10s} {pair['b1']:6.2f}x {pair['b64']:6.2f}x")
        result["caption_ms"] = {"teacher": teacher_text, "student": student_text, "report": args.report}
        result["speedups"] = speedups
    atomic_write_json(args.out, result)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
