"""Which loss terms did anything: each term's gradient on the student, against the task term's.

A distillation method is a sum of weighted terms (``MethodOutput.losses``). A term whose gradient
is a small fraction of the task term's, or points where the task gradient already points, changes
little of what the student learns, whatever its loss value says. So once per epoch (on the
epoch's last step) the trainer takes every term's gradient with respect to the student's outputs
for the batch (its image and caption embeddings, as the method receives them) from the step's own
graph (``torch.autograd.grad`` with the graph kept: the step's update is computed as without
it), and records each term's norm, its norm over the task term's (``grad_ratio``) and its cosine
with the task gradient (``cos_task``). The outputs, not the weights: every term reaches the
weights only through them, and the measurement then costs the loss's own backward, not the
network's. The run's summary gives the means,
and flags a term that stayed under :data:`INERT_RATIO` of the task gradient at every
measurement. No library reports per-term gradients of a summed loss, hence this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

#: A term whose gradient stays under this fraction of the task term's for a whole run is flagged.
INERT_RATIO = 0.05


def term_gradients(
    losses: dict[str, torch.Tensor], outputs: Sequence[torch.Tensor], task_term: str
) -> dict[str, dict[str, float]]:
    """``{term: {"grad_norm", "grad_ratio", "cos_task"}}`` of one step's terms on ``outputs``
    (``grad_ratio`` and ``cos_task`` only when the step has its ``task_term`` with a nonzero
    gradient; the method's ``task_term``).
    The graph is kept, so the caller's backward of the summed loss still runs."""
    flats: dict[str, torch.Tensor] = {}
    for name, loss in losses.items():
        if not loss.requires_grad:
            continue
        grads = torch.autograd.grad(loss, list(outputs), retain_graph=True, allow_unused=True)
        # an output a term does not read (ComKD's image-side terms, say) gets a zero gradient
        parts = [
            (g if g is not None else torch.zeros_like(o)).detach().float().reshape(-1)
            for g, o in zip(grads, outputs, strict=True)
        ]
        flats[name] = torch.cat(parts)
    task = flats.get(task_term)
    task_norm = float(task.norm()) if task is not None else 0.0
    out: dict[str, dict[str, float]] = {}
    for name, flat in flats.items():
        norm = float(flat.norm())
        entry = {"grad_norm": norm}
        if task is not None and task_norm > 0:
            entry["grad_ratio"] = norm / task_norm
            entry["cos_task"] = float(torch.dot(flat, task) / (norm * task_norm)) if norm > 0 else 0.0
        out[name] = entry
    return out


def summarise_terms(measurements: Sequence[dict[str, dict[str, float]]], task_term: str) -> dict[str, dict[str, Any]]:
    """Per term over a run's measurements: mean ``grad_ratio`` and ``cos_task``, the largest
    ratio seen, and ``inert`` (never reached :data:`INERT_RATIO` of the task gradient)."""
    names = sorted({name for measured in measurements for name in measured})
    summary: dict[str, dict[str, Any]] = {}
    for name in names:
        rows = [measured[name] for measured in measurements if name in measured]
        entry: dict[str, Any] = {"measured": len(rows), "grad_norm": _mean([r["grad_norm"] for r in rows])}
        ratios = [r["grad_ratio"] for r in rows if "grad_ratio" in r]
        if ratios and name != task_term:
            entry.update(
                grad_ratio=_mean(ratios),
                max_grad_ratio=max(ratios),
                cos_task=_mean([r["cos_task"] for r in rows if "cos_task" in r]),
                inert=max(ratios) < INERT_RATIO,
            )
        summary[name] = entry
    return summary


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return round(sum(finite) / len(finite), 6) if finite else float("nan")
