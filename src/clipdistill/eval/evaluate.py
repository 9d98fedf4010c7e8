"""Evaluate one model on one dataset split: retrieval metrics plus efficiency.

This is what ``clipdistill eval`` writes as ``metrics.json``; the demo report reuses it for
the teacher and every student so all rows are measured the same way. The model is a torch
model spec or an ONNX export folder (``eval/onnx_eval.py``); both give the same keys.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from clipdistill.data.dataset import PairedDataset
from clipdistill.data.splits import SplitOptions
from clipdistill.device import resolve_device
from clipdistill.eval.embed import embed_split
from clipdistill.eval.retrieval import recall_from_ranks, retrieval_ranks
from clipdistill.models.base import DualEncoder


def evaluate_loaded(
    model: DualEncoder,
    dataset: PairedDataset,
    *,
    efficiency: bool = True,
    pixels: torch.Tensor | None = None,
    progress: bool = False,
    ranks: bool = False,
) -> dict[str, Any]:
    """Metrics of an already-loaded model on an already-selected split; ``ranks``: also every
    query's rank (``ranks`` = {"i2t": per image, "t2i": per caption}), for paired comparisons."""
    started = time.perf_counter()
    image_emb, text_emb = embed_split(model.eval(), dataset, pixels=pixels, progress=progress)
    i2t, t2i = retrieval_ranks(image_emb, text_emb, dataset.text_to_image())
    result: dict[str, Any] = dict(recall_from_ranks(i2t, t2i))
    if ranks:
        result["ranks"] = {"i2t": i2t.tolist(), "t2i": t2i.tolist()}
    result["embed_seconds"] = round(time.perf_counter() - started, 3)
    if efficiency:
        from clipdistill.eval.efficiency import tower_efficiency

        device = str(next(model.parameters()).device)
        result.update(tower_efficiency(model, device=device))
    return result


def evaluate_model(
    spec: str,
    data: str | Path | PairedDataset,
    *,
    split: str = "test",
    images: str | Path | None = None,
    device: str = "cpu",
    efficiency: bool = True,
    splits: SplitOptions | None = None,
    precision: str = "fp32",
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate ``spec`` on ``split``; keys of ``recall_at_k`` plus ``dataset``, ``model``,
    ``split``, ``n_images``, ``n_texts``, ``backend`` (and the efficiency keys: ``params``,
    ``flops``, ``latency_ms``, ...).

    ``spec`` is a model spec (torch, on ``device``) or an ONNX export folder (``onnx:PATH`` or a
    folder holding ``export.json``: its own preprocessing, tokenizer and ``precision`` graphs,
    ``eval/onnx_eval.py``), so what ships is measured, not only the checkpoint it came from.

    ``data`` is a path, read with ``splits`` (``data/splits.py``: a table without the wanted
    split gets it carved from train, seeded, as ``train`` and the demo carve it; the record goes
    under ``splits``), or an already-loaded dataset, used as it is (nothing is read again).
    """
    from clipdistill.eval.onnx_eval import PRECISIONS, evaluate_export, export_dir_of
    from clipdistill.serve.encoders import ExportError

    export_dir = export_dir_of(spec)
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if export_dir is None and precision != "fp32":
        raise ExportError(f"precision {precision!r} applies to an ONNX export folder; {spec!r} is a torch model spec")
    if export_dir is not None and resolve_device(device).type != "cpu":
        raise ExportError(f"an ONNX export is evaluated with onnxruntime on the CPU, not on {device!r}")
    if isinstance(data, PairedDataset):
        dataset, record = data, None
    else:
        from clipdistill.data.splits import split_dataset

        dataset, record = split_dataset(data, images, splits or SplitOptions())
    subset = dataset.split(split)
    result: dict[str, Any] = {
        "dataset": dataset.name,
        "model": spec,
        "split": split,
        "n_images": len(subset),
        "n_texts": subset.n_texts(),
    }
    if record is not None:
        result["splits"] = record
    if export_dir is not None:
        result.update(
            evaluate_export(export_dir, subset, precision=precision, efficiency=efficiency, progress=progress)
        )
        return result
    from clipdistill.models.teachers import load_model

    model = load_model(spec, device=resolve_device(device))
    result.update(evaluate_loaded(model, subset, efficiency=efficiency, progress=progress))
    result["backend"] = "torch"
    return result


def efficiency_summary(result: dict[str, Any]) -> dict[str, float]:
    """The cost columns ``clipdistill eval`` prints beside recall: parameters (M), FLOPs per
    image and per caption (G), and ms per image / caption at batch 1 and 64, from a result's
    ``params``, ``flops`` and ``latency_ms``; empty when efficiency was not measured."""
    if "params" not in result:
        return {}
    summary = {
        "params M": result["params"]["total"] / 1e6,
        "GFLOPs/img": result["flops"]["image"] / 1e9,
        "GFLOPs/cap": result["flops"]["text"] / 1e9,
    }
    entries = [(int(key.split("_b")[1]), key.split("_b")[0], ms) for key, ms in result["latency_ms"].items()]
    for batch, tower, ms in sorted(entries, key=lambda entry: (entry[0], entry[1] != "image")):
        summary[f"ms/{'img' if tower == 'image' else 'cap'} b{batch}"] = ms
    return summary
