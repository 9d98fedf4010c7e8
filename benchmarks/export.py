"""Export benchmark: torch eager vs ONNX fp32 vs ONNX int8, per tower.

Batch-1 and batch-64 latency of each tower, file sizes, and recall on the eval split (from
the export's parity report). Targets: ONNX fp32 min cosine >= 0.999 and not slower than torch
at batch 1; int8 files smaller with an rsum drop <= 3 points.

Uses a trained student (the newest runs/*/model) when one exists, else builds and saves an
untrained ``tiny`` student (fine for parity and latency; its recall is chance level).

    .venv/bin/python benchmarks/export.py --data data/emoji --model local-dir:runs/bench/methods/clip-s0/model
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipdistill.export.onnx import export_model
from clipdistill.io import atomic_write_json
from clipdistill.serve.encoders import TOWER_FILES, OnnxEncoders


def pick_model(work: Path) -> tuple[str, bool]:
    """(spec, trained?): the newest trained student run, else a fresh tiny student."""
    candidates = sorted(Path("runs").glob("*/model/open_clip_config.json"), key=lambda p: p.stat().st_mtime)
    if candidates:
        return f"local-dir:{candidates[-1].parent}", True
    from clipdistill.models.students import build_student, save_student

    torch.manual_seed(0)
    save_student(build_student("tiny"), work / "untrained_tiny")
    return f"local-dir:{work / 'untrained_tiny'}", False


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Model spec (default: newest runs/*/model or untrained tiny).")
    parser.add_argument("--data", default="data/emoji")
    parser.add_argument("--split", default="test")
    parser.add_argument("--work", default="benchmarks/results/export_work")
    parser.add_argument("--out", default="benchmarks/results/export.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    work = Path(args.work)
    spec, trained = (args.model, True) if args.model else pick_model(work)
    export_dir = work / "export"
    parity = export_model(spec, export_dir, int8=True, data=args.data, split=args.split)

    torch.set_num_threads(args.threads)
    from clipdistill.models.teachers import load_model

    model = load_model(spec)
    towers = {"image": model.image_tower().eval(), "text": model.text_tower().eval()}
    sessions = {variant: OnnxEncoders(export_dir, variant, threads=args.threads) for variant in ("fp32", "int8")}
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    for tower in ("image", "text"):
        for batch in (1, 64):
            if tower == "image":
                x = rng.standard_normal((batch, 3, *model.image_size)).astype(np.float32)
            else:
                x = sessions["fp32"].tokenizer(["a smiling face with heart eyes and a red heart"] * batch)
            tx = torch.from_numpy(x)
            repeats = args.repeats if batch == 1 else max(5, args.repeats // 3)
            with torch.inference_mode():
                torch_ms = median_ms(lambda t=towers[tower], a=tx: t(a), repeats)
            row = {"tower": tower, "batch": batch, "torch_ms": torch_ms}
            for variant, enc in sessions.items():
                run = enc.encode_pixels if tower == "image" else enc.encode_tokens
                row[f"onnx_{variant}_ms"] = median_ms(lambda r=run, a=x: r(a), repeats)
            rows.append(row)

    files = parity["files"]
    sizes = {
        variant: {tower: files[name]["bytes"] for tower, name in TOWER_FILES[variant].items()}
        for variant in ("fp32", "int8")
    }
    torch_bytes = {
        tower: sum(p.numel() * p.element_size() for p in towers[tower].parameters()) for tower in ("image", "text")
    }
    rsum = {name: (parity[name]["recall"] or {}).get("rsum") for name in ("torch", "onnx_fp32", "onnx_int8")}
    result = {
        "model": spec,
        "trained": trained,
        "parity_inputs": parity["inputs"],
        "latency_ms": rows,
        "bytes": {"torch_params": torch_bytes, **sizes},
        "rsum": rsum,
        "min_cosine": {
            name: {tower: parity[name][tower]["min_cosine"] for tower in ("image", "text")}
            for name in ("onnx_fp32", "onnx_int8")
        },
        "int8_settings": parity.get("int8_settings"),
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "date": dt.datetime.now().isoformat(timespec="seconds"),
    }
    result["targets"] = {
        "fp32_min_cosine_ge_0.999": min(result["min_cosine"]["onnx_fp32"].values()) >= 0.999,
        "fp32_not_slower_at_batch1": all(r["onnx_fp32_ms"] <= r["torch_ms"] for r in rows if r["batch"] == 1),
        "int8_smaller": sum(sizes["int8"].values()) < sum(sizes["fp32"].values()),
        "int8_rsum_drop_le_3": None if rsum["onnx_fp32"] is None else (rsum["onnx_fp32"] - rsum["onnx_int8"]) <= 3.0,
    }
    atomic_write_json(args.out, result)

    print(f"model: {spec} ({'trained' if trained else 'UNTRAINED'}), parity on {parity['inputs']}")
    print("| tower | batch | torch ms | ONNX fp32 ms | ONNX int8 ms |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['tower']} | {r['batch']} | {r['torch_ms']:.2f} | {r['onnx_fp32_ms']:.2f} | {r['onnx_int8_ms']:.2f} |"
        )
    print("\n| variant | image MB | text MB | image min cos | text min cos | rsum |")
    print("|---|---:|---:|---:|---:|---:|")
    mb = 1e6
    print(f"| torch | {torch_bytes['image'] / mb:.1f} | {torch_bytes['text'] / mb:.1f} | 1 | 1 | {rsum['torch']:.2f} |")
    for variant in ("fp32", "int8"):
        cos = result["min_cosine"][f"onnx_{variant}"]
        print(
            f"| ONNX {variant} | {sizes[variant]['image'] / mb:.1f} | {sizes[variant]['text'] / mb:.1f} | "
            f"{cos['image']:.5f} | {cos['text']:.5f} | {rsum[f'onnx_{variant}']:.2f} |"
        )
    print("\ntargets:", json.dumps(result["targets"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
