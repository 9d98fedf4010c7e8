"""Tests for the builtin emoji dataset (clipdistill.data.emoji).

They need Debian's fonts-noto-color-emoji and unicode-cldr-core (``make install`` installs
both); without them every test here is skipped with that reason. Builds use ``limit=`` so the
default suite stays fast; the one full build is marked ``slow``.
"""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipdistill.data import emoji
from clipdistill.data.dataset import DatasetError, PairedDataset
from clipdistill.data.emoji import (
    DEFAULT_CLDR_DIR,
    DEFAULT_FONT,
    EmojiDataError,
    EmojiEntry,
    GlyphRenderer,
    assign_splits,
    build_emoji_dataset,
    concept_of,
    load_cldr_entries,
    load_font,
    make_captions,
)

_MISSING = [str(p) for p in (DEFAULT_FONT, DEFAULT_CLDR_DIR / "annotations" / "en.xml") if not p.is_file()]
needs_system_data = pytest.mark.skipif(
    bool(_MISSING),
    reason=f"missing {', '.join(_MISSING)}: run `apt-get install {emoji.APT_PACKAGES}` (or make install)",
)

LIMIT = 300  # enough for several multi-variant concepts (the skin-tone people) in every split
SIZE = 32


@pytest.fixture(scope="session")
def renderer() -> GlyphRenderer:
    if _MISSING:
        pytest.skip(f"missing {', '.join(_MISSING)}")
    return GlyphRenderer(load_font(DEFAULT_FONT))


@pytest.fixture(scope="session")
def small_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PairedDataset]:
    """One limited build shared by the read-only tests (~2 s)."""
    if _MISSING:
        pytest.skip(f"missing {', '.join(_MISSING)}")
    out = tmp_path_factory.mktemp("emoji")
    return out, build_emoji_dataset(out, size=SIZE, seed=0, limit=LIMIT, progress=False)


def _doc(out: Path) -> dict:
    return json.loads((out / "dataset.json").read_text(encoding="utf-8"))


def _ink_column_runs(image: Image.Image) -> int:
    """Number of separate horizontal stretches of non-white pixels (1 = one blob)."""
    ink = (np.asarray(image.convert("RGB")).astype(int) < 235).any(axis=2).any(axis=0)
    return int(np.count_nonzero(np.diff(np.concatenate([[0], ink.astype(int)])) == 1))


# --------------------------------------------------------------------------- pure logic


def test_concept_strips_skin_tone_and_gender() -> None:
    assert concept_of("woman raising hand: medium skin tone") == "raising hand"
    assert concept_of("man raising hand") == "raising hand"
    assert concept_of("person raising hand") == "raising hand"
    assert concept_of("family: man, woman, boy") == "family"
    assert concept_of("woman and man holding hands: dark skin tone") == "holding hands"
    assert concept_of("man: red hair") == concept_of("woman: red hair") == "person: red hair"
    assert concept_of("flag: France") == "flag: france"
    assert concept_of("keycap: 9") != concept_of("keycap: 8")
    assert concept_of("grinning face") == "grinning face"
    assert concept_of("deaf man: dark skin tone") == concept_of("deaf person") == "deaf person"
    assert concept_of("old woman") == concept_of("older person") == "old person"
    assert concept_of("woman’s hat") == "woman’s hat"


def test_captions_for_entry_without_keywords_still_two() -> None:
    entry = EmojiEntry(text="\U0001f1eb\U0001f1f7", name="flag: France", keywords=("flag",))
    captions = make_captions(entry, seed=0)
    assert captions[0] == "flag: France"
    assert 2 <= len(captions) <= 5
    assert len({c.lower() for c in captions}) == len(captions)
    assert make_captions(entry, seed=0) == captions


def test_assign_splits_is_by_concept_and_near_80_10_10() -> None:
    """On the real CLDR concept sizes (no rendering needed) the split hits 80/10/10."""
    if _MISSING:
        pytest.skip(f"missing {', '.join(_MISSING)}")
    sizes = collections.Counter(concept_of(e.name) for e in load_cldr_entries(DEFAULT_CLDR_DIR))
    total = sum(sizes.values())
    for seed in (0, 1):
        assignment = assign_splits(dict(sizes), seed)
        counts = collections.Counter()
        for concept, n in sizes.items():
            counts[assignment[concept]] += n
        assert abs(counts["train"] / total - 0.8) < 0.02, counts
        assert abs(counts["val"] / total - 0.1) < 0.02, counts
        assert abs(counts["test"] / total - 0.1) < 0.02, counts
    assert assign_splits(dict(sizes), 0) == assign_splits(dict(sizes), 0)
    assert assign_splits(dict(sizes), 0) != assign_splits(dict(sizes), 1)


