"""Evaluate an ONNX export folder: what ``clipdistill export`` writes and what users deploy.

A checkpoint's recall says how good the network is; the export's says how good the thing that
ships is, through its own preprocessing (Pillow, ``preprocess_config.json``), its own torch-free
tokenizer and, with ``--precision int8``, its quantised graphs. So an export is embedded exactly
as ``clipdistill embed`` and the search service embed (``serve/encoders.OnnxEncoders``) and
scored with the same ``recall_at_k`` as a torch model, under the same result keys.

Its cost is read from the graphs themselves, with no torch model at hand:

* parameters: the elements of the fp32 graph's weight tensors (initializers and ``Constant``
  tensors, floating point, more than one element). The exporter folds each BatchNorm into its
  convolution, so a BatchNorm trunk has a few parameters fewer than its torch module.
* FLOPs per item: every MatMul / Gemm / Conv of the fp32 graph at batch 1, from the shapes
  onnxruntime actually produces (every intermediate tensor is made an output for one run), with
  torch's flop counter's rule (a multiply-add is 2 FLOPs, other ops 0), so ONNX and torch
  figures compare. The int8 graphs do the same multiply-adds in int8, so both precisions report
  the fp32 count. A text graph takes captions padded to its fixed width, so a caption's FLOPs
  are those of a full-width row (as ``eval/onnx_timing.py`` counts them).
* latency per item at batch 1 and 64: the chosen precision's graphs timed by
  ``onnx_timing.time_onnx_graphs``, the timer of the demo's speed-up, on the same inputs.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipdistill.data.dataset import PairedDataset
from clipdistill.eval.retrieval import recall_at_k

ONNX_PREFIX = "onnx:"
PRECISIONS = ("fp32", "int8")
TOWERS = ("image", "text")
BATCH = 256  # images decoded, and captions tokenised, per graph call while embedding
_FLOAT_TYPES = frozenset({1, 10, 11, 16})  # onnx TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


def export_dir_of(model: str | Path) -> Path | None:
    """The export folder a ``--model`` value names (``onnx:PATH``, or a folder holding
    ``export.json``), or ``None`` for a model spec (``run:``, ``local-dir:``, ...). A bare folder
    without ``export.json`` (an interrupted export) is still taken as one, so the error says what
    is missing rather than that the value has no spec schema."""
    from clipdistill.serve.encoders import EXPORT_CONFIG

    text = str(model)
    if text.startswith(ONNX_PREFIX):
        return Path(text.removeprefix(ONNX_PREFIX))
    path = Path(text)
    if (path / EXPORT_CONFIG).is_file() or (":" not in text and path.is_dir()):
        return path
    return None


def embed_export(
    encoders: Any, dataset: PairedDataset, *, batch_size: int = BATCH, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(image_emb, text_emb) of a split through an export's own preprocessing, tokenizer and
    graphs (:class:`~clipdistill.serve.encoders.OnnxEncoders`). Images are decoded ``batch_size``
    at a time, so memory stays flat whatever the split's size."""
    from clipdistill.eval.embed import progress_bar

    paths = dataset.image_paths()
    texts = dataset.texts()
    image_parts, text_parts = [], []
    bar = progress_bar(len(paths), "embed images", "img", progress)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        image_parts.append(encoders.encode_pixels(encoders.preprocess(chunk)))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    bar = progress_bar(len(texts), "embed captions", "caption", progress)
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        text_parts.append(encoders.encode_texts(chunk))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    dim = encoders.embed_dim
    image = np.concatenate(image_parts) if image_parts else np.zeros((0, dim), np.float32)
    text = np.concatenate(text_parts) if text_parts else np.zeros((0, dim), np.float32)
    return image, text


# --- what the graphs cost ----------------------------------------------------------------------
def _weight_tensors(graph: Any) -> Iterable[Any]:
    yield from graph.initializer
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    yield attribute.t


def graph_parameters(path: str | Path) -> int:
    """Elements of a graph's weights: floating-point initializers and ``Constant`` tensors of
    more than one element (scalars such as a LayerNorm's epsilon and shape constants are not
    weights), counted at every node that reads them. The exporter stores equal tensors once (an
    untrained trunk's zero-initialised convolutions all read one zero tensor), so counting
    stored tensors would hide parameters a trained network has."""
    import onnx

    graph = onnx.load(str(path)).graph
    sizes: dict[str, int] = {}
    for tensor in graph.initializer:
        sizes[tensor.name] = _weight_size(tensor)
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value" and node.output:
                    sizes[node.output[0]] = _weight_size(attribute.t)
    alias = {node.output[0]: node.input[0] for node in graph.node if node.op_type == "Identity" and node.input}
    total = 0
    for node in graph.node:
        if node.op_type in ("Identity", "Constant"):
            continue
        for name in node.input:
            while name in alias:
                name = alias[name]
            total += sizes.get(name, 0)
    return total


def _weight_size(tensor: Any) -> int:
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    return count if tensor.data_type in _FLOAT_TYPES and count > 1 else 0


