"""Helper for tests/test_distributed.py (not a test file): under ``torchrun``, each process
takes an unequal share of one batch (some shares empty) through a converted BatchNorm layer
and compares with the plain layer run on the whole batch in this same process: outputs,
input gradients, parameter gradients (summed over processes) and running statistics after
two steps. Writes ``OUT/rank<R>.json`` with the largest absolute difference of each."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from timm.layers.norm_act import BatchNormAct2d
from torch import nn

from clipdistill.train.sync_batchnorm import GlobalBatchNorm, to_global_batchnorm


def _shares(rows: int, world: int, case: int) -> list[int]:
    """Unequal shares of ``rows`` summing to it; the last process gets none in case 2."""
    if case == 2:
        return [rows // (world - 1)] * (world - 2) + [rows - rows // (world - 1) * (world - 2), 0]
    shares = [1 + (r + case) % 3 for r in range(world - 1)]
    return [*shares, rows - sum(shares)]


def _case(case: int) -> tuple[nn.Module, tuple[int, ...]]:
    """The layer and the whole batch's shape of each case (2d/1d/3d inputs, both momentum kinds,
    timm's BatchNormAct2d with a real activation)."""
    if case == 0:
        return nn.BatchNorm2d(3, momentum=0.1), (9, 3, 4, 5)
    if case == 1:
        return nn.BatchNorm1d(4, momentum=None), (10, 4)
    if case == 2:
        return BatchNormAct2d(3, act_layer=nn.GELU), (8, 3, 2, 2)
    return nn.BatchNorm1d(2, affine=False), (11, 2, 3)


def check(case: int, rank: int, world: int) -> dict[str, float]:
    torch.manual_seed(case)
    plain, shape = _case(case)
    with torch.no_grad():
        for param in plain.parameters():
            param.uniform_(0.5, 1.5)
    converted = to_global_batchnorm(copy.deepcopy(plain), torch.device("cpu"))
    assert any(isinstance(m, GlobalBatchNorm) for m in converted.modules()), type(converted)
    shares = _shares(shape[0], world, case)
    start = sum(shares[:rank])
    rows = slice(start, start + shares[rank])
    diffs: dict[str, float] = {}
    for step in range(2):
        x = torch.randn(*shape) * 3 + 1
        weights = torch.randn(*shape)
        whole = x.clone().requires_grad_(True)
        expected = plain(whole)
        (expected * weights).sum().backward()
        mine = x[rows].clone().requires_grad_(True)
        got = converted(mine)
        # each process's loss is its rows' share: their sum over processes is the whole-batch loss
        (got * weights[rows]).sum().backward()
        diffs[f"output{step}"] = float((got - expected[rows]).abs().max()) if got.numel() else 0.0
        assert mine.grad is not None and whole.grad is not None
        diffs[f"input_grad{step}"] = float((mine.grad - whole.grad[rows]).abs().max()) if got.numel() else 0.0
        for (name, p_plain), p_conv in zip(plain.named_parameters(), converted.parameters(), strict=True):
            assert p_plain.grad is not None and p_conv.grad is not None
            summed = p_conv.grad.clone()
            dist.all_reduce(summed)
            diffs[f"{name}_grad{step}"] = float((summed - p_plain.grad).abs().max())
            p_plain.grad = p_conv.grad = None
        for (name, b_plain), b_conv in zip(plain.named_buffers(), converted.buffers(), strict=True):
            diffs[f"{name}{step}"] = float((b_conv.double() - b_plain.double()).abs().max())
    return diffs


def main(out_dir: str) -> None:
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {f"case{case}": check(case, rank, world) for case in range(4)}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    assert "RANK" in os.environ, "run under torchrun"
    main(sys.argv[1])