# --------------------------------------------------------------------------- rendering


@needs_system_data
@pytest.mark.parametrize(
    "text",
    [
        "\U0001f469\u200d\U0001f4bb",  # woman technologist (ZWJ)
        "\U0001f468\u200d\U0001f469\u200d\U0001f467",  # family: man, woman, girl (ZWJ)
        "\U0001f44b\U0001f3fd",  # waving hand: medium skin tone (modifier)
        "#\u20e3",  # keycap: # (CLDR form, without U+FE0F)
        "\U0001f3f4\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f",  # flag: England (tags)
    ],
)
def test_sequences_render_as_one_glyph(renderer: GlyphRenderer, text: str) -> None:
    assert renderer.is_single_glyph(text)
    image, reason = renderer.render(text, 64)
    assert reason == "ok" and image is not None
    assert image.size == (64, 64) and image.mode == "RGB"
    assert _ink_column_runs(image) == 1, "expected one blob, not glyphs side by side"


@needs_system_data
def test_flag_renders_in_colour(renderer: GlyphRenderer) -> None:
    image, reason = renderer.render("\U0001f1eb\U0001f1f7", 64)  # flag: France
    assert reason == "ok" and image is not None
    left = np.asarray(image)[24:40, 12:20].reshape(-1, 3).mean(axis=0)
    right = np.asarray(image)[24:40, 44:52].reshape(-1, 3).mean(axis=0)
    assert left[2] > left[0] + 50, f"left of the French flag should be blue, got {left}"
    assert right[0] > right[2] + 50, f"right of the French flag should be red, got {right}"


@needs_system_data
def test_bad_sequences_are_rejected(renderer: GlyphRenderer) -> None:
    assert renderer.render("\U0001f600\U0001f600", 64) == (None, "multi_glyph")
    assert renderer.render("\U0001f600\u200d\U0001f600", 64) == (None, "multi_glyph")  # no such ligature
    assert renderer.render("\U0001f1ff\U0001f1ff", 64) == (None, "missing")  # "ZZ" is no region
    assert renderer.render("{", 64) == (None, "missing")  # CLDR names it; the font has no glyph


# --------------------------------------------------------------------------- built dataset


@needs_system_data
def test_build_returns_paired_dataset(small_build: tuple[Path, PairedDataset]) -> None:
    out, dataset = small_build
    assert len(dataset) == LIMIT
    assert dataset.name == "emoji"
    for record in dataset.images:
        assert record.path.is_absolute() and record.path.is_file()
        assert record.path == out.resolve() / "images" / f"{record.image_id}.png"
        assert record.concept
    with Image.open(dataset.images[0].path) as image:
        assert image.size == (SIZE, SIZE)
    assert "1f600" in {r.image_id for r in dataset.images}  # grinning face, id = hex codepoints


@needs_system_data
def test_karpathy_format(small_build: tuple[Path, PairedDataset]) -> None:
    out, dataset = small_build
    doc = _doc(out)
    assert (doc["dataset"], doc["size"], doc["seed"]) == ("emoji", SIZE, 0)
    sentids = []
    for imgid, item in enumerate(doc["images"]):
        assert item["imgid"] == imgid
        assert item["split"] in ("train", "val", "test")
        assert (out / item["filepath"] / item["filename"]).is_file()
        assert item["filename"] == f"{item['image_id']}.png"
        assert item["sentids"] == [s["sentid"] for s in item["sentences"]]
        for sentence in item["sentences"]:
            assert sentence["raw"].strip()
            assert sentence["tokens"] and all(t == t.lower() for t in sentence["tokens"])
        sentids.extend(item["sentids"])
    assert len(sentids) == len(set(sentids)) == dataset.n_texts()


@needs_system_data
def test_karpathy_reader_reads_it_back(small_build: tuple[Path, PairedDataset]) -> None:
    from clipdistill.data.karpathy import read_karpathy

    out, dataset = small_build
    again = read_karpathy(out / "dataset.json", image_root=out.resolve())
    assert [r.image_id for r in again.images] == [r.image_id for r in dataset.images]
    assert [r.split for r in again.images] == [r.split for r in dataset.images]
    assert [r.concept for r in again.images] == [r.concept for r in dataset.images]
    assert again.caption_ids() == dataset.caption_ids()
    assert again.texts() == dataset.texts()


