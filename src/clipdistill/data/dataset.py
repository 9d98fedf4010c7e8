"""The one in-memory model of a paired image-caption dataset.

Every reader (Karpathy JSON, CSV/TSV, folder, the builtin emoji set) produces a
:class:`PairedDataset`, so training, caching and evaluation never care where the data came
from. Images carry stable string ids and captions are grouped under their image, because
retrieval metrics (a query counts if *any* of its positives is retrieved) and the teacher
cache (keyed by sample id and caption id, never by row index) both depend on that grouping.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from clipdistill.data.errors import DatasetError, MissingImagesError

if TYPE_CHECKING:
    from clipdistill.data.bad_samples import BadSamples

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Caption:
    """One caption; ``caption_id`` is stable across runs (used as a cache key)."""

    caption_id: str
    text: str


@dataclass(frozen=True)
class ImageRecord:
    """One image with its captions. ``path`` is absolute (or relative to the working dir)."""

    image_id: str
    path: Path
    split: str
    captions: tuple[Caption, ...]
    concept: str = ""  # grouping key for concept-level splits (emoji); empty when unknown
    origin: str = field(default="", compare=False)  # where the source declares it: images[3], row 7, a/b.txt


@dataclass
class PairedDataset:
    """Images with stable ids, captions grouped under their image, a split per image.

    The flat views (:meth:`texts`, :meth:`text_to_image`) are what retrieval evaluation and
    contrastive training consume; they are derived, never stored, so they cannot go stale.
    """

    name: str
    images: list[ImageRecord]
    source: str = ""  # the file or folder it was read from, for error messages
    skipped: BadSamples | None = field(default=None, compare=False, repr=False)  # what --on-bad-sample skip dropped
    _by_id: dict[str, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        for index, record in enumerate(self.images):
            if record.image_id in self._by_id:
                first = self._by_id[record.image_id]
                raise DatasetError(
                    f"duplicate image id {record.image_id!r} in {self.source or self.name} "
                    f"(images #{first} and #{index})"
                )
            self._by_id[record.image_id] = index
        seen_captions: dict[str, str] = {}
        for record in self.images:
            for caption in record.captions:
                if caption.caption_id in seen_captions:
                    raise DatasetError(
                        f"duplicate caption id {caption.caption_id!r} in {self.source or self.name} "
                        f"(images {seen_captions[caption.caption_id]!r} and {record.image_id!r})"
                    )
                seen_captions[caption.caption_id] = record.image_id

    def __len__(self) -> int:
        return len(self.images)

    def split(self, name: str) -> PairedDataset:
        """The subset of images whose split is ``name`` (``train``, ``val`` or ``test``)."""
        if name not in SPLITS:
            raise DatasetError(f"unknown split {name!r}; valid splits: {', '.join(SPLITS)}")
        subset = [record for record in self.images if record.split == name]
        if not subset:
            counts = self.split_counts()
            raise DatasetError(f"split {name!r} of {self.source or self.name} is empty (splits: {counts})")
        return PairedDataset(name=f"{self.name}:{name}", images=subset, source=self.source, skipped=self.skipped)

    def split_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for record in self.images:
            counts[record.split] = counts.get(record.split, 0) + 1
        return counts

    def index_of(self, image_id: str) -> int:
        try:
            return self._by_id[image_id]
        except KeyError:
            raise DatasetError(f"unknown image id {image_id!r} in {self.source or self.name}") from None

    def texts(self) -> list[str]:
        """All captions, flattened in image order."""
        return [caption.text for record in self.images for caption in record.captions]

    def caption_ids(self) -> list[str]:
        return [caption.caption_id for record in self.images for caption in record.captions]

    def text_to_image(self) -> list[int]:
        """``text_to_image[j]`` is the index (into :attr:`images`) of caption ``j``'s image."""
        return [index for index, record in enumerate(self.images) for _ in record.captions]

    def image_paths(self) -> list[Path]:
        return [record.path for record in self.images]

    def n_texts(self) -> int:
        return sum(len(record.captions) for record in self.images)

    def missing_images(self) -> list[Path]:
        from clipdistill.data.members import member_exists  # images inside webdataset shards

        return [
            record.path for record in self.images if not Path(record.path).is_file() and not member_exists(record.path)
        ]

    def check_files(self) -> None:
        """Raise :class:`MissingImagesError` (count + first five) before any work starts."""
        missing = self.missing_images()
        if missing:
            raise MissingImagesError(missing, self.source or self.name)


def _where(record: ImageRecord, index: int) -> str:
    return record.origin or f"image #{index} ({record.image_id!r})"


def make_dataset(
    name: str, images: Iterable[ImageRecord], source: str = "", issues: BadSamples | None = None
) -> PairedDataset:
    """Build a dataset and refuse images without captions (they cannot be a retrieval target),
    bad splits and duplicate ids; with ``issues`` those go through its policy (skip keeps the first)."""
    where_from = source or name
    if issues is None:
        from clipdistill.data.bad_samples import BadSamples

        issues = BadSamples("error")
    records: list[ImageRecord] = []
    image_ids: dict[str, int] = {}
    caption_ids: dict[str, str] = {}
    for index, record in enumerate(images):
        here = _where(record, index)
        if not record.captions:
            issues.bad(where_from, here, f"({record.image_id!r}) has no captions")
            continue
        if record.split not in SPLITS:
            issues.bad(
                where_from,
                here,
                f"({record.image_id!r}): field 'split' has value {record.split!r}; valid: {', '.join(SPLITS)} "
                "(and 'restval', read as train)",
            )
            continue
        if record.image_id in image_ids:
            first = image_ids[record.image_id]
            issues.bad(where_from, here, f"duplicate image id {record.image_id!r} (images #{first} and #{index})")
            continue
        kept = []
        for caption in record.captions:
            if caption.caption_id in caption_ids:
                issues.bad(
                    where_from,
                    here,
                    f"duplicate caption id {caption.caption_id!r} (images {caption_ids[caption.caption_id]!r} "
                    f"and {record.image_id!r})",
                    kind="caption",
                )
                continue
            caption_ids[caption.caption_id] = record.image_id
            kept.append(caption)
        if not kept:
            issues.bad(where_from, here, f"({record.image_id!r}) has no captions left")
            continue
        image_ids[record.image_id] = index
        records.append(record if len(kept) == len(record.captions) else _with_captions(record, kept))
    return PairedDataset(name=name, images=records, source=source, skipped=issues)


def _with_captions(record: ImageRecord, captions: list[Caption]) -> ImageRecord:
    from dataclasses import replace

    return replace(record, captions=tuple(captions))
