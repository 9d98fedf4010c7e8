"""The one place ONNX Runtime CPU sessions are built: timing, the frozen-stage runner and the
search service differ only in threads and in whether idle workers may spin."""

from __future__ import annotations

from typing import Any


def cpu_session(
    model: str | bytes, threads: int | None = None, *, inter_op_threads: int | None = None, spin: bool = True
) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU provider, every graph optimisation on,
    warnings off. ``model`` is a path or the serialised graph; ``threads`` the intra-op pool
    (None: ORT's default). ``spin=False`` makes idle workers sleep after a call instead of
    spinning (ORT's default): a process that alternates the session with other work (torch,
    another session being timed) would otherwise lose its cores to the spinning pool."""
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
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
