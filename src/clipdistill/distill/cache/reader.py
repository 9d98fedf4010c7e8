"""``CachedTeacher``: serves a built cache's teacher outputs by id, a drop-in for the online teacher.

Opening checks the cache was built for exactly the request (teacher weights, dataset, split,
preprocessing, token features, fusion teacher) and that every shard is the one the manifest
lists; a batch is then a dict lookup per row plus one ``index_select``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from clipdistill.data.dataset import PairedDataset
from clipdistill.distill.base import Batch, TeacherOutputs, TeacherSource
from clipdistill.distill.cache.format import (
    FUSION_KINDS,
    HEADER_OF,
    CacheCorruptError,
    CacheKeyError,
    CacheMismatchError,
    image_row_keys,
)
from clipdistill.distill.cache.manifest import (
    dataset_fingerprint,
    preprocessing,
    read_manifest,
    rebuild_hint,
    same_teacher,
)
from clipdistill.distill.cache.shard_rows import ShardRows
from clipdistill.hashing import file_sha256
from clipdistill.models.fingerprint import teacher_fingerprint


class CachedTeacher(TeacherSource):
    """Serves cached teacher outputs by id; a drop-in for :class:`OnlineTeacher`.

    The embeddings are held in memory (a few thousand images' are a few MB) and a batch is a
    dict lookup per row plus one ``index_select``, which is what keeps training from the cache
    close to the cost of training the student alone. Token features and fusion states, tens of
    KB per row, stay in the shard files on the CPU and a batch reads its rows
    (:class:`~clipdistill.distill.cache.shard_rows.ShardRows`); on an accelerator they are moved
    there whole.
    """

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        image_table: torch.Tensor,
        image_rows: dict[tuple[str, int], int],
        text_table: torch.Tensor,
        text_rows: dict[str, int],
        image_tokens: torch.Tensor | ShardRows | None = None,
        text_tokens: torch.Tensor | ShardRows | None = None,
        device: str | torch.device = "cpu",
        fusion_tables: dict[str, torch.Tensor | ShardRows] | None = None,
        fusion: Any = None,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.spec: str = manifest["teacher"]["spec"]
        self.embed_dim: int = int(manifest["teacher"]["embed_dim"])
        self.k_augmentations: int = int(manifest["preprocessing"]["k_augmentations"])
        self._image_rows = image_rows
        self._text_rows = text_rows
        self._tables: dict[str, torch.Tensor | ShardRows | None] = {
            "image": image_table,
            "text": text_table,
            "image_tokens": image_tokens,
            "text_tokens": text_tokens,
            "logit_scale": torch.tensor(float(manifest["teacher"]["logit_scale"]), dtype=torch.float32),
        }
        # Fusion states: image rows (rows, N, ...) and globals; captions ragged: ``text_flat``
        # rows [text_offsets[j], text_offsets[j] + text_lengths[j]) are caption j's tokens.
        self._fusion_tables: dict[str, torch.Tensor | ShardRows] = dict(fusion_tables or {})
        self.fusion = fusion  # the frozen fusion teacher whose pair head scores the states
        self._device = torch.device("cpu")
        self.device = device

    @property
    def device(self) -> torch.device:
        return self._device

    @device.setter
    def device(self, value: str | torch.device) -> None:
        """Setting the device moves the tables there, so gathering a batch is one on-device
        ``index_select`` and nothing is copied host-to-device per step."""
        self._device = torch.device(value)
        self._tables = {name: None if t is None else t.to(self._device) for name, t in self._tables.items()}
        self._fusion_tables = {name: t.to(self._device) for name, t in self._fusion_tables.items()}
        if self.fusion is not None:
            self.fusion.to(self._device)

    def to(self, device: str | torch.device) -> CachedTeacher:
        self.device = device
        return self

    @property
    def logit_scale(self) -> torch.Tensor:
        """The teacher's log logit scale as recorded when the cache was built."""
        table = self._tables["logit_scale"]
        assert table is not None
        return table

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        teacher_spec: str,
        dataset: PairedDataset,
        split: str = "train",
        image_size: int,
        k_augmentations: int,
        seed: int,
        aug_scale: Sequence[float],
        aug_max_shift: float,
        token_features: bool = False,
        device: str | torch.device = "cpu",
        fusion: str | None = None,
    ) -> CachedTeacher:
        """Open a cache after checking it was built for exactly this request.

        Each field the trainer depends on is compared and a difference is a
        :class:`CacheMismatchError` naming the field, both values and the rebuild command; a
        missing or altered shard is a :class:`CacheCorruptError` naming the file.

        ``fusion`` (a fusion teacher spec) also serves that teacher's per-item states
        (:attr:`TeacherOutputs.fusion`) and loads its pair head (``self.fusion``); the cache must
        have been built with the same fusion teacher (same weights).
        """
        from clipdistill.models.spec import parse_fusion_spec, parse_spec

        path = Path(path)
        manifest = read_manifest(path)
        spec = str(parse_spec(teacher_spec))
        fusion_spec = str(parse_fusion_spec(fusion)) if fusion else None
        try:
            fingerprint = teacher_fingerprint(spec)
        except (OSError, ValueError):  # the teacher folder may be gone: the cache is all we need
            fingerprint = None
        prep = preprocessing(image_size, k_augmentations, seed, aug_scale, aug_max_shift)
        hint = rebuild_hint(path, spec, dataset, split, prep, token_features, fusion_spec)
        subset = dataset.split(split)
        cached_prep = manifest["preprocessing"]

        def refuse(field: str, cached: Any, requested: Any) -> CacheMismatchError:
            return CacheMismatchError(
                f"teacher cache {path} was built for {field}={cached!r} but {field}={requested!r} was requested; {hint}"
            )

        teacher = manifest["teacher"]
        if not same_teacher(teacher, spec, fingerprint):
            cached = teacher["spec"] + (f" (weights {teacher['fingerprint'][:12]})" if teacher["fingerprint"] else "")
            requested = spec + (f" (weights {fingerprint[:12]})" if fingerprint else "")
            raise refuse("teacher", cached, requested)
        if manifest["dataset"]["split"] != split:
            raise refuse("split", manifest["dataset"]["split"], split)
        requested_fingerprint = dataset_fingerprint(subset)
        if manifest["dataset"]["fingerprint"] != requested_fingerprint:
            raise CacheMismatchError(
                f"teacher cache {path} was built for another dataset: dataset_fingerprint="
                f"{manifest['dataset']['fingerprint'][:12]} in the cache but {requested_fingerprint[:12]} for "
                f"{subset.name} (image ids, caption ids or caption texts differ); {hint}"
            )
        for field in ("k_augmentations", "image_size", "seed", "aug_scale", "aug_max_shift", "pipeline"):
            if cached_prep.get(field) != prep[field]:
                raise refuse(field, cached_prep.get(field), prep[field])
        if cached_prep.get("hash") != prep["hash"]:
            raise refuse("preprocessing_hash", cached_prep.get("hash"), prep["hash"])
        if token_features and not manifest.get("token_features"):
            raise refuse("token_features", False, True)
        fusion_teacher = None
        if fusion_spec is not None:
            cached_fusion = manifest.get("fusion")
            if not cached_fusion:
                raise refuse("fusion", None, fusion_spec)
            try:
                fusion_fingerprint = teacher_fingerprint(fusion_spec)
            except (OSError, ValueError):
                fusion_fingerprint = None
            if not same_teacher(cached_fusion, fusion_spec, fusion_fingerprint):
                raise refuse("fusion", cached_fusion["spec"], fusion_spec)
            from clipdistill.models.fusion import load_fusion_teacher

            # Only the pair head is needed: the states it scores come from the cache.
            fusion_teacher = load_fusion_teacher(fusion_spec, with_encoders=False)
        loaded = cls._load(path, manifest, token_features=token_features, device="cpu", fusion=fusion_spec is not None)
        loaded.fusion = fusion_teacher
        loaded.device = device
        return loaded

    @classmethod
    def _load(
        cls,
        path: Path,
        manifest: dict[str, Any],
        *,
        token_features: bool,
        device: str | torch.device,
        fusion: bool = False,
    ) -> Any:
        from safetensors import safe_open

        k = int(manifest["preprocessing"]["k_augmentations"])
        image_ids: list[str] = manifest["image_ids"]
        caption_ids: list[str] = manifest["caption_ids"]

        def load(kind: str, tensor: str, on_disk: bool = False) -> tuple[Any, list[str], torch.Tensor | None]:
            files, keys = [], []
            extra_names: list[str] = []
            for entry in manifest["shards"][kind]:
                file = path / entry["file"]
                if not file.is_file():
                    raise CacheCorruptError(f"teacher cache shard {file} is missing; rebuild the cache")
                if file_sha256(file) != entry["sha256"]:
                    raise CacheCorruptError(
                        f"teacher cache shard {file} fails its sha256 checksum (corrupt or changed since the "
                        "manifest was written); rebuild the cache"
                    )
                with safe_open(str(file), framework="pt") as handle:
                    meta = handle.metadata() or {}
                    shard_keys = json.loads(meta.get("keys", "[]"))
                    start, rows = int(entry["start"]), int(entry["rows"])
                    header_kind = HEADER_OF[kind]
                    expected = (
                        image_row_keys(image_ids, k, start, start + rows)[0]
                        if header_kind in ("images", "fusion_images")
                        else caption_ids[start : start + rows]
                    )
                    header = manifest["shard_headers"][header_kind]
                    if meta.get("header") != header or shard_keys != expected:
                        raise CacheCorruptError(f"teacher cache shard {file} belongs to another build; rebuild")
                    if kind in FUSION_KINDS:
                        extra_names = [name for name in handle.keys() if name != tensor]  # noqa: SIM118 (not a dict)
                files.append(file)
                keys.extend(shard_keys)
            loaded_extra[kind] = {name: stack_shards(files, name) for name in extra_names}
            augs = stack_shards(files, "aug_ids") if kind == "images" else None
            return (ShardRows(files, tensor) if on_disk else stack_shards(files, tensor)), keys, augs

        loaded_extra: dict[str, dict[str, torch.Tensor]] = {}

        image_table, image_keys, aug_ids = load("images", "embeddings")
        text_table, text_keys, _ = load("texts", "embeddings")
        assert aug_ids is not None
        image_rows = {(key, int(a)): row for row, (key, a) in enumerate(zip(image_keys, aug_ids.tolist(), strict=True))}
        text_rows = {key: row for row, key in enumerate(text_keys)}
        # Token features and fusion states stay in the shards (ShardRows): a batch reads its rows.
        image_tokens = load("image_tokens", "tokens", on_disk=True)[0] if token_features else None
        text_tokens = load("text_tokens", "tokens", on_disk=True)[0] if token_features else None
        fusion_tables: dict[str, torch.Tensor | ShardRows] = {}
        if fusion:
            fusion_tables["image"] = load("fusion_images", "states", on_disk=True)[0]
            fusion_tables["image_global"] = loaded_extra["fusion_images"]["global"]
            fusion_tables["text_flat"] = load("fusion_texts", "states", on_disk=True)[0]
            lengths = loaded_extra["fusion_texts"]["lengths"]
            fusion_tables["text_lengths"] = lengths
            fusion_tables["text_offsets"] = torch.cumsum(lengths, 0) - lengths
            fusion_tables["text_global"] = loaded_extra["fusion_texts"]["global"]
        return cls(
            path,
            manifest,
            image_table,
            image_rows,
            text_table,
            text_rows,
            image_tokens,
            text_tokens,
            device,
            fusion_tables=fusion_tables,
        )

    def _rows_for_images(self, batch: Batch) -> torch.Tensor:
        augs = [int(a) for a in batch.aug_ids.tolist()]
        rows = []
        for image_id, aug in zip(batch.image_ids, augs, strict=True):
            row = self._image_rows.get((image_id, aug))
            if row is None:
                raise CacheKeyError(
                    f"image {image_id!r} with augmentation {aug} is not in the teacher cache {self.path} "
                    f"(it holds augmentations 0..{self.k_augmentations - 1} of the "
                    f"{self.manifest['dataset']['split']!r} split's images)"
                )
            rows.append(row)
        return torch.tensor(rows, dtype=torch.long, device=self._device)

    def _rows_for_captions(self, batch: Batch) -> torch.Tensor:
        rows = []
        for caption_id in batch.caption_ids:
            row = self._text_rows.get(caption_id)
            if row is None:
                raise CacheKeyError(
                    f"caption {caption_id!r} is not in the teacher cache {self.path} "
                    f"(it holds the {self.manifest['dataset']['split']!r} split's captions)"
                )
            rows.append(row)
        return torch.tensor(rows, dtype=torch.long, device=self._device)

    def __call__(self, batch: Batch) -> TeacherOutputs:
        image_rows = self._rows_for_images(batch)
        text_rows = self._rows_for_captions(batch)
        tables = self._tables
        image_tokens, text_tokens = tables["image_tokens"], tables["text_tokens"]
        assert tables["image"] is not None and tables["text"] is not None
        return TeacherOutputs(
            image=tables["image"].index_select(0, image_rows),
            text=tables["text"].index_select(0, text_rows),
            logit_scale=self.logit_scale,
            image_tokens=None if image_tokens is None else image_tokens.index_select(0, image_rows),
            text_tokens=None if text_tokens is None else text_tokens.index_select(0, text_rows),
            fusion=self._fusion_states(image_rows, text_rows) if self._fusion_tables else None,
        )

    def _fusion_states(self, image_rows: torch.Tensor, text_rows: torch.Tensor) -> Any:
        """The batch's fusion states: image rows gathered, captions re-padded to the batch's
        longest (zeros + mask, as the fusion teacher pads them online)."""
        from clipdistill.models.fusion import FusionStates

        tables = self._fusion_tables
        lengths = tables["text_lengths"].index_select(0, text_rows)
        starts = tables["text_offsets"].index_select(0, text_rows)
        positions = torch.arange(int(lengths.max()), device=self._device)
        mask = positions[None, :] < lengths[:, None]
        flat_index = (starts[:, None] + positions[None, :]).clamp(max=tables["text_flat"].shape[0] - 1)
        text = tables["text_flat"][flat_index]
        text = torch.where(mask.view(*mask.shape, *([1] * (text.dim() - 2))), text, torch.zeros_like(text))
        return FusionStates(
            image=tables["image"].index_select(0, image_rows),
            image_global=tables["image_global"].index_select(0, image_rows),
            text=text,
            text_mask=mask,
            text_global=tables["text_global"].index_select(0, text_rows),
        )


def stack_shards(files: list[Path], name: str) -> torch.Tensor:
    """Tensor ``name`` of every shard in ``files``, rows in order, in one tensor allocated once.

    Parts joined with ``torch.cat`` would hold every row twice at the join, and a fusion cache's
    tables are over a GB for the emoji set; the shapes come from the shards' headers first."""
    from safetensors import safe_open

    lengths = []
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            lengths.append(int(handle.get_slice(name).get_shape()[0]))
    table: torch.Tensor | None = None
    offset = 0
    for file, length in zip(files, lengths, strict=True):
        with safe_open(str(file), framework="pt") as handle:
            part = handle.get_tensor(name)
        if table is None:
            table = part.new_empty((sum(lengths), *part.shape[1:]))
        table[offset : offset + length] = part
        offset += length
    if table is None:
        raise CacheCorruptError(f"no shard holds {name!r}; rebuild the cache")
    return table
