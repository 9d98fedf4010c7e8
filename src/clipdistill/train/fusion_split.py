"""A split encoded once by the fusion teacher's frozen dual teacher, for fusion training.

The dual teacher is frozen, so its token features for every training image (x k replayed
augmentations) and every distinct caption are computed once; each training step then reads the
rows it needs. With the LiT teacher's encoding memo the image token rows stay in the memo (most
on disk) and only their keys are held here; every other per-row tensor (another teacher's image
tokens, the frozen patch projections, the captions' token states) is kept on disk too
(:class:`SpilledRows`), so the stage's memory does not grow with the number of images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from clipdistill.data.augment import replay_augmentation
from clipdistill.data.dataset import PairedDataset
from clipdistill.data.images import load_image_tensor, to_unit
from clipdistill.models.base import DualEncoder
from clipdistill.models.fusion import FusionEncoder, pad_texts
from clipdistill.models.row_spill import RowSpill


@dataclass(frozen=True)
class Augmentation:
    """The replayed augmentation of the training views (data/augment.py): seed, scale range, shift."""

    seed: int
    scale: Sequence[float]
    max_shift: float


class SpilledRows:
    """A split's per-row tensors on disk (one unlinked temporary file, models/row_spill.py), read
    back by position with the same bits. Held in memory, the patch projections and the captions'
    token states made the fusion stage grow with the images: on 7,260 images it peaked at 4.5 GiB
    with them in memory and 3.6 GiB with them here (docs/results.md, "Memory, disk and time
    against the number of images"). A batch's rows come back from the page cache at the cost of a
    copy."""

    def __init__(self) -> None:
        self._spill = RowSpill()
        self._count = 0

    def put(self, index: int, row: torch.Tensor) -> None:
        """Keep ``row`` as row ``index`` (rows may come in any order)."""
        self._spill.write(index.to_bytes(8, "little"), row)
        self._count = max(self._count, index + 1)

    def append(self, row: torch.Tensor) -> None:
        self.put(self._count, row)

    def __len__(self) -> int:
        return self._count

    def read(self, picked: Sequence[int]) -> list[torch.Tensor]:
        rows = []
        for index in picked:
            row = self._spill.read(int(index).to_bytes(8, "little")) if 0 <= index < self._count else None
            if row is None:
                raise IndexError(f"row {index} of {self._count} spilled rows")
            rows.append(row)
        return rows


class TokenRows:
    """A split's image token rows, one (N, C) tensor each, gathered into a batch on demand.

    With the LiT teacher's encoding memo only the rows' keys are held and each batch is read from
    the memo (most rows on disk): the train split's tokens are 0.7 GB per view at 224 px on the
    emoji set and grow with the images, and the cache stage reads the same rows again."""

    def __init__(self, count: int, read: Callable[[list[int]], list[torch.Tensor]], device: torch.device) -> None:
        self.count = count
        self.read = read
        self.device = device

    @classmethod
    def spilled(cls, rows: SpilledRows, device: torch.device) -> TokenRows:
        """Rows kept on disk by ``rows`` (a teacher without the LiT memo; the patch projections)."""
        return cls(len(rows), rows.read, device)

    @classmethod
    def memoised(
        cls, keys: list[bytes], read: Callable[[list[bytes]], list[torch.Tensor]], device: torch.device
    ) -> TokenRows:
        """Rows of ``keys`` read back by ``read`` (the LiT teacher's ``image_tokens_reader()``)."""
        return cls(len(keys), lambda picked: read([keys[i] for i in picked]), device)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: torch.Tensor | slice) -> torch.Tensor:
        picked = list(range(self.count)[index]) if isinstance(index, slice) else index.tolist()
        return torch.stack(self.read(picked)).to(self.device)


@dataclass
class EncodedSplit:
    """The frozen dual teacher's raw outputs for one split, computed once.

    Image rows are image-major (row = image · k + augmentation); captions are deduplicated by
    text (``caption_text[j]`` is caption j's distinct-text index), and each distinct text's token
    features are one row of ``text_hidden`` as long as its tokens, since most captions are short."""

    image_tokens: TokenRows  # rows of (N, C)
    image_global: torch.Tensor  # (rows, D)
    texts: list[str]
    text_hidden: SpilledRows  # one (L_u, C_text) row per distinct text
    text_global: torch.Tensor  # (distinct texts, D)
    caption_text: torch.Tensor  # (captions,)
    text_to_image: torch.Tensor  # (captions,)
    k: int
    image_patches: TokenRows | None = None  # rows of (N, D): the frozen patch_proj of image_tokens, once

    def add_patches(self, encoder: FusionEncoder, chunk: int = 256) -> None:
        """Compute the encoder's frozen ``patch_proj`` of every image row once (``match="pool"``)."""
        if encoder.config.match == "pool":
            patches = SpilledRows()
            with torch.no_grad():
                tokens = self.image_tokens
                for start in range(0, len(tokens), chunk):
                    for row in encoder.patch_proj(tokens[start : start + chunk]):
                        patches.append(row)
            self.image_patches = TokenRows.spilled(patches, self.image_global.device)

    def text_batch(self, distinct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, mask = pad_texts(self.text_hidden.read(distinct.tolist()))
        device = self.image_global.device
        return hidden.to(device), mask.to(device)


@torch.no_grad()
def encode_split(
    dual: DualEncoder,
    split: PairedDataset,
    augmentation: Augmentation,
    batch_size: int,
    image_size: int,
    k: int,
    progress: bool,
) -> EncodedSplit:
    """The frozen dual teacher's raw outputs for ``split``: ``k`` replayed augmentations of every
    image (``augmentation``), every distinct caption, ``batch_size`` rows per call."""
    device = next(dual.parameters()).device
    image_ids = [record.image_id for record in split.images]
    pixels = load_image_tensor(split.image_paths(), image_size, progress=progress)
    token_rows = SpilledRows()
    token_keys: list[bytes] = []
    keys_of = getattr(dual, "image_token_keys", None)  # the LiT teacher's: rows kept by its memo
    image_global = []
    rows = [(i, a) for i in range(len(image_ids)) for a in range(k)]
    step = batch_size
    for start in range(0, len(rows), step):
        chunk = rows[start : start + step]
        index = torch.tensor([i for i, _ in chunk])
        unit = replay_augmentation(
            to_unit(pixels[index]),
            [image_ids[i] for i, _ in chunk],
            [a for _, a in chunk],
            seed=augmentation.seed,
            scale=augmentation.scale,
            max_shift=augmentation.max_shift,
        ).to(device)
        prepared = dual.prepare_pixels(unit)
        keys = keys_of(prepared) if callable(keys_of) else None
        if keys is not None:
            token_keys += keys
        else:
            for row in dual.encode_image_tokens(prepared):  # type: ignore[attr-defined]
                token_rows.append(row)
        image_global.append(dual.encode_image(prepared))

    captions = split.texts()
    distinct = list(dict.fromkeys(captions))
    where = {text: u for u, text in enumerate(distinct)}
    by_length = sorted(range(len(distinct)), key=lambda u: len(distinct[u]))  # little padding per batch
    text_hidden = SpilledRows()
    text_global = torch.empty(len(distinct), dual.embed_dim, device=device)
    for start in range(0, len(by_length), step):
        chunk = by_length[start : start + step]
        ids = dual.tokenize([distinct[u] for u in chunk]).to(device)
        embedding, hidden, mask = dual.encode_text_and_tokens(ids)  # type: ignore[attr-defined]
        text_global[chunk] = embedding
        for row, u in enumerate(chunk):
            text_hidden.put(u, hidden[row, : int(mask[row].sum())])
    return EncodedSplit(
        image_tokens=(
            TokenRows.memoised(token_keys, dual.image_tokens_reader(), device)  # type: ignore[attr-defined]
            if token_keys
            else TokenRows.spilled(token_rows, device)
        ),
        image_global=torch.cat(image_global),
        texts=distinct,
        text_hidden=text_hidden,
        text_global=text_global,
        caption_text=torch.tensor([where[text] for text in captions], device=device),
        text_to_image=torch.tensor(split.text_to_image(), device=device),
        k=k,
    )
