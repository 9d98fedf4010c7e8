"""Evaluate one model on one dataset split: retrieval metrics plus efficiency.

This is what ``clipdistill eval`` writes as ``metrics.json``; the demo report reuses it for
the teacher and every student so all rows are measured the same way.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from clipdistill.data.dataset import PairedDataset
from clipdistill.device import resolve_device
from clipdistill.eval.embed import embed_split
from clipdistill.eval.retrieval import recall_at_k
from clipdistill.models.base import DualEncoder


def evaluate_loaded(
    model: DualEncoder, dataset: PairedDataset, *, efficiency: bool = True, pixels: torch.Tensor | None = None
) -> dict[str, Any]:
    """Metrics of an already-loaded model on an already-selected split."""
    started = time.perf_counter()
    image_emb, text_emb = embed_split(model.eval(), dataset, pixels=pixels)
    result: dict[str, Any] = dict(recall_at_k(image_emb, text_emb, dataset.text_to_image()))
    result["embed_seconds"] = round(time.perf_counter() - started, 3)
    if efficiency:
        from clipdistill.eval.efficiency import tower_efficiency

        device = str(next(model.parameters()).device)
        result.update(tower_efficiency(model, device=device))
    return result


def evaluate_model(
    spec: str,
    data: str | Path,
    *,
    split: str = "test",
    images: str | Path | None = None,
    device: str = "cpu",
    efficiency: bool = True,
) -> dict[str, Any]:
    """Load ``spec`` and ``data``, evaluate on ``split``; keys of ``recall_at_k`` plus
    ``dataset``, ``model``, ``split``, ``n_images``, ``n_texts`` (and efficiency keys)."""
    from clipdistill.data.loading import load_dataset
    from clipdistill.models.teachers import load_model

    torch_device = resolve_device(device)
    dataset = load_dataset(data, images)
    subset = dataset.split(split)
    model = load_model(spec, device=torch_device)
    result = {
        "dataset": dataset.name,
        "model": spec,
        "split": split,
        "n_images": len(subset),
        "n_texts": subset.n_texts(),
    }
    result.update(evaluate_loaded(model, subset, efficiency=efficiency))
    return result
