"""Split a sharded job (teacher cache, embeddings) over torchrun processes, then merge once.

Both stages already write their output as independent, self-describing shards. Under
``torchrun --nproc_per_node N`` (or ``--nnodes``), process r computes the shards whose index
≡ r (mod N) into the shared output folder; after a barrier, rank 0 runs the merge, which
re-reads and verifies every shard (row counts, ids, checksums) and writes the one manifest that
makes the folder usable. Without torchrun the same call is the ordinary one-process build.

The processes coordinate through a gloo group whatever the device, so a GPU job needs no
nccl for its two barriers; each process computes on ``cuda:LOCAL_RANK`` when asked for ``cuda``.
The output folder must be visible to every process (one machine, or a shared filesystem).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from clipdistill.train.distributed import (
    DistContext,
    barrier,
    broadcast_from_main,
    context_from_env,
    init_process_group,
    process_device,
    shutdown,
)

T = TypeVar("T")


def run_sharded(work: Callable[[DistContext], None], merge: Callable[[], T]) -> T:
    """``work(ctx)`` on every process, a barrier, ``merge()`` on rank 0; every process gets
    the merge's result (or its error)."""
    ctx = context_from_env()
    if not ctx.enabled:
        return merge()
    created = init_process_group(ctx, torch.device("cpu"), "gloo")
    try:
        work(ctx)
        barrier(ctx)
        return broadcast_from_main(merge, ctx)
    finally:
        shutdown(created)


def split_by_rank(stage: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a shard-writing ``stage(*args, device=, progress=, shard_owner=, require_existing=,
    **kwargs)`` split by rank: each process builds its shards (on its own device, progress bar on
    rank 0 only), then rank 0 merges with the same arguments, requiring every shard to exist."""
    device = str(kwargs.pop("device", "cpu"))
    progress = bool(kwargs.pop("progress", True))

    def work(ctx: DistContext) -> None:
        stage(
            *args,
            device=process_device(device, ctx),
            progress=progress and ctx.is_main,
            shard_owner=(ctx.rank, ctx.world),
            **kwargs,
        )

    def merge() -> T:
        sharded = context_from_env().enabled
        return stage(*args, device=device, progress=progress, require_existing=sharded, **kwargs)

    return run_sharded(work, merge)


def build_cache_sharded(teacher_spec: str, dataset: Any, out: str | Path, **kwargs: Any) -> Path:
    """:func:`~clipdistill.distill.cache.build_cache`, split by rank when run under torchrun."""
    from clipdistill.distill.cache import build_cache

    return split_by_rank(build_cache, teacher_spec, dataset, out, **kwargs)


def embed_sharded(model: Any, data: str | Path, out: str | Path, **kwargs: Any) -> dict[str, Any]:
    """:func:`~clipdistill.serve.embed.embed_dataset`, split by rank when run under torchrun."""
    from clipdistill.serve.embed import embed_dataset

    return split_by_rank(embed_dataset, model, data, out, **kwargs)
