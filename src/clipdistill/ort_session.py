"""The one place ONNX Runtime CPU sessions are built: timing, the frozen-stage runner and the
search service differ only in threads, in whether idle workers may spin, and in whether they
share one memory arena.

Each session has its own CPU memory arena by default, which keeps the largest activations the
session has ever held until the session is dropped. Timing interleaves many sessions that are
alive at once (a teacher at batch 64 and 224 px, its smaller inputs, the students), so their
arenas add up: a peak of 4.2 GiB against 3.1 GiB with one arena shared by all of them
(docs/results.md, "Memory"). ONNX
Runtime's environment allocator is that shared arena; it lives as long as the process, so
whoever is done with it hands its free memory back (:func:`release_shared_arena`).
"""

from __future__ import annotations

import functools
from typing import Any

_SHRINK_ARENA = "memory.enable_memory_arena_shrinkage"


@functools.cache
def _register_shared_arena() -> None:
    """Register the process's shared CPU arena with ONNX Runtime (once: a second registration
    of the same device is an error)."""
    import onnxruntime as ort

    memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(memory, ort.OrtArenaCfg(0, -1, -1, -1))  # ORT's defaults


def cpu_session(
    model: str | bytes,
    threads: int | None = None,
    *,
    inter_op_threads: int | None = None,
    spin: bool = True,
    shared_arena: bool = False,
) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU provider, every graph optimisation on,
    warnings off. ``model`` is a path or the serialised graph; ``threads`` the intra-op pool
    (None: ORT's default). ``spin=False`` makes idle workers sleep after a call instead of
    spinning (ORT's default): a process that alternates the session with other work (torch,
    another session being timed) would otherwise lose its cores to the spinning pool.
    ``shared_arena``: allocate from the process's one shared arena (module docstring), for
    sessions that are alive together; :func:`release_shared_arena` when done."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    if inter_op_threads:
        options.inter_op_num_threads = inter_op_threads
    options.log_severity_level = 3
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if shared_arena:
        _register_shared_arena()
        options.add_session_config_entry("session.use_env_allocators", "1")
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def release_shared_arena() -> None:
    """Hand the shared arena's unused memory back to the OS: one tiny call on the arena with
    ONNX Runtime's shrink-after-run option (the only way its Python API offers). A no-op when no
    session ever used the shared arena."""
    if _register_shared_arena.cache_info().currsize == 0:
        return
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "release",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = cpu_session(model.SerializeToString(), 1, shared_arena=True)
    options = ort.RunOptions()
    options.add_run_config_entry(_SHRINK_ARENA, "cpu:0")
    session.run(None, {"x": np.zeros(1, dtype=np.float32)}, options)