@needs_system_data
def test_captions_rules(small_build: tuple[Path, PairedDataset]) -> None:
    out, dataset = small_build
    names = {item["image_id"]: item["name"] for item in _doc(out)["images"]}
    for record in dataset.images:
        texts = [c.text for c in record.captions]
        assert 2 <= len(texts) <= 5, texts
        assert all(t.strip() for t in texts)
        assert len({t.lower() for t in texts}) == len(texts), texts
        assert texts[0] == names[record.image_id]


@needs_system_data
def test_no_concept_in_two_splits(small_build: tuple[Path, PairedDataset]) -> None:
    _, dataset = small_build
    splits_of: dict[str, set[str]] = collections.defaultdict(set)
    for record in dataset.images:
        splits_of[record.concept].add(record.split)
    assert all(len(splits) == 1 for splits in splits_of.values())
    assert set(dataset.split_counts()) == {"train", "val", "test"}
    # gender variants really are grouped (the first 300 in CLDR order have no skin tones yet)
    assert max(collections.Counter(r.concept for r in dataset.images).values()) >= 3


@needs_system_data
def test_deterministic_for_seed(tmp_path: Path, small_build: tuple[Path, PairedDataset]) -> None:
    out, dataset = small_build
    same = build_emoji_dataset(tmp_path / "a", size=SIZE, seed=0, limit=LIMIT, progress=False)
    assert (tmp_path / "a" / "dataset.json").read_bytes() == (out / "dataset.json").read_bytes()
    assert [(r.split, r.captions) for r in same.images] == [(r.split, r.captions) for r in dataset.images]
    other = build_emoji_dataset(tmp_path / "a", size=SIZE, seed=1, limit=LIMIT, progress=False)
    assert [r.image_id for r in other.images] == [r.image_id for r in dataset.images]
    assert [r.split for r in other.images] != [r.split for r in dataset.images]
    assert _doc(tmp_path / "a")["skipped"]["reused"] == LIMIT  # new seed reuses the PNGs


@needs_system_data
def test_rerun_of_finished_build_does_not_render(
    small_build: tuple[Path, PairedDataset], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, dataset = small_build

    def no_font(*_: object) -> None:
        raise AssertionError("a finished build must not be rendered again")

    monkeypatch.setattr(emoji, "load_font", no_font)
    started = time.perf_counter()
    again = build_emoji_dataset(out, size=SIZE, seed=0, limit=LIMIT, progress=False)
    assert time.perf_counter() - started < 5
    assert again.images == dataset.images


# --------------------------------------------------------------------------- errors


def test_missing_font_names_path_and_fix(tmp_path: Path) -> None:
    missing = tmp_path / "NoSuchEmoji.ttf"
    with pytest.raises(EmojiDataError, match="apt-get install") as info:
        build_emoji_dataset(tmp_path / "out", font_path=missing, progress=False)
    assert str(missing) in str(info.value)
    assert "fonts-noto-color-emoji" in str(info.value)
    assert isinstance(info.value, DatasetError)
    assert not (tmp_path / "out" / "dataset.json").exists()


@needs_system_data
def test_missing_cldr_names_path_and_fix(tmp_path: Path) -> None:
    with pytest.raises(EmojiDataError, match="apt-get install") as info:
        build_emoji_dataset(tmp_path / "out", cldr_dir=tmp_path / "nocldr", progress=False)
    assert str(tmp_path / "nocldr") in str(info.value)
    assert "unicode-cldr-core" in str(info.value)


@needs_system_data
def test_pillow_without_raqm_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(emoji.features, "check", lambda name: name != "raqm")
    with pytest.raises(EmojiDataError, match="raqm") as info:
        build_emoji_dataset(tmp_path / "out", limit=5, progress=False)
    assert "apt-get install" in str(info.value)


# --------------------------------------------------------------------------- full set


@needs_system_data
@pytest.mark.slow
def test_full_build(tmp_path: Path) -> None:
    """The whole font (~3,600 images, ~20 s on 2 cores): size, 80/10/10 and concept isolation."""
    dataset = build_emoji_dataset(tmp_path, size=64, seed=0, progress=False)
    assert len(dataset) >= 3400
    counts = dataset.split_counts()
    for split, share in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
        assert abs(counts[split] / len(dataset) - share) < 0.02, counts
    splits_of: dict[str, set[str]] = collections.defaultdict(set)
    for record in dataset.images:
        splits_of[record.concept].add(record.split)
    assert all(len(s) == 1 for s in splits_of.values())
    assert dataset.missing_images() == []
