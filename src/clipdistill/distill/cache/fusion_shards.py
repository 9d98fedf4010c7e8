"""Fusion shards (``cache build --fusion SPEC``): the fusion teacher's per-item states.

Stored per row, not per pair, because which pairs share a training batch depends on the run's
epoch plan (see :mod:`clipdistill.distill.cache`); same rows and keys as the embedding shards,
under headers of their own (fusion spec and weights fingerprint added).
"""

from __future__ import annotations

import torch

from clipdistill.distill.cache.format import Shard
from clipdistill.distill.cache.job import BuildJob, batches


def write_fusion_shards(job: BuildJob) -> None:
    """Every owned ``fusion_images``/``fusion_texts`` shard; shards already on disk for this
    plan are kept (and, when merging a sharded build, must be)."""
    for plan, kind in job.plans():
        fusion_kind = f"fusion_{kind}"
        for shard in plan:
            if not job.owns(shard):
                continue
            unit = Shard(fusion_kind, shard.index, shard.start, shard.stop)
            keys = job.rows.keys(kind, shard)[0]
            sha = job.reusable(unit, fusion_kind, keys)
            if sha is None and job.require_existing:
                job.refuse_missing([unit.file])
            if sha is None:
                job.write(unit, fusion_kind, keys, fusion_states_shard(job, kind, shard))
            else:
                job.advance(len(keys))
                job.record(unit, sha)


def fusion_states_shard(job: BuildJob, kind: str, shard: Shard) -> dict[str, torch.Tensor]:
    """The fusion teacher's per-item states for one shard's rows. Caption states are stored
    ragged (only real tokens, plus ``lengths``): captions are short and padding them all to the
    longest would multiply the text shards' size."""
    from clipdistill.models.fusion import unpad_texts

    fusion = job.teachers.fusion()

    def host(tensor: torch.Tensor) -> torch.Tensor:
        return (tensor.float() if tensor.is_floating_point() else tensor).cpu()

    states: list[torch.Tensor] = []
    globals_: list[torch.Tensor] = []
    lengths: list[int] = []
    for first, last in batches(shard.start, shard.stop, job.batch_size):
        if kind == "images":
            image, image_global = fusion.image_states(job.rows.replayed_pixels(first, last))
            states.append(host(image))
            globals_.append(host(image_global))
        else:
            text, mask, text_global = fusion.text_states(job.rows.texts[first:last])
            rows = unpad_texts(host(text), mask.cpu())
            states.extend(rows)
            lengths.extend(len(row) for row in rows)
            globals_.append(host(text_global))
        job.advance(last - first)
    tensors = {"states": torch.cat(states), "global": torch.cat(globals_)}
    if kind == "texts":
        tensors["lengths"] = torch.tensor(lengths, dtype=torch.int64)
    return tensors
