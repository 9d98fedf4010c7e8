"""The rows of a finished run beside each student's own: per-method means, each method against
the scratch baseline, and the student to ship. Read by the ``distill`` job (demo.py) when it
writes ``report.json``."""

from __future__ import annotations

import statistics
from typing import Any


def method_summary(students: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method (in training order): its test rsum's mean and spread over seeds."""
    rows = []
    for method in dict.fromkeys(s["method"] for s in students):
        values = [s["metrics"]["rsum"] for s in students if s["method"] == method]
        rows.append(
            {
                "method": method,
                "rsum_mean": statistics.mean(values),
                "rsum_std": statistics.pstdev(values) if len(values) > 1 else 0.0,
                "n_seeds": len(values),
            }
        )
    return rows


def add_vs_scratch(students: list[dict[str, Any]], test_ranks: list[dict[str, Any] | None]) -> None:
    """Each method's student entries gain ``vs_scratch``: its mean test rsum over seeds minus the
    scratch baseline's, with a 95% interval from a paired bootstrap over the test queries
    (eval/paired_bootstrap.py). Left out when a run has no ranks (a test_metrics.json written
    without them)."""
    from clipdistill.distill.methods import baseline_method
    from clipdistill.eval.paired_bootstrap import rsum_difference

    baseline = baseline_method()
    by_method: dict[str, list[int]] = {}
    for i, student in enumerate(students):
        by_method.setdefault(student["method"], []).append(i)
    if baseline not in by_method or any(ranks is None for ranks in test_ranks):
        return
    scratch = [test_ranks[i] for i in by_method[baseline]]
    for method, indices in by_method.items():
        if method == baseline:
            continue
        difference = rsum_difference([test_ranks[i] for i in indices], scratch)  # type: ignore[misc]
        for i in indices:
            students[i]["vs_scratch"] = difference


def best_student(students: list[dict[str, Any]]) -> dict[str, Any]:
    """The student to ship: best mean **val** rsum over its seeds (test stays untouched by the
    choice), then its best seed on val."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for student in students:
        by_method.setdefault(student["method"], []).append(student)
    method = max(by_method, key=lambda m: statistics.mean(s["val_rsum"] for s in by_method[m]))
    return max(by_method[method], key=lambda s: s["val_rsum"])
