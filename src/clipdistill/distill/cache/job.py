"""What one cache build works on: the split's rows, the teachers (loaded on first use), and
the shards written so far.

Both the embedding pass (:mod:`~clipdistill.distill.cache.build`) and the fusion pass
(:mod:`~clipdistill.distill.cache.fusion_shards`) go through one :class:`BuildJob`, so they
replay the same pixels, skip the same shards of other processes, and record their shards the
same way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch

from clipdistill.data.augment import replay_augmentation
from clipdistill.data.dataset import PairedDataset
from clipdistill.data.images import load_image_tensor, to_unit
from clipdistill.distill.cache.format import (
    CacheCorruptError,
    Shard,
    TokenFeaturesUnavailableError,
    content_sha256,
    image_row_keys,
    reusable_shard,
    shard_metadata,
    write_shard,
)
from clipdistill.models.encoding_memo import EncodingMemo, attach_encoding_memo


def batches(start: int, stop: int, size: int) -> Iterator[tuple[int, int]]:
    for first in range(start, stop, size):
        yield first, min(first + size, stop)


def check_token_features(model: Any, spec: str) -> None:
    missing = [
        name for name in ("encode_image_tokens", "encode_text_tokens") if not callable(getattr(model, name, None))
    ]
    if missing:
        raise TokenFeaturesUnavailableError(
            f"teacher {spec} ({type(model).__name__}) does not provide token features (no {', '.join(missing)}); "
            "build the cache without --token-features"
        )


@dataclass
class Teachers:
    """The build's teacher and fusion teacher, each loaded on first use: a resumed build whose
    shards are all on disk loads them only for the manifest's fields."""

    spec: str
    fusion_spec: str | None
    device: torch.device
    token_features: bool
    allow_random_teacher: bool = False  # a teacher without trained weights (models.teachers.load_teacher)
    #: Rows of the frozen towers, shared by the dual pass and the fusion pass (captions repeat,
    #: and the fusion teacher's dual encodes the same images) and with the run's other stages.
    encoding_memo: EncodingMemo = field(default_factory=EncodingMemo)
    _teacher: Any = None
    _fusion: Any = None

    def teacher(self) -> Any:
        if self._teacher is None:
            from clipdistill.models.teachers import load_teacher

            self._teacher = load_teacher(self.spec, device=self.device, allow_random=self.allow_random_teacher)
            attach_encoding_memo(self._teacher, self.encoding_memo)
            if self.token_features:
                check_token_features(self._teacher.model, self.spec)
        return self._teacher

    def fusion(self) -> Any:
        if self._fusion is None:
            from clipdistill.models.fusion import load_fusion_teacher

            self._fusion = attach_encoding_memo(
                load_fusion_teacher(str(self.fusion_spec), device=self.device), self.encoding_memo
            )
        return self._fusion


@dataclass
class Rows:
    """The split's rows in cache order (image rows image-major, ``k`` per image; text rows
    follow the captions) and the pixels of any range of image rows."""

    image_ids: list[str]
    paths: list[Path]
    caption_ids: list[str]
    texts: list[str]
    k: int
    image_size: int
    seed: int
    aug_scale: Sequence[float]
    aug_max_shift: float
    device: torch.device

    @classmethod
    def of(
        cls,
        subset: PairedDataset,
        *,
        k: int,
        image_size: int,
        seed: int,
        aug_scale: Sequence[float],
        aug_max_shift: float,
        device: torch.device,
    ) -> Rows:
        return cls(
            image_ids=[record.image_id for record in subset.images],
            paths=subset.image_paths(),
            caption_ids=subset.caption_ids(),
            texts=subset.texts(),
            k=k,
            image_size=image_size,
            seed=seed,
            aug_scale=aug_scale,
            aug_max_shift=aug_max_shift,
            device=device,
        )

    @property
    def image_rows(self) -> int:
        return len(self.image_ids) * self.k

    def keys(self, kind: str, shard: Shard) -> tuple[list[str], list[int]]:
        """Row keys of an ``images`` or ``texts`` shard, and its augmentation ids (images only)."""
        if kind == "images":
            return image_row_keys(self.image_ids, self.k, shard.start, shard.stop)
        return self.caption_ids[shard.start : shard.stop], []

    def replayed_pixels(self, first: int, last: int) -> torch.Tensor:
        """Unit pixels of image rows [first, last), exactly as the trainer replays them."""
        k = self.k
        batch_keys, batch_augs = image_row_keys(self.image_ids, k, first, last)
        unique = sorted({r // k for r in range(first, last)})
        decoded = to_unit(load_image_tensor([self.paths[i] for i in unique], self.image_size))
        where = {index: row for row, index in enumerate(unique)}
        unit_pixels = decoded[[where[r // k] for r in range(first, last)]]
        return replay_augmentation(
            unit_pixels, batch_keys, batch_augs, seed=self.seed, scale=self.aug_scale, max_shift=self.aug_max_shift
        ).to(self.device)


@dataclass
class BuildJob:
    """One build's plan and progress; ``entries`` become the manifest's ``shards``."""

    out: Path
    rows: Rows
    teachers: Teachers
    shard_headers: dict[str, str]
    image_plan: list[Shard]
    text_plan: list[Shard]
    batch_size: int
    token_features: bool
    shard_owner: tuple[int, int] | None
    require_existing: bool
    entries: dict[str, list[dict[str, Any]]]
    bar: Any = field(default=None)

    def plans(self) -> tuple[tuple[list[Shard], str], ...]:
        return ((self.image_plan, "images"), (self.text_plan, "texts"))

    def owns(self, shard: Shard) -> bool:
        """Whether this process computes ``shard`` (all of them unless the build is sharded)."""
        return self.shard_owner is None or shard.index % self.shard_owner[1] == self.shard_owner[0]

    def advance(self, rows: int) -> None:
        if self.bar is not None:
            self.bar.update(rows)

    def record(self, unit: Shard, sha: str) -> None:
        self.entries[unit.kind].append(
            {"file": unit.file, "sha256": sha, "start": unit.start, "rows": unit.stop - unit.start}
        )

    def reusable(self, unit: Shard, header: str, keys: Sequence[str]) -> str | None:
        """The sha256 of ``unit``'s file if it is already on disk for this plan (else ``None``)."""
        return reusable_shard(self.out / unit.file, self.shard_headers[header], unit, keys)

    def write(self, unit: Shard, header: str, keys: Sequence[str], tensors: dict[str, torch.Tensor]) -> None:
        """Write one shard under the header of kind ``header`` and record it."""
        meta = shard_metadata(self.shard_headers[header], unit, keys, content_sha256(tensors, keys))
        self.record(unit, write_shard(self.out / unit.file, tensors, meta))

    def refuse_missing(self, files: list[str]) -> NoReturn:
        raise CacheCorruptError(
            f"merging the sharded cache {self.out}: shard(s) {', '.join(files)} are missing or fail verification "
            "(header, keys or content hash); rerun the sharded build, which recomputes only those"
        )
