"""The quality/cost frontier a user chooses a student from: report.json's ``frontier``.

A distilled student is worth shipping only if nothing cheaper does better. Its cheap
alternatives are the teacher itself run at a smaller input (no training at all), and the same
student network trained without a teacher (the scratch baseline). So the frontier holds, with
their test rsum and their ONNX Runtime cost per image + caption at batch 1 and 64:

- ``teacher``: the teacher at its own input size;
- ``teacher_smaller_input``: the teacher read at smaller inputs, not retrained;
- ``student``: every method on every student network, its mean over seeds.

A point is on the frontier at a batch size when no other point costs at most as much and scores
more. A student point is ``beaten_by`` the best cheap alternative (teacher at any input, or
scratch on a network at most as costly) that costs at most as much and scores more, per batch
size: such a student is not worth its training. Costs come from the efficiency stage, which
times every network in one interleaved run, so they compare.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

BATCHES = (1, 64)
KINDS = ("teacher", "teacher_smaller_input", "student")


def teacher_smaller_inputs(
    spec: str, test: Any, pixels: Any, sizes: Sequence[int], folder: Path, say: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """The teacher's test recall read at each of ``sizes`` below its own input, without
    retraining: ``[{"image_size", "metrics"}]``, largest first, each memoised in
    ``folder/test_metrics@SIZE.json``. None for a teacher whose input size is fixed (said)."""
    from clipdistill.eval.evaluate import evaluate_loaded
    from clipdistill.eval.retrieval import METRIC_KEYS
    from clipdistill.io import atomic_write_json
    from clipdistill.models.encoding_memo import EncodingMemo, attach_encoding_memo
    from clipdistill.models.teachers import load_model

    if not sizes:
        return []
    model = load_model(spec)
    if not model.resizable_image_input:
        say(f"teacher {spec} has a fixed input size: the frontier has no smaller-input teacher points")
        return []
    entries = []
    for size in sorted({size for size in sizes if size < model.image_size[0]}, reverse=True):
        path = folder / f"test_metrics@{size}.json"
        if path.is_file():
            metrics = json.loads(path.read_text(encoding="utf-8"))
        else:
            say(f"evaluating the teacher at {size} px")
            # Through a memo the frozen stages run in ONNX Runtime calls of bounded size, as the
            # teacher's own evaluation does: on the emoji test split at 128 px, 0.66 GB over the
            # process's base in 8 s, against 1.36 GB in 20 s for eager PyTorch on 256-image batches.
            resized = attach_encoding_memo(model.at_image_size(size), EncodingMemo())
            metrics = evaluate_loaded(resized, test, pixels=pixels, efficiency=False)
            atomic_write_json(path, metrics)
        entries.append({"image_size": size, "metrics": {key: metrics[key] for key in METRIC_KEYS}})
    return entries


def pair_cost(onnx_ms: Mapping[str, float]) -> dict[str, float]:
    """Milliseconds per image + caption (per item at each batch) from an ``onnx_ms`` dict."""
    return {f"b{b}": round(onnx_ms[f"image_b{b}"] + onnx_ms[f"text_b{b}"], 4) for b in BATCHES}


def _student_points(students: Sequence[Mapping[str, Any]], baseline: str | None) -> list[dict[str, Any]]:
    """One point per (method, network): the mean test rsum of its seeds. A student variant's
    ``network_label`` (student_ladder.py) keys its points, so two variants of one network (other
    initial weights, say) stay two points."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for student in students:
        network = student.get("network_label") or student.get("network", "")
        groups.setdefault((student["method"], network), []).append(student)
    networks = {network for _, network in groups}
    points = []
    for (method, network), seeds in groups.items():
        points.append(
            {
                "kind": "student",
                "name": method if len(networks) == 1 else f"{method} [{network}]",
                "method": method,
                "network": seeds[0].get("network", ""),
                "scratch": method == baseline,
                "seeds": len(seeds),
                "rsum": round(statistics.fmean(s["metrics"]["rsum"] for s in seeds), 2),
                "onnx_ms": pair_cost(seeds[0]["onnx_ms"]),
            }
        )
    return points


