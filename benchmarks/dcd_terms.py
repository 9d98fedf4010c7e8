"""Which of DCD's two terms moves the student (issue 18): DCD as tuned, then with only its
distillation KL (α 1) and only its self-learning BCE (α 0), each beside the task loss; the
demo's student and budget, several seeds; val and test rsum per seed.

    .venv/bin/python benchmarks/dcd_terms.py --data runs/demo/data --teacher run:runs/demo/teacher \\
        --cache runs/demo/cache --fusion fusion:runs/demo/fusion --runs runs/bench/dcd_terms

The cache must already hold the fusion states (`benchmarks/methods.py --fusion ...` or the demo
builds it). Runs are ``benchmarks/methods.py``'s (reused when their summary exists, so an
interrupted benchmark resumes); scratch ``clip`` is in ``methods.py``'s 3-seed results.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from _record import run_header
from clipdistill.distill.methods import method_variants
from clipdistill.io import atomic_write_json
from clipdistill.run_config import resolve_run_config
from methods import base_config, load_dataset, run, test_metrics

# label -> arguments over DCD's tuned ones
VARIANTS: dict[str, dict[str, Any]] = {
    "tuned": {},
    "alpha1": {"alpha": 1.0},
    "alpha0": {"alpha": 0.0},
    "kl-negatives": {"distill": "kl-negatives"},  # the positive left out of the KL
}


def quick_demo_budget() -> dict[str, Any]:
    """``methods.py``'s budget flags (all but epochs) with the quick demo's values, read from the
    ``quick`` preset so this benchmark trains the demo's own student."""
    quick = resolve_run_config(preset="quick")
    return {
        "image_size": quick.cache.image_size,
        "k_aug": quick.augment.k,
        "batch_size": quick.optim.batch_size,
        "lr": quick.optim.lr,
        "warmup_steps": quick.optim.warmup_steps,
        "student": quick.student.preset,
        "student_image_size": quick.student.image_size,
        "image_init": quick.student.image_init,
        "text_init": quick.student.text_init,
        "frozen_stages": quick.student.frozen_stages,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--fusion", required=True, help="fusion teacher spec, e.g. fusion:runs/demo/fusion")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=resolve_run_config(preset="quick").optim.epochs)
    parser.add_argument("--runs", default="runs/bench/dcd_terms")
    parser.add_argument("--out", default="benchmarks/results/dcd_terms.json")
    args = parser.parse_args()

    base = base_config(argparse.Namespace(**vars(args), **quick_demo_budget()))
    test_split = load_dataset(args.data).split("test")
    tuned = method_variants("dcd")["tuned"]
    rows: dict[str, Any] = {}
    print(f"{'dcd':10s} {'val rsum per seed':>26s} {'test rsum per seed':>26s} {'test mean ± std':>16s}")
    for label, extra in VARIANTS.items():
        method_args = {**tuned, **extra}
        val, test = [], []
        for seed in range(args.seeds):
            summary = run(base, f"dcd-{label}-s{seed}", "dcd", seed, method_args)
            val.append(summary["val"]["rsum"])
            test.append(test_metrics(summary, test_split)["rsum"])
        mean, std = statistics.mean(test), statistics.pstdev(test)
        rows[label] = {
            "method_args": method_args,
            "val_rsum": val,
            "test_rsum": test,
            "test_rsum_mean_std": [mean, std],
        }
        cells = [" / ".join(f"{v:.1f}" for v in values) for values in (val, test)]
        print(f"{label:10s} {cells[0]:>26s} {cells[1]:>26s} {mean:9.1f} ± {std:4.1f}")
    atomic_write_json(Path(args.out), {**run_header("dcd_terms"), "budget": base, "variants": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
