"""A folder of images with a same-named ``.txt`` of captions beside each (``a.jpg`` + ``a.txt``).

The lowest-effort way to bring your own data. Because nothing declares what belongs together,
the reader is strict about pairing: an image without captions, captions without an image, or
two images sharing one caption file are errors rather than silently dropped samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

from clipdistill.data.bad_samples import BadSamples
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


def _pair_files(root: Path, issues: BadSamples) -> list[tuple[Path, Path]]:
    """Match images to caption files by (folder, stem); anything left unpaired is a bad sample."""
    images: dict[Path, Path] = {}
    texts: dict[Path, Path] = {}
    for path in _visible_files(root):
        suffix = path.suffix.lower()
        stem = path.relative_to(root).with_suffix("")
        if suffix in IMAGE_SUFFIXES:
            if stem in images:
                first, second = images[stem].relative_to(root), path.relative_to(root)
                issues.bad(
                    str(root),
                    f"{first} and {second}",
                    f"share the stem {stem.as_posix()!r} (one caption file each); the second is dropped",
                )
                continue
            images[stem] = path
        elif suffix == ".txt":
            texts[stem] = path
    if not images:
        _bad(root, "folder", f"holds no images (looked for *{', *'.join(IMAGE_SUFFIXES)} recursively)")
    for stem, text in texts.items():
        if stem not in images:
            issues.bad(
                str(root),
                f"{text.relative_to(root)}",
                f"has no image (looked for {stem.as_posix()}.{{{_ALTERNATIVES}}})",
                kind="caption",
            )
    for stem, image in images.items():
        if stem not in texts:
            issues.bad(str(root), f"{image.relative_to(root)}", f"has no caption file (expected {stem.as_posix()}.txt)")
    return [(images[stem], texts[stem]) for stem in sorted(images) if stem in texts]


def _read_captions(root: Path, text_path: Path, image_id: str) -> tuple[Caption, ...]:
    where = str(text_path.relative_to(root))
    raw = text_path.read_bytes()
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as error:
        _bad(root, where, f"is not valid UTF-8 (byte 0x{raw[error.start]:02x} at offset {error.start})")
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        _bad(root, where, "is empty (expected one caption per line)")
    return tuple(Caption(caption_id=f"{image_id}#{k}", text=text) for k, text in enumerate(texts))


def read_folder(
    root: Path, split: str = "train", name: str | None = None, issues: BadSamples | None = None
) -> PairedDataset:
    """Read ``name.{jpg,jpeg,png,webp}`` + ``name.txt`` pairs under ``root`` (recursively).

    Each non-empty line of the ``.txt`` (UTF-8) is one caption. Ids: the image's path relative
    to ``root`` without its suffix (``sub/cat``) and ``<image_id>#<k>`` for the k-th caption.
    Every image gets ``split``. Order is sorted by path, so ids and order are deterministic.
    ``issues`` sets what an unpaired or unreadable pair does (default: stop, naming the file).
    """
    issues = issues if issues is not None else BadSamples("error")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory")
    canonical = canonical_split(split)
    if canonical is None:
        raise DatasetError(f"split {split!r} for {root} is not valid (valid: {', '.join(VALID_SPLITS)})")
    records = []
    for image, text in _pair_files(root, issues):
        image_id = image.relative_to(root).with_suffix("").as_posix()
        origin = str(text.relative_to(root))
        try:
            captions = _read_captions(root, text, image_id)
        except DatasetError as error:
            if issues.policy == "error":
                raise
            issues.bad(str(root), origin, str(error).split(f"{origin} ", 1)[-1])
            continue
        records.append(ImageRecord(image_id=image_id, path=image, split=canonical, captions=captions, origin=origin))
    return make_dataset(name or root.name, records, source=str(root), issues=issues)
