"""The shared ONNX Runtime arena (ort_session.py): sessions alive together allocate from one
arena, and its free memory goes back to the OS when the timing is done."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import numpy as np
import pytest

from clipdistill.ort_session import cpu_session, release_shared_arena

SIDE = 4096  # one 64 MiB intermediate per call


def _chain_graph(side: int) -> bytes:
    """``(x @ w) @ w``: the intermediate product is allocated by the session's arena."""
    from onnx import TensorProto, helper, numpy_helper

    weight = np.eye(side, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"])],
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [side, side])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [side, side])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_the_shared_arena_keeps_memory_until_released() -> None:
    small = cpu_session(_chain_graph(64), 1, shared_arena=True)  # the arena's first region: small
    small.run(None, {"x": np.ones((64, 64), dtype=np.float32)})
    graph, feed = _chain_graph(SIDE), {"x": np.ones((SIDE, SIDE), dtype=np.float32)}
    first, second = (cpu_session(graph, 1, shared_arena=True) for _ in range(2))  # registers once
    np.testing.assert_array_equal(first.run(None, feed)[0], feed["x"])
    np.testing.assert_array_equal(second.run(None, feed)[0], feed["x"])
    del first, second, small
    gc.collect()
    held = _resident_mib()
    release_shared_arena()
    assert held - _resident_mib() > 48  # the 64 MiB intermediate's block went back to the OS
