"""How far val rsum predicts test rsum: every finished training run under the given folders.

The benchmarks choose each method's arguments by val rsum (issue 18 asks for that), and the
emoji splits are made by concept, so val and test hold different unseen concepts of about 360
images each. This evaluates every run (a folder with ``summary.json``) on the test split and
reports how well val ranks them: Pearson and Spearman correlation over runs, and over pairs of
runs with the same seed, how often the one with the higher val rsum also has the higher test
rsum. Test results are reported, never used to choose anything.

    .venv/bin/python benchmarks/val_test_agreement.py --data runs/demo/data RUNS_DIR [RUNS_DIR ...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path
from typing import Any

from _record import run_header
from clipdistill.data.loading import load_dataset
from clipdistill.io import atomic_write_json
from methods import test_metrics


def ranks(values: list[float]) -> list[float]:
    """Ranks 0..n-1 (ties share their mean rank), for Spearman's correlation. Written here because
    ``statistics.correlation(method="ranked")`` needs Python 3.12 (the project runs 3.11) and
    scipy is not one of the project's dependencies."""
    order = sorted(range(len(values)), key=values.__getitem__)
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            result[order[position]] = (start + end) / 2
        start = end + 1
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="folders whose subfolders are training runs")
    parser.add_argument("--data", default="runs/demo/data")
    parser.add_argument("--out", default="benchmarks/results/val_test_agreement.json")
    args = parser.parse_args()
    test_split = load_dataset(args.data).split("test")
    rows: list[dict[str, Any]] = []
    for folder in args.runs:
        for summary_path in sorted(Path(folder).glob("*/summary.json")):
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
            rows.append(
                {
                    "run": str(summary_path.parent),
                    "seed": summary.get("seed"),
                    "val_rsum": summary["val"]["rsum"],
                    "test_rsum": test_metrics(summary, test_split)["rsum"],
                }
            )
            print(f"{rows[-1]['val_rsum']:7.1f} {rows[-1]['test_rsum']:7.1f}  {rows[-1]['run']}", flush=True)
    # A benchmark that reuses another's run under a second name trains it again to the same
    # bits: one run, counted once (same seed, val and test rsum).
    seen: set[tuple[Any, float, float]] = set()
    unique = []
    for row in rows:
        key = (row["seed"], row["val_rsum"], row["test_rsum"])
        if key not in seen:
            seen.add(key)
            unique.append(row)
    rows = unique
    if len(rows) < 3:
        raise SystemExit(f"need at least 3 finished runs under {args.runs}, found {len(rows)}")
    val, test = [r["val_rsum"] for r in rows], [r["test_rsum"] for r in rows]
    pearson = statistics.correlation(val, test)
    spearman = statistics.correlation(ranks(val), ranks(test))
    same_seed = [(a, b) for a, b in itertools.combinations(rows, 2) if a["seed"] == b["seed"] and a["seed"] is not None]
    decided = [(a, b) for a, b in same_seed if a["val_rsum"] != b["val_rsum"]]
    agree = sum((a["val_rsum"] > b["val_rsum"]) == (a["test_rsum"] > b["test_rsum"]) for a, b in decided)
    result = {
        **run_header("val_test_agreement"),
        "data": args.data,
        "runs": rows,
        "pearson": round(pearson, 3),
        "spearman": round(spearman, 3),
        "same_seed_pairs": len(decided),
        "same_seed_pairs_val_picks_test_winner": agree,
    }
    print(f"\n{len(rows)} runs: Pearson {pearson:.2f}, Spearman {spearman:.2f}")
    if decided:
        print(f"same-seed pairs: val picks the test winner in {agree} of {len(decided)} ({agree / len(decided):.0%})")
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