def frontier_points(report: Mapping[str, Any], baseline: str | None = None) -> list[dict[str, Any]]:
    """report.json's ``frontier`` (module docstring): every point with ``kind``, ``name``,
    ``rsum``, ``onnx_ms`` ({``b1``, ``b64``}: ms per image + caption), ``on_frontier`` per batch,
    and for students ``beaten_by`` per batch (a name, or None). ``baseline``: the scratch
    method's name (default: the registry's)."""
    if baseline is None:
        from clipdistill.distill.registry import baseline_method

        baseline = baseline_method()
    teacher = report["teacher"]
    points: list[dict[str, Any]] = [
        {
            "kind": "teacher",
            "name": "teacher",
            "rsum": teacher["metrics"]["rsum"],
            "onnx_ms": pair_cost(teacher["onnx_ms"]),
        }
    ]
    for smaller in teacher.get("smaller_inputs", []):
        points.append(
            {
                "kind": "teacher_smaller_input",
                "name": f"teacher@{smaller['image_size']}",
                "image_size": smaller["image_size"],
                "rsum": smaller["metrics"]["rsum"],
                "onnx_ms": pair_cost(smaller["onnx_ms"]),
            }
        )
    points += _student_points(report["students"], baseline)
    alternatives = [p for p in points if p["kind"] != "student" or p["scratch"]]  # what costs no training
    for point in points:
        point["on_frontier"] = {key: _undominated(point, points, key) for key in point["onnx_ms"]}
        if point["kind"] == "student":
            point["beaten_by"] = {key: _best_cheaper(point, alternatives, key) for key in point["onnx_ms"]}
    return points


def _cheaper_and_better(point: Mapping[str, Any], other: Mapping[str, Any], key: str) -> bool:
    return other is not point and other["onnx_ms"][key] <= point["onnx_ms"][key] and other["rsum"] > point["rsum"]


def _undominated(point: Mapping[str, Any], points: Sequence[Mapping[str, Any]], key: str) -> bool:
    return not any(_cheaper_and_better(point, other, key) for other in points)


def _best_cheaper(point: Mapping[str, Any], alternatives: Sequence[Mapping[str, Any]], key: str) -> str | None:
    beating = [other for other in alternatives if _cheaper_and_better(point, other, key)]
    return max(beating, key=lambda other: other["rsum"])["name"] if beating else None


def frontier_lines(points: Sequence[Mapping[str, Any]]) -> list[str]:
    """report.md's frontier table: every point by kind and cost, whether it is on the frontier,
    and what cheap alternative beats a student."""
    if not points:
        return []
    lines = [
        "",
        "## Quality against cost",
        "Test rsum against ONNX Runtime milliseconds per image + caption. A student is worth its "
        "training only where nothing cheaper scores more: the teacher read at a smaller input (no "
        "training) or the same network trained without a teacher (scratch). `beaten by` names the best "
        "such alternative at equal or lower cost; `frontier`: no point at all is cheaper and better.",
        "",
        "| kind | name | test rsum | ms b1 | ms b64 | frontier (b1 / b64) | beaten by (b1 / b64) |",
        "|---|---|---|---|---|---|---|",
    ]
    order = {kind: index for index, kind in enumerate(KINDS)}
    for point in sorted(points, key=lambda p: (order[p["kind"]], -p["rsum"])):
        on = " / ".join("yes" if point["on_frontier"][f"b{b}"] else "no" for b in BATCHES)
        beaten = point.get("beaten_by")
        by = " / ".join(beaten[f"b{b}"] or "-" for b in BATCHES) if beaten else ""
        lines.append(
            f"| {point['kind']} | `{point['name']}` | {point['rsum']:.1f} | {point['onnx_ms']['b1']:.2f} "
            f"| {point['onnx_ms']['b64']:.2f} | {on} | {by} |"
        )
    return lines
