"""The rows of a finished run beside each student's own: per-method means, each method against
the scratch baseline, and the student to ship. Read by the ``distill`` job (demo.py) when it
writes ``report.json``, and by the report when it draws it.

A row is a (method, student variant) pair: a run with a ladder of students
(``student_ladder.py``) trains every method on each variant, and a method is compared with
scratch on the same variant, since another network's scratch run says nothing about what the
teacher added. A run of one student has no ``student`` label, and its rows are per method."""

from __future__ import annotations

import statistics
from typing import Any

RowKey = tuple[str, str | None]


def row_key(entry: dict[str, Any]) -> RowKey:
    """(method, student label) of a student entry, summary row or shipped student; the label is
    None in a run of one student."""
    return entry["method"], entry.get("student")


def row_label(entry: dict[str, Any]) -> str:
    """The row's name where one column must say both: ``clip``, or ``clip [lite0@64]`` with a
    ladder (the frontier names its points the same way)."""
    method, student = row_key(entry)
    return method if student is None else f"{method} [{student}]"


def _rows(students: list[dict[str, Any]]) -> dict[RowKey, list[int]]:
    """Student entry indices per row, rows in training order."""
    rows: dict[RowKey, list[int]] = {}
    for i, student in enumerate(students):
        rows.setdefault(row_key(student), []).append(i)
    return rows


def _student_field(student: str | None) -> dict[str, str]:
    return {} if student is None else {"student": student}


def method_summary(students: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per row (in training order): its test rsum's mean and spread over seeds."""
    summary = []
    for (method, student), indices in _rows(students).items():
        values = [students[i]["metrics"]["rsum"] for i in indices]
        summary.append(
            {
                "method": method,
                **_student_field(student),
                "rsum_mean": statistics.mean(values),
                "rsum_std": statistics.pstdev(values) if len(values) > 1 else 0.0,
                "n_seeds": len(values),
            }
        )
    return summary


def add_vs_scratch(students: list[dict[str, Any]], test_ranks: list[dict[str, Any] | None]) -> None:
    """Each row's student entries gain ``vs_scratch``: its mean test rsum over seeds minus the
    scratch baseline's on the same student variant, with a 95% interval from a paired bootstrap
    over the test queries (eval/paired_bootstrap.py). Left out when a run has no ranks (a
    test_metrics.json written without them) and for a variant without a scratch run."""
    from clipdistill.distill.methods import baseline_method
    from clipdistill.eval.paired_bootstrap import rsum_difference

    baseline = baseline_method()
    if any(ranks is None for ranks in test_ranks):
        return
    rows = _rows(students)
    for (method, student), indices in rows.items():
        scratch = rows.get((baseline, student))
        if method == baseline or scratch is None:
            continue
        difference = rsum_difference([test_ranks[i] for i in indices], [test_ranks[i] for i in scratch])  # type: ignore[misc]
        for i in indices:
            students[i]["vs_scratch"] = difference


def best_student(students: list[dict[str, Any]]) -> dict[str, Any]:
    """The student to ship: the row with the best mean **val** rsum over its seeds (test stays
    untouched by the choice), then its best seed on val."""
    rows = _rows(students)
    best = max(rows, key=lambda key: statistics.mean(students[i]["val_rsum"] for i in rows[key]))
    return max((students[i] for i in rows[best]), key=lambda s: s["val_rsum"])


def shipped(best: dict[str, Any]) -> dict[str, Any]:
    """report.json's ``best_student``: the method, its student variant with a ladder, the seed."""
    return {
        "method": best["method"],
        **_student_field(best.get("student")),
        "seed": best["seed"],
        "selected_by": "val rsum",
    }
