"""A folder of images with a same-named ``.txt`` of captions beside each (``a.jpg`` + ``a.txt``).

The lowest-effort way to bring your own data. Because nothing declares what belongs together,
the reader is strict about pairing: an image without captions, captions without an image, or
two images sharing one caption file are errors rather than silently dropped samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

from clipdistill.data.dataset import Caption, DatasetError, ImageRecord, PairedDataset, make_dataset
from clipdistill.data.karpathy import VALID_SPLITS, canonical_split

__all__ = ["IMAGE_SUFFIXES", "find_images", "read_folder"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_ALTERNATIVES = "/".join(s.lstrip(".") for s in IMAGE_SUFFIXES)


def _bad(root: Path, where: str, problem: str) -> NoReturn:
    """The one place per-sample problems are raised, so a later skip policy has one hook."""
    raise DatasetError(f"{root}: {where} {problem}")


def _visible_files(root: Path) -> list[Path]:
    """All files under ``root`` (recursively, sorted), skipping hidden files and folders."""
    return sorted(
        path
        for path in root.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts)
    )


def find_images(root: Path) -> list[Path]:
    """Image files under ``root``; also what format detection uses to recognise a folder."""
    return [path for path in _visible_files(root) if path.suffix.lower() in IMAGE_SUFFIXES]


def _pair_files(root: Path) -> list[tuple[Path, Path]]:
    """Match images to caption files by (folder, stem); refuse anything left unpaired."""
    images: dict[Path, Path] = {}
    texts: dict[Path, Path] = {}
    for path in _visible_files(root):
        suffix = path.suffix.lower()
        stem = path.relative_to(root).with_suffix("")
        if suffix in IMAGE_SUFFIXES:
            if stem in images:
                first, second = images[stem].relative_to(root), path.relative_to(root)
                _bad(
                    root,
                    f"{first} and {second}",
                    f"share the stem {stem.as_posix()!r} (one caption file each)",
                )
            images[stem] = path
        elif suffix == ".txt":
            texts[stem] = path
    if not images:
        _bad(root, "folder", f"holds no images (looked for *{', *'.join(IMAGE_SUFFIXES)} recursively)")
    for stem, text in texts.items():
        if stem not in images:
            _bad(
                root,
                f"{text.relative_to(root)}",
                f"has no image (looked for {stem.as_posix()}.{{{_ALTERNATIVES}}})",
            )
    for stem, image in images.items():
        if stem not in texts:
            _bad(root, f"{image.relative_to(root)}", f"has no caption file (expected {stem.as_posix()}.txt)")
    return [(images[stem], texts[stem]) for stem in sorted(images)]


def _read_captions(root: Path, text_path: Path, image_id: str) -> tuple[Caption, ...]:
    where = str(text_path.relative_to(root))
    try:
        lines = text_path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        _bad(root, where, f"is not valid UTF-8 ({error.reason} at byte offset {error.start})")
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        _bad(root, where, "is empty (expected one caption per line)")
    return tuple(Caption(caption_id=f"{image_id}#{k}", text=text) for k, text in enumerate(texts))


def read_folder(root: Path, split: str = "train", name: str | None = None) -> PairedDataset:
    """Read ``name.{jpg,jpeg,png,webp}`` + ``name.txt`` pairs under ``root`` (recursively).

    Each non-empty line of the ``.txt`` (UTF-8) is one caption. Ids: the image's path relative
    to ``root`` without its suffix (``sub/cat``) and ``<image_id>#<k>`` for the k-th caption.
    Every image gets ``split``. Order is sorted by path, so ids and order are deterministic.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory")
    canonical = canonical_split(split)
    if canonical is None:
        raise DatasetError(f"split {split!r} for {root} is not valid (valid: {', '.join(VALID_SPLITS)})")
    records = []
    for image, text in _pair_files(root):
        image_id = image.relative_to(root).with_suffix("").as_posix()
        records.append(
            ImageRecord(
                image_id=image_id, path=image, split=canonical, captions=_read_captions(root, text, image_id)
            )
        )
    return make_dataset(name or root.name, records, source=str(root))