def _all_shapes(path: str | Path, feed: dict[str, np.ndarray]) -> tuple[Any, dict[str, tuple[int, ...]]]:
    """(graph, shape of every tensor) from one onnxruntime run in which every node output is
    also a graph output (shape inference cannot always see through the exported Reshapes)."""
    import onnx

    from clipdistill.ort_session import cpu_session

    model = onnx.load(str(path))
    graph = model.graph
    produced = [name for node in graph.node for name in node.output if name]
    known = {output.name for output in graph.output}
    graph.output.extend(onnx.ValueInfoProto(name=name) for name in produced if name not in known)
    session = cpu_session(model.SerializeToString(), 1, inter_op_threads=1, spin=False)
    names = [output.name for output in session.get_outputs()]
    values = session.run(names, feed)
    shapes = {name: tuple(np.shape(value)) for name, value in zip(names, values, strict=True)}
    shapes.update({name: tuple(array.shape) for name, array in feed.items()})
    for tensor in _weight_tensors(graph):
        if tensor.name:
            shapes[tensor.name] = tuple(tensor.dims)
    for node in graph.node:  # Constant outputs are named by the node, not the tensor
        if node.op_type == "Constant" and node.output:
            for attribute in node.attribute:
                if attribute.name == "value":
                    shapes[node.output[0]] = tuple(attribute.t.dims)
    return graph, shapes


def _node_flops(node: Any, shapes: dict[str, tuple[int, ...]]) -> int:
    """torch's flop-counter rule for the ops that do the arithmetic (2 per multiply-add)."""
    if node.op_type not in ("MatMul", "Gemm", "Conv"):
        return 0
    out = shapes.get(node.output[0])
    first = shapes.get(node.input[0])
    if out is None or first is None:
        return 0
    if node.op_type == "MatMul":
        return 2 * int(np.prod(out)) * int(first[-1])
    if node.op_type == "Gemm":
        trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
        return 2 * int(np.prod(out)) * int(first[0] if trans_a else first[1])
    weight = shapes.get(node.input[1])  # Conv: (C_out, C_in / groups, kH, kW)
    if weight is None:
        return 0
    return 2 * int(np.prod(out)) * int(np.prod(weight[1:]))


def graph_flops(path: str | Path, feed: dict[str, np.ndarray]) -> int:
    """FLOPs of one run of a graph on ``feed`` (see the module docstring for what counts)."""
    graph, shapes = _all_shapes(path, feed)
    return sum(_node_flops(node, shapes) for node in graph.node)


def export_efficiency(
    encoders: Any,
    *,
    batch_sizes: Sequence[int] = (1, 64),
    repeats: int = 30,
    threads: int | None = None,
) -> dict[str, Any]:
    """``params`` {image, text, total}, ``flops`` {image, text} per item and ``latency_ms``
    {image_b1, text_b1, image_b64, text_b64} per item of an export's graphs: the keys
    ``eval/efficiency.tower_efficiency`` gives a torch model, plus ``onnx_timing`` (threads,
    repeats, the run's matmul peak) saying how the latency was measured."""
    from clipdistill.eval.efficiency import _available_cores
    from clipdistill.eval.onnx_timing import time_onnx_graphs, timing_captions, timing_pixels
    from clipdistill.serve.encoders import TOWER_FILES

    height, width = encoders.preprocess.size
    inputs = {
        "image": lambda batch: timing_pixels(batch, height, width),
        "text": lambda batch: np.ascontiguousarray(encoders.tokenizer(timing_captions(batch)), dtype=np.int64),
    }
    input_names = {"image": "pixel_values", "text": "input_ids"}
    fp32 = {tower: encoders.directory / TOWER_FILES["fp32"][tower] for tower in TOWERS}
    params = {tower: graph_parameters(fp32[tower]) for tower in TOWERS}
    flops = {tower: graph_flops(fp32[tower], {input_names[tower]: inputs[tower](1)}) for tower in TOWERS}
    threads = threads or _available_cores()
    graphs = {
        tower: (encoders.paths[tower], {batch: inputs[tower](batch) for batch in batch_sizes}) for tower in TOWERS
    }
    latency, peak_gflops = time_onnx_graphs(graphs, repeats=repeats, threads=threads)
    return {
        "params": {**params, "total": params["image"] + params["text"]},
        "flops": flops,
        "latency_ms": {key: round(ms, 4) for key, ms in latency.items()},
        "onnx_timing": {"threads": threads, "repeats": repeats, "matmul_peak_gflops": round(peak_gflops, 2)},
    }


def evaluate_export(
    directory: str | Path,
    dataset: PairedDataset,
    *,
    precision: str = "fp32",
    efficiency: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Recall of an export folder on an already-selected split (the keys of ``recall_at_k``,
    ``embed_seconds``) and, with ``efficiency``, its params, FLOPs and latency
    (:func:`export_efficiency`); ``backend``, ``precision`` and the export's ``source_spec``
    say what was measured."""
    from clipdistill.serve.encoders import ExportError, OnnxEncoders

    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    encoders = OnnxEncoders(directory, precision)
    started = time.perf_counter()
    image_emb, text_emb = embed_export(encoders, dataset, progress=progress)
    result: dict[str, Any] = dict(recall_at_k(image_emb, text_emb, dataset.text_to_image()))
    result["embed_seconds"] = round(time.perf_counter() - started, 3)
    result["backend"] = "onnx"
    result["precision"] = precision
    result["source_spec"] = encoders.config["source"]["spec"]
    if efficiency:
        result.update(export_efficiency(encoders))
    return result
