"""Helper for tests/test_distributed.py (not a test file): runs a few training steps of each
configured method and saves, per step, the logged loss terms, every trainable parameter's
gradient and the student's BatchNorm running statistics. Run as
``python ddp_parity_worker.py OUT SPEC.json`` for the one-process reference, or under
``torchrun --nproc_per_node N`` for the data-parallel run; each process writes ``OUT/rank<R>.pt``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch


def run(raw: dict[str, Any], steps: int) -> list[dict[str, Any]]:
    """``steps`` optimiser steps from the same initial weights; one batch per epoch."""
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
        buffers = {
            name: buffer.detach().clone()
            for name, buffer in trainer.student.named_buffers()
            if name.endswith(("running_mean", "running_var", "num_batches_tracked"))  # BatchNorm's
        }
        losses = {k: v for k, v in record.items() if k.endswith("_loss")}
        out.append({"losses": losses, "grads": grads, "buffers": buffers})
    return out


def float64() -> None:
    """Build models in float64 and decode pixels to float64, so the comparison measures the
    distributed math and not float32 summation order (which Adam's normalised steps amplify)."""
    from dataclasses import fields, replace

    from clipdistill.distill.cache import CachedTeacher
    from clipdistill.train import trainer

    torch.set_default_dtype(torch.float64)
    trainer.to_unit = lambda pixels: pixels.double().div_(255.0)  # type: ignore[attr-defined]

    def double(outputs: Any) -> Any:  # a teacher cache stores float32: the same values, as float64
        values = {f.name: getattr(outputs, f.name) for f in fields(outputs)}
        return replace(
            outputs, **{k: v.double() for k, v in values.items() if torch.is_tensor(v) and v.is_floating_point()}
        )

    cached_call = CachedTeacher.__call__

    def call(self: CachedTeacher, batch: Any) -> Any:
        outputs = double(cached_call(self, batch))
        return outputs if outputs.fusion is None else replace(outputs, fusion=double(outputs.fusion))

    CachedTeacher.__call__ = call  # type: ignore[method-assign]


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
