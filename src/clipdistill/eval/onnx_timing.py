"""Latency that can be trusted: every model's towers in ONNX Runtime, timed interleaved.

Eager-torch latency at batch 1 is mostly Python and per-operator dispatch, and it drifts with
whatever else the machine does, so one model timed after another can come out several times
apart on two runs. What a deployment runs is the exported graph, so this module exports each
tower of each model to ONNX fp32 (``export.onnx.export_tower``, the graphs ``clipdistill export``
ships), loads them all into one process, and times them **interleaved**: every repeat calls
every (model, tower, batch) once, in a rotating order, so a slow moment of the machine hits
all models alike. The median of ``repeats`` calls is reported per item.

Beside it: FLOPs per item (torch's flop counter, batch 1) and the achieved GFLOP/s as a share
of this machine's fp32 matmul peak, measured in the same run and the same way (an ONNX MatMul
graph, interleaved with the models), so "the student is 10x faster" can be read against "the
student does 10x less work" and "the CPU is busy or idle".
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipdistill.eval.efficiency import count_flops
from clipdistill.models.base import DualEncoder
from clipdistill.ort_session import cpu_session, release_shared_arena

TOWERS = ("image", "text")
_CAPTIONS = (
    "a red heart with a white ribbon",
    "a smiling face with sunglasses",
    "a brown dog running through fresh snow",
    "two people riding bicycles along the beach at sunset",
)
_PEAK_SIDE = 512  # the matmul whose throughput is "this machine's peak" (512^3: cache-friendly)


def _session(path: Path, threads: int) -> Any:
    """An ONNX Runtime session for timing, whose worker threads sleep, not spin, between calls.
    Every ONNX Runtime session has its own intra-op pool, and by default a pool spins for a while
    after each call: interleaved, the previously timed ONNX Runtime session's idle workers would
    spin on the cores while the next one is timed, which lowers the matmul reference, inflates
    latencies and pushes peak shares above 100% (docs/results.md, "ONNX timing and spinning
    threads"). Each call pays the pool's wake-up instead, as a request that arrives at an idle
    service does. All timed sessions share one memory arena (``ort_session``): they are alive
    together, and separate arenas would add up."""
    return cpu_session(str(path), threads, inter_op_threads=1, spin=False, shared_arena=True)


def _matmul_graph(path: Path, side: int) -> None:
    """A one-node ONNX graph ``Y = X @ W`` (fp32, side x side), the peak reference."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal((side, side)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "matmul_peak",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [side, side])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [side, side])],
        [numpy_helper.from_array(weight, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def timing_pixels(batch: int, height: int, width: int) -> np.ndarray:
    """The image graphs' timing input: seeded standard-normal pixels (already "normalised", the
    same for every model of that size)."""
    return np.random.default_rng(0).standard_normal((batch, 3, height, width)).astype(np.float32)


def timing_captions(batch: int) -> list[str]:
    """The text graphs' timing input: real captions (token counts, and so some towers' cost,
    depend on the text), repeated to the batch."""
    return [_CAPTIONS[i % len(_CAPTIONS)] for i in range(batch)]


def _inputs(model: DualEncoder, tower: str, batch: int) -> np.ndarray:
    """Seeded pixels at the model's size, or real captions tokenised and padded as export pads them."""
    if tower == "image":
        return timing_pixels(batch, *model.image_size)
    from clipdistill.export.onnx import _context_length, _pad_id, _pad_tokens

    tokens = model.tokenize(timing_captions(batch)).numpy()
    return _pad_tokens(tokens, _context_length(model), _pad_id(model))


def _flops_per_item(model: DualEncoder, tower: str) -> int:
    """FLOPs of one item through ``tower`` in eval mode, on the input the timed graph gets: a
    caption padded to the graph's fixed width. (Counted on the bare tokenisation, a tokenizer
    that pads to the batch's longest caption, as the LiT teacher's MiniLM does, would count a
    fraction of the work its graph does per caption, and so understate its peak share.)"""
    import torch

    model.eval()
    if tower == "image":
        height, width = model.image_size
        pixels = torch.zeros(1, 3, height, width)
        return count_flops(lambda: model.encode_image(pixels))
    tokens = torch.from_numpy(_inputs(model, "text", 1))
    return count_flops(lambda: model.encode_text(tokens))


def time_interleaved(
    calls: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int = 3
) -> dict[str, list[float]]:
    """Wall times (ms) of every call, ``repeats`` rounds; each round runs all calls once, the
    starting call rotating so no call always follows the same neighbour."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(1000.0 * (time.perf_counter() - start))
    return times


def _check_repeats(repeats: int) -> None:
    if repeats < 30:
        raise ValueError(f"repeats must be >= 30 for a stable median, got {repeats}")


def _timed_calls(
    graphs: Mapping[str, tuple[str | Path, Mapping[int, np.ndarray]]], threads: int, work_dir: str | Path | None
) -> tuple[dict[str, Callable[[], Any]], dict[str, int]]:
    """One call per graph and batch (``NAME_bBATCH``) plus the matmul reference
    (``|matmul_peak``), each on its own session; and each call's batch size."""
    calls: dict[str, Callable[[], Any]] = {}
    batches: dict[str, int] = {}
    for name, (path, feeds) in graphs.items():
        session = _session(Path(path), threads)
        input_name = session.get_inputs()[0].name
        for batch, array in feeds.items():
            key = f"{name}_b{batch}"
            calls[key] = lambda s=session, f={input_name: array}: s.run(None, f)
            batches[key] = batch
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        peak_path = Path(tmp) / "matmul.onnx"
        _matmul_graph(peak_path, _PEAK_SIDE)
        peak_session = _session(peak_path, threads)
    peak_feed = {"x": np.random.default_rng(1).standard_normal((_PEAK_SIDE, _PEAK_SIDE)).astype(np.float32)}
    calls["|matmul_peak"] = lambda: peak_session.run(None, peak_feed)
    return calls, batches


def time_onnx_graphs(
    graphs: Mapping[str, tuple[str | Path, Mapping[int, np.ndarray]]],
    *,
    repeats: int = 30,
    threads: int = 2,
    work_dir: str | Path | None = None,
) -> tuple[dict[str, float], float]:
    """Median ms **per item** of every graph at every batch, timed interleaved with this run's
    fp32 matmul peak reference (module docstring); returns ({``NAME_bBATCH``: ms}, peak GFLOP/s).

    ``graphs`` maps a name to (ONNX file, {batch size: the input array of that batch}); each
    graph gets one non-spinning ONNX Runtime session of ``threads`` intra-op threads. Whatever
    times ONNX graphs (``onnx_efficiency``'s exported towers, ``clipdistill eval`` of an export
    folder) goes through here, so their numbers are measured alike."""
    _check_repeats(repeats)
    calls, batches = _timed_calls(graphs, threads, work_dir)
    try:
        times = time_interleaved(calls, repeats=repeats)
    finally:
        calls.clear()  # the sessions go with their calls, then the arena they shared
        release_shared_arena()
    peak_gflops = 2 * _PEAK_SIDE**3 / (statistics.median(times.pop("|matmul_peak")) / 1000) / 1e9
    return {key: statistics.median(samples) / batches[key] for key, samples in times.items()}, peak_gflops


def onnx_efficiency(
    models: Mapping[str, DualEncoder],
    *,
    batch_sizes: Sequence[int] = (1, 64),
    repeats: int = 30,
    threads: int = 2,
    work_dir: str | Path | None = None,
    towers: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Per model: ``onnx_ms`` = {``image_b1``, ``text_b1``, ``image_b64``, ``text_b64``} (ms per
    item, median of ``repeats``), ``flops`` per item and tower, ``gflops_per_s`` and
    ``peak_share`` per timed entry; plus the run's ``matmul_peak_gflops``, ``threads`` and
    ``repeats``. All graphs live in one process and are timed interleaved (module docstring).
    ``towers``: the towers to time for a model named in it (default both), e.g. only the image
    tower of a model that differs from another only in its input size."""
    from clipdistill.export.onnx import export_tower

    _check_repeats(repeats)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        root = Path(tmp)
        graphs: dict[str, tuple[Path, dict[int, np.ndarray]]] = {}
        flops: dict[str, dict[str, int]] = {}
        for name, model in models.items():
            model.eval()
            timed = tuple((towers or {}).get(name, TOWERS))
            unknown = set(timed) - set(TOWERS)
            if unknown or not timed:
                raise ValueError(f"{name}: towers must be a non-empty subset of {TOWERS}, got {timed}")
            flops[name] = {tower: _flops_per_item(model, tower) for tower in timed}
            for tower in timed:
                path = root / f"{len(graphs)}_{tower}.onnx"
                export_tower(model, tower, path)
                graphs[f"{name}|{tower}"] = (path, {batch: _inputs(model, tower, batch) for batch in batch_sizes})
        per_item, peak_gflops = time_onnx_graphs(graphs, repeats=repeats, threads=threads, work_dir=root)

    report: dict[str, Any] = {
        "matmul_peak_gflops": round(peak_gflops, 2),
        "threads": threads,
        "repeats": repeats,
        "models": {},
    }
    for key, per_item_ms in per_item.items():
        name, entry = key.split("|")
        tower, _ = entry.split("_b")
        achieved = flops[name][tower] / (per_item_ms / 1000) / 1e9
        row = report["models"].setdefault(name, {"onnx_ms": {}, "flops": flops[name], "gflops_per_s": {}})
        row["onnx_ms"][entry] = round(per_item_ms, 4)
        row["gflops_per_s"][entry] = round(achieved, 2)
        row.setdefault("peak_share", {})[entry] = round(achieved / peak_gflops, 4)
    return report


def speedup(teacher: Mapping[str, float], student: Mapping[str, float], batch: int) -> float:
    """Teacher / student time per image + caption at ``batch`` (from two ``onnx_ms`` dicts)."""
    key_i, key_t = f"image_b{batch}", f"text_b{batch}"
    return (teacher[key_i] + teacher[key_t]) / (student[key_i] + student[key_t])
