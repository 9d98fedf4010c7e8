"""Helper for tests/test_distributed.py (not a test file): runs two training steps of each
configured method and saves, per step, the logged loss terms and every trainable
parameter's gradient. Run as ``python ddp_parity_worker.py OUT SPEC.json`` for the
one-process reference, or under ``torchrun --nproc_per_node 2`` for the data-parallel run;
each process writes ``OUT/rank<R>.pt``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch


def run(raw: dict[str, Any], steps: int) -> list[dict[str, Any]]:
    """Two optimiser steps from the same initial weights; one batch per epoch."""
    from clipdistill.config import TrainConfig, from_dict
    from clipdistill.train.trainer import Trainer, epoch_plan

    config = from_dict(TrainConfig, raw)
    trainer = Trainer(config, progress=False)
    out = []
    for epoch in range(steps):
        plan = epoch_plan(trainer.caption_counts, config.augment.k, config.seed, epoch)
        record = trainer.train_step(*trainer._batch(plan, 0))
        grads = {}
        for prefix, module in (("student.", trainer.student), ("method.", trainer.method)):
            for name, param in module.named_parameters():
                if param.grad is not None:
                    grads[prefix + name] = param.grad.detach().clone()
        out.append({"losses": {k: v for k, v in record.items() if k.endswith("_loss")}, "grads": grads})
    return out


def float64() -> None:
    """Build models in float64 and decode pixels to float64, so the comparison measures the
    distributed math and not float32 summation order (which Adam's normalised steps amplify)."""
    from clipdistill.train import trainer

    torch.set_default_dtype(torch.float64)
    trainer.to_unit = lambda pixels: pixels.double().div_(255.0)  # type: ignore[attr-defined]


def main(out_dir: str, spec_path: str) -> None:
    float64()
    spec = json.loads(Path(spec_path).read_text())
    results = {name: run(raw, spec["steps"]) for name, raw in spec["configs"].items()}
    rank = int(os.environ.get("RANK", "0"))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    import torch.distributed as dist

    if dist.is_initialized():  # the first trainer joined it; later ones reuse it
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
