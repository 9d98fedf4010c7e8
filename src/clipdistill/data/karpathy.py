"""Karpathy-split JSON (Flickr8k, Flickr30K, COCO): read it, and write it back.

This is the format retrieval papers evaluate on, and the builtin emoji set is written in it
too, so one reader serves real and embedded data. Bad input is refused with a message that
names the file, the image index, the field and the value: a user with a 30K-image file needs
to know *where* to look, not that "a KeyError occurred".
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, NoReturn

from clipdistill.data.bad_samples import BadSamples, invalid_byte, is_clean_text
from clipdistill.data.dataset import Caption, DatasetError, ImageRecord, PairedDataset, make_dataset
from clipdistill.io import atomic_write_json

__all__ = ["VALID_SPLITS", "canonical_split", "read_karpathy", "write_karpathy"]

# Karpathy's files use "restval" for the COCO val images moved into training.
VALID_SPLITS = ("train", "val", "test", "restval")
_SPLIT_ALIASES = {"train": "train", "val": "val", "test": "test", "restval": "train"}


def canonical_split(value: object) -> str | None:
    """Map a split as written in a file to ours (``restval`` → ``train``); ``None`` if invalid."""
    return _SPLIT_ALIASES.get(value) if isinstance(value, str) else None


def _bad(source: Path, where: str, problem: str) -> NoReturn:
    """The one place per-sample problems are raised, so a later skip policy has one hook."""
    raise DatasetError(f"{source}: {where} {problem}")


def _load_json(json_path: Path) -> Any:
    try:
        raw = Path(json_path).read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{json_path}: file not found") from None
    except IsADirectoryError:
        raise DatasetError(f"{json_path}: is a directory, expected a Karpathy JSON file") from None
    # Bytes that are not UTF-8 survive as lone surrogates, so the field holding them is named
    # (and, under --on-bad-sample skip, only that sample dropped) instead of the whole file refused.
    text = raw.decode("utf-8", errors="surrogateescape")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DatasetError(
            f"{json_path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}"
        ) from None


def _image_list(json_path: Path, top: Any) -> list[Any]:
    if not isinstance(top, dict):
        _bad(json_path, "top level", f"is a {type(top).__name__}, expected an object with an 'images' list")
    if "images" not in top:
        _bad(json_path, "top level", f"has no field 'images' (fields: {', '.join(map(str, top)) or 'none'})")
    images = top["images"]
    if not isinstance(images, list):
        _bad(json_path, "top level", f"field 'images' is a {type(images).__name__}, expected a list")
    return images


def _required_str(source: Path, where: str, item: dict[str, Any], key: str) -> str:
    if key not in item:
        _bad(source, where, f"has no field {key!r}")
    value = item[key]
    if not isinstance(value, str):
        _bad(source, where, f"field {key!r} has value {value!r} (expected a string)")
    if not value.strip():
        _bad(source, where, f"field {key!r} is empty")
    _check_utf8(source, where, key, value)
    return value


def _check_utf8(source: Path, where: str, key: str, value: str) -> None:
    if not is_clean_text(value):
        _bad(source, where, f"field {key!r} is not valid UTF-8 (byte {invalid_byte(value)})")


def _optional_str(source: Path, where: str, item: dict[str, Any], key: str) -> str | None:
    value = item.get(key)
    if value is None:
        return value
    if isinstance(value, str):
        _check_utf8(source, where, key, value)
        return value
    _bad(source, where, f"field {key!r} has value {value!r} (expected a string)")


def _id_field(source: Path, where: str, item: dict[str, Any], key: str) -> str | None:
    """An id written as an int (cocoid, imgid, sentid) or a string; ``None`` when absent."""
    value = item.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str) or str(value) == "":
        _bad(source, where, f"field {key!r} has value {value!r} (expected an integer or a non-empty string)")
    return str(value)


def _split(source: Path, where: str, item: dict[str, Any]) -> str:
    if "split" not in item:
        _bad(source, where, "has no field 'split'")
    split = canonical_split(item["split"])
    if split is None:
        _bad(source, where, f"field 'split' has value {item['split']!r} (valid: {', '.join(VALID_SPLITS)})")
    return split


def _caption(source: Path, where: str, sentence: Any, image_id: str, k: int) -> Caption:
    if not isinstance(sentence, dict):
        _bad(source, where, f"is a {type(sentence).__name__}, expected an object with a 'raw' field")
    text = _required_str(source, where, sentence, "raw")
    # An explicit caption_id (written by write_karpathy for non-numeric ids) wins over sentid.
    caption_id = _optional_str(source, where, sentence, "caption_id") or _id_field(source, where, sentence, "sentid")
    return Caption(caption_id=caption_id or f"{image_id}#{k}", text=text.strip())


def _captions(source: Path, where: str, item: dict[str, Any], image_id: str, issues: BadSamples) -> tuple[Caption, ...]:
    if "sentences" not in item:
        _bad(source, where, "has no field 'sentences'")
    sentences = item["sentences"]
    if not isinstance(sentences, list):
        _bad(source, where, f"field 'sentences' is a {type(sentences).__name__}, expected a list")
    if not sentences:
        _bad(source, where, "field 'sentences' is empty (an image needs at least one caption)")
    captions = []
    for k, sentence in enumerate(sentences):
        try:
            captions.append(_caption(source, f"{where}.sentences[{k}]", sentence, image_id, k))
        except DatasetError as error:  # one bad caption costs that caption, not its image
            issues.bad(str(source), f"{where}.sentences[{k}]", _reason(error, source), kind="caption")
    if not captions:
        _bad(source, where, "has no usable caption left")
    return tuple(captions)


def _reason(error: DatasetError, source: Path) -> str:
    """The problem part of a ``_bad`` message (``source: where problem`` → ``problem``)."""
    text = str(error)
    prefix = f"{source}: "
    if text.startswith(prefix):
        text = text[len(prefix) :]
        if " " in text:
            text = text.split(" ", 1)[1]
    return text


def _parse_image(source: Path, index: int, item: Any, image_root: Path, issues: BadSamples) -> ImageRecord:
    """One ``images[i]`` entry → :class:`ImageRecord`; raises via :func:`_bad` on any problem."""
    where = f"images[{index}]"
    if not isinstance(item, dict):
        _bad(source, where, f"is a {type(item).__name__}, expected an object")
    filename = _required_str(source, where, item, "filename")
    filepath = _optional_str(source, where, item, "filepath")
    relative = Path(filepath, filename) if filepath else Path(filename)
    image_id = (
        _id_field(source, where, item, "image_id")
        or _id_field(source, where, item, "cocoid")
        or _id_field(source, where, item, "imgid")
        or relative.as_posix()
    )
    split = _split(source, where, item)
    return ImageRecord(
        image_id=image_id,
        path=image_root / relative,
        split=split,
        captions=_captions(source, where, item, image_id, issues),
        concept=_optional_str(source, where, item, "concept") or "",
        origin=where,
    )


def read_karpathy(
    json_path: Path, image_root: Path | None = None, name: str | None = None, issues: BadSamples | None = None
) -> PairedDataset:
    """Read a Karpathy-split JSON into a :class:`PairedDataset`.

    Image path = ``image_root / filepath / filename`` (``filepath`` is COCO's ``train2014`` or
    ``val2014``; ``image_root`` defaults to the JSON's folder). ``restval`` is read as train.
    Ids: an explicit ``image_id`` string, else ``cocoid``, else ``imgid``, else the relative
    path; captions use ``sentid`` (else ``<image_id>#<k>``) so cache keys survive reordering.
    Caption text is stripped of surrounding whitespace. ``issues`` sets what a bad image or
    caption does (default: stop with file, index, field and value).
    """
    issues = issues if issues is not None else BadSamples("error")
    json_path = Path(json_path)
    top = _load_json(json_path)
    images = _image_list(json_path, top)
    root = Path(image_root) if image_root is not None else json_path.parent
    records = []
    for index, item in enumerate(images):
        try:
            records.append(_parse_image(json_path, index, item, root, issues))
        except DatasetError as error:
            if issues.policy == "error":
                raise
            issues.bad(str(json_path), f"images[{index}]", _reason(error, json_path))
    if name is None:
        declared = top.get("dataset")
        name = declared if isinstance(declared, str) and declared else json_path.stem
    return make_dataset(name, records, source=str(json_path), issues=issues)


def _relative_to_root(path: Path, image_root: Path) -> Path:
    """``path`` relative to ``image_root`` when it lies under it, else absolute."""
    for candidate, root in ((path, image_root), (path.absolute(), image_root.absolute())):
        if candidate.is_relative_to(root):
            return candidate.relative_to(root)
    return path.absolute()


def _tokens(text: str) -> list[str]:
    # Karpathy files carry lower-cased word tokens; some tools read them, we never do.
    return re.findall(r"\w+", text.lower())


def _caption_entry(caption: Caption, image_id: str, k: int, imgid: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"raw": caption.text, "tokens": _tokens(caption.text), "imgid": imgid}
    if re.fullmatch(r"0|[1-9][0-9]*", caption.caption_id):
        entry["sentid"] = int(caption.caption_id)
    elif caption.caption_id != f"{image_id}#{k}":
        entry["caption_id"] = caption.caption_id
    return entry


def _image_entry(record: ImageRecord, imgid: int, image_root: Path) -> dict[str, Any]:
    relative = _relative_to_root(Path(record.path), image_root)
    entry: dict[str, Any] = {"filename": relative.name}
    if str(relative.parent) != ".":
        entry["filepath"] = relative.parent.as_posix()
    entry.update(
        image_id=record.image_id,  # explicit, so ids survive even though imgid is just the position
        imgid=imgid,
        split=record.split,
        sentences=[_caption_entry(c, record.image_id, k, imgid) for k, c in enumerate(record.captions)],
    )
    if record.concept:
        entry["concept"] = record.concept
    return entry


def write_karpathy(dataset: PairedDataset, json_path: Path, image_root: Path | None = None) -> None:
    """Write ``dataset`` as Karpathy JSON (atomically) so :func:`read_karpathy` reads it back equal.

    Paths are stored relative to ``image_root`` (default: the JSON's folder) when the image lies
    under it, so the folder can be moved as a whole; others are stored absolute.
    """
    json_path = Path(json_path)
    root = Path(image_root) if image_root is not None else json_path.parent
    payload = {
        "dataset": dataset.name,
        "images": [_image_entry(record, index, root) for index, record in enumerate(dataset.images)],
    }
    atomic_write_json(json_path, payload, indent=None)  # compact, like the published files
