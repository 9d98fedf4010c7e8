"""The builtin emoji dataset: Noto Color Emoji glyphs paired with CLDR names and keywords.

Why this exists: the project must train and evaluate end to end with no network, and the
machine has no image-caption corpus. Debian ships every emoji as a colour bitmap font
(``fonts-noto-color-emoji``) and an English name plus keywords for each one
(``unicode-cldr-core``), which together make a small but real paired dataset (~3,600 images).

Design choices:

* Layout goes through raqm (HarfBuzz), because ZWJ sequences, skin-tone modifiers, flags
  and keycaps are ligatures: with basic layout "woman technologist" is a woman *and* a laptop.
  Every sequence is still checked to render as ONE non-empty glyph; the rest are dropped and
  counted, so a font/CLDR version mismatch degrades the set instead of polluting it.
* The split is made **by concept** (the name without skin-tone/gender qualifiers), so the test
  split holds things never seen in training rather than a recoloured copy of a training image.
* The output is Karpathy JSON, like Flickr30K, so the one Karpathy reader serves both.
  ``dataset.json`` is written last: its presence means the build finished.
"""

from __future__ import annotations

import io
import json
import random
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageChops, ImageDraw, ImageFont, features

from clipdistill.data.dataset import SPLITS, Caption, DatasetError, ImageRecord, PairedDataset, make_dataset
from clipdistill.io import atomic_write_bytes, atomic_write_json

DEFAULT_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
DEFAULT_CLDR_DIR = Path("/usr/share/unicode/cldr/common")
# libfribidi0 is what Pillow's wheels load at run time to enable their bundled raqm.
APT_PACKAGES = "fonts-noto-color-emoji unicode-cldr-core libfribidi0"
APT_FIX = f"apt-get install {APT_PACKAGES}  (or: make install)"

# NotoColorEmoji is a CBDT bitmap font with a single 109 ppem strike; FreeType refuses other sizes.
FONT_SIZE = 109
MAX_CAPTIONS = 5
SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
WHITE = (255, 255, 255)
MARGIN = 0.04  # fraction of the square left blank around the glyph, so edges survive resizing
WRITER_THREADS = 8
FE0F = "\ufe0f"  # emoji presentation selector; CLDR strips it from its cp attributes

SKIN_TONES = frozenset(
    {
        "light skin tone",
        "medium-light skin tone",
        "medium skin tone",
        "medium-dark skin tone",
        "dark skin tone",
    }
)
PEOPLE = frozenset({"man", "woman", "person", "boy", "girl", "men", "women", "people"})
# Longest first: "woman and man holding hands" must lose the whole prefix, not just "woman ".
GENDER_PREFIXES = (
    "woman and man ",
    "man and woman ",
    "women ",
    "people ",
    "woman ",
    "person ",
    "men ",
    "man ",
)
# CLDR's gender-neutral form is sometimes a different word.
CONCEPT_ALIASES = {"older person": "old person"}
NUMBER_WORDS = frozenset({"two", "three", "four", "five"})

NAME_TEMPLATES = (
    "an emoji of {np}",
    "{np} emoji",
    "an icon showing {np}",
    "a picture of {np}",
    "a cartoon of {np}",
    "{phrase} emoji icon",
)
KEYWORD_TEMPLATES = (
    "{kw_np} emoji",
    "an emoji for {kw}",
    "emoji meaning {kw}",
    "{kw} symbol",
    "an icon about {kw}",
)
COMBINED_TEMPLATES = (
    "{np} ({kw})",
    "{np}, {kw}",
    "{phrase} emoji about {kw}",
)


class EmojiDataError(DatasetError):
    """The emoji set cannot be built: a system package is missing or its files are unusable."""


@dataclass(frozen=True)
class EmojiEntry:
    """One CLDR annotation: the emoji text (without U+FE0F), its tts name and its keywords."""

    text: str
    name: str
    keywords: tuple[str, ...]

    @property
    def image_id(self) -> str:
        return emoji_id(self.text)


@dataclass
class RenderStats:
    """Why candidates were dropped; reported so a font/CLDR mismatch is visible, not silent."""

    rendered: int = 0
    reused: int = 0
    multi_glyph: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    same_as_base: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {
            "rendered": self.rendered,
            "reused": self.reused,
            "multi_glyph": len(self.multi_glyph),
            "missing": len(self.missing),
            "same_as_base": len(self.same_as_base),
        }


def emoji_id(text: str) -> str:
    """Stable file-name-safe id: codepoints in lowercase hex joined by '-', U+FE0F removed."""
    return "-".join(f"{ord(char):x}" for char in text if char != FE0F)


# --------------------------------------------------------------------------- input checks


def check_requirements(font_path: Path, cldr_dir: Path) -> None:
    """Fail early, naming the missing path and the one command that fixes it."""
    if not font_path.is_file():
        raise EmojiDataError(f"emoji font not found: {font_path}. Install it with: {APT_FIX}")
    for xml_path in _cldr_files(cldr_dir):
        if not xml_path.is_file():
            raise EmojiDataError(
                f"CLDR annotations not found: {xml_path} (cldr_dir={cldr_dir}). Install them with: {APT_FIX}"
            )
    if not features.check("raqm"):
        raise EmojiDataError(
            "Pillow has no raqm text layout, so ZWJ sequences, flags and keycaps would render as "
            f"several glyphs. Pillow's wheels load libfribidi at run time: {APT_FIX}; a Pillow built "
            "from source also needs libraqm-dev before `pip install --force-reinstall pillow`."
        )


def _cldr_files(cldr_dir: Path) -> tuple[Path, Path]:
    return cldr_dir / "annotations" / "en.xml", cldr_dir / "annotationsDerived" / "en.xml"


def load_font(font_path: Path = DEFAULT_FONT) -> ImageFont.FreeTypeFont:
    """The emoji font at its only bitmap size, laid out by raqm (see the module docstring)."""
    try:
        return ImageFont.truetype(str(font_path), FONT_SIZE, layout_engine=ImageFont.Layout.RAQM)
    except OSError as error:
        raise EmojiDataError(
            f"cannot load emoji font {font_path} at size {FONT_SIZE}: {error}. "
            f"Expected Noto Color Emoji from: {APT_FIX}"
        ) from None


# --------------------------------------------------------------------------- CLDR parsing


def parse_annotations(xml_path: Path) -> dict[str, tuple[str | None, tuple[str, ...]]]:
    """Map emoji text → (tts name, keywords) for one CLDR annotations file, in file order."""
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as error:
        raise EmojiDataError(f"{xml_path}: not valid XML ({error}); reinstall with: {APT_FIX}") from None
    table: dict[str, tuple[str | None, tuple[str, ...]]] = {}
    for node in root.iter("annotation"):
        text, body = node.get("cp"), (node.text or "").strip()
        if not text or not body:
            continue
        name, keywords = table.get(text, (None, ()))
        if node.get("type") == "tts":
            name = body
        else:
            keywords = tuple(k.strip() for k in body.split("|") if k.strip())
        table[text] = (name, keywords)
    return table


def load_cldr_entries(cldr_dir: Path = DEFAULT_CLDR_DIR) -> list[EmojiEntry]:
    """Base then derived annotations, first occurrence wins; entries without a name are dropped.

    Not every entry is an emoji (CLDR also names "{" and "→"): those fail the render check.
    """
    merged: dict[str, tuple[str | None, tuple[str, ...]]] = {}
    for xml_path in _cldr_files(cldr_dir):
        for text, value in parse_annotations(xml_path).items():
            merged.setdefault(text, value)
    entries, seen_ids = [], set()
    for text, (name, keywords) in merged.items():
        if name and emoji_id(text) not in seen_ids:
            seen_ids.add(emoji_id(text))
            entries.append(EmojiEntry(text=text, name=name, keywords=keywords))
    return entries


# --------------------------------------------------------------------------- concepts & captions


def _split_name(name: str) -> tuple[str, list[str]]:
    """'woman raising hand: medium skin tone' → ('woman raising hand', ['medium skin tone'])."""
    base, _, suffix = name.partition(": ")
    return base, [item.strip() for item in suffix.split(",") if item.strip()]


def concept_of(name: str) -> str:
    """The name without skin-tone and gender qualifiers: the unit the split keeps together.

    "woman raising hand: medium skin tone", "man raising hand" → "raising hand";
    "family: man, woman, boy" → "family"; "man: red hair" → "person: red hair";
    "old man", "older person" → "old person";
    "flag: France" keeps its suffix because it is not a qualifier.
    """
    base, items = _split_name(name)
    rest = [item for item in items if item not in SKIN_TONES and item not in PEOPLE]
    concept = base.lower()
    for prefix in GENDER_PREFIXES:
        if concept.startswith(prefix):
            concept = concept[len(prefix) :]
            break
    if concept in {"man", "woman", "person"}:
        concept = "person"
    # "deaf man" / "deaf woman" / "deaf person" → "deaf person" (also old, pregnant).
    concept = re.sub(r" (?:man|woman)$", " person", concept)
    concept = CONCEPT_ALIASES.get(concept, concept)
    return f"{concept}: {', '.join(rest).lower()}" if rest else concept


def _join_and(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def name_phrase(name: str) -> str:
    """The CLDR name as a plain noun phrase: 'flag: France' → 'flag of France'."""
    base, items = _split_name(name)
    if not items:
        return base
    if base == "flag":
        return f"flag of {', '.join(items)}"
    if base == "keycap":
        return f"keycap {' '.join(items)}"
    people = [item for item in items if item in PEOPLE]
    modifiers = [item for item in items if item not in PEOPLE]
    phrase = f"{base} of {_join_and(people)}" if people else base
    return f"{phrase} with {_join_and(modifiers)}" if modifiers else phrase


def with_article(phrase: str) -> str:
    """Prefix 'a'/'an' ('the' for flags) unless the phrase reads as plural ('people hugging')."""
    words = phrase.split()
    first = words[0].lower() if words else ""
    if first == "flag" and phrase.startswith("flag of "):
        return f"the {phrase}"
    plural = first in PEOPLE - {"man", "woman", "person", "boy", "girl"} or first in NUMBER_WORDS
    plural = plural or (len(words) == 1 and first.endswith("s") and not first.endswith("ss"))
    if plural or not phrase:
        return phrase
    return f"{'an' if first[:1] in 'aeiou' else 'a'} {phrase}"


def make_captions(entry: EmojiEntry, seed: int) -> list[str]:
    """Up to five distinct captions: the CLDR name first, then name and keyword phrases.

    Order: name, a name template, a keyword list ("face, grin, happy"), a keyword template
    ("emoji meaning grin"), a short name + keyword ("a grinning face (happy)"), padded with
    further name templates. Single-keyword captions use only *topical* keywords (not a skin
    tone, not already in the name), so no caption says just "medium skin tone" or "flag".
    Seeded per (seed, emoji), so a caption set does not change when other emoji are added;
    every entry gets at least two captions even with no usable keywords.
    """
    rng = random.Random(f"emoji-captions:{seed}:{entry.image_id}")
    phrase, short = name_phrase(entry.name), _split_name(entry.name)[0]
    # Symbol-only keywords ("*" for sparkles) make captions with no words in them.
    keywords = [kw for kw in entry.keywords if kw.lower() != entry.name.lower() and any(c.isalpha() for c in kw)]
    rng.shuffle(keywords)
    topical = [kw for kw in keywords if kw not in SKIN_TONES and kw.lower() not in entry.name.lower()]
    name_templates = list(NAME_TEMPLATES)
    rng.shuffle(name_templates)
    by_name = [t.format(np=with_article(phrase), phrase=phrase) for t in name_templates]
    candidates = [entry.name, by_name[0]]
    if len(keywords) >= 2:
        candidates.append(", ".join(keywords[: rng.randint(2, 4)]))
    if topical:
        kw = topical[0]
        candidates.append(rng.choice(KEYWORD_TEMPLATES).format(kw=kw, kw_np=with_article(kw)))
    if len(topical) >= 2:
        kw = topical[1]
        candidates.append(rng.choice(COMBINED_TEMPLATES).format(np=with_article(short), phrase=short, kw=kw))
    candidates.extend(by_name[1:])
    return _unique(candidates)[:MAX_CAPTIONS]


def _unique(texts: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    unique = []
    for text in (" ".join(t.split()) for t in texts):
        if text and text.lower() not in seen:
            seen.add(text.lower())
            unique.append(text)
    return unique


def tokens(text: str) -> list[str]:
    """Karpathy-style lower-case word tokens (same rule as the Karpathy writer)."""
    return re.findall(r"\w+", text.lower())


# --------------------------------------------------------------------------- splits


def assign_splits(concept_sizes: dict[str, int], seed: int) -> dict[str, str]:
    """Concept → split, ~80/10/10 by image count, all variants of a concept in one split.

    Concepts are shuffled with ``seed``; multi-image concepts (handshake, family, holding
    hands: up to dozens of variants each) are placed first and single-image concepts last,
    each going to the split that is least filled relative to its target share. The big
    concepts are thereby spread across all splits, and the many singletons then close the gaps,
    so the proportions come out within an image or two of 80/10/10.
    """
    rng = random.Random(f"emoji-split:{seed}")
    concepts = sorted(concept_sizes)
    rng.shuffle(concepts)
    concepts.sort(key=lambda concept: concept_sizes[concept] == 1)  # stable: keeps the shuffle
    total = sum(concept_sizes.values())
    filled = dict.fromkeys(SPLITS, 0)
    assignment = {}
    for concept in concepts:
        ratios = {s: filled[s] / (SPLIT_FRACTIONS[s] * total) for s in SPLITS}
        lowest = min(ratios.values())
        split = rng.choice([s for s in SPLITS if ratios[s] == lowest])
        assignment[concept] = split
        filled[split] += concept_sizes[concept]
    return assignment


# --------------------------------------------------------------------------- rendering


class GlyphRenderer:
    """Renders emoji to square RGB images and rejects anything that is not one real glyph.

    Rejections: wider than one glyph advance (a sequence the font has no ligature for falls
    apart into its parts), no ink (.notdef is blank in this font), Noto's "unknown flag"
    glyph, or identical to its first codepoint alone (a modifier or tag the font ignores: Noto
    draws "snowboarder: light skin tone" exactly like "snowboarder", and a duplicate image
    with a different caption would only confuse retrieval).
    """

    def __init__(self, font: ImageFont.FreeTypeFont) -> None:
        self.font = font
        self.advance = font.getlength("\U0001f600")
        self._first_cache: dict[str, bytes | None] = {}
        unknown_flag = self._raw("\U0001f1ff\U0001f1ff")  # ZZ: not a region → the "?" flag
        self._tofu = {unknown_flag.tobytes()} if unknown_flag is not None else set()

    def is_single_glyph(self, text: str) -> bool:
        return self.font.getlength(text) < 1.5 * self.advance

    def _raw(self, text: str) -> Image.Image | None:
        """The glyph drawn on white, cropped to its ink; ``None`` when nothing is drawn."""
        left, top, right, bottom = self.font.getbbox(text)
        if right <= left or bottom <= top:
            return None
        canvas = Image.new("RGB", (right - left, bottom - top), WHITE)
        ImageDraw.Draw(canvas).text((-left, -top), text, font=self.font, embedded_color=True)
        ink = ImageChops.difference(canvas, Image.new("RGB", canvas.size, WHITE)).getbbox()
        return canvas.crop(ink) if ink else None

    def _first_codepoint_bytes(self, text: str) -> bytes | None:
        first = text[0]
        if first not in self._first_cache:
            raw = self._raw(first)
            self._first_cache[first] = raw.tobytes() if raw is not None else None
        return self._first_cache[first]

    def render(self, text: str, size: int) -> tuple[Image.Image | None, str]:
        """(image, "ok") or (None, reason): "multi_glyph", "missing" or "same_as_base"."""
        if not self.is_single_glyph(text):
            return None, "multi_glyph"
        raw = self._raw(text)
        if raw is None or raw.tobytes() in self._tofu:
            return None, "missing"
        significant = text.replace(FE0F, "")
        if len(significant) > 1 and raw.tobytes() == self._first_codepoint_bytes(significant):
            return None, "same_as_base"
        return to_square(raw, size), "ok"


def to_square(image: Image.Image, size: int) -> Image.Image:
    """Centre on a white square with a small margin, then LANCZOS-resize to ``size``."""
    side = round(max(image.size) * (1 + 2 * MARGIN))
    square = Image.new("RGB", (side, side), WHITE)
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return square.resize((size, size), Image.Resampling.LANCZOS)


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _existing_png_ok(path: Path, size: int) -> bool:
    """A PNG from an earlier (maybe interrupted) build is reused only at the right size."""
    try:
        with Image.open(path) as image:
            return image.size == (size, size) and image.mode == "RGB"
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class Rendered:
    entry: EmojiEntry
    path: Path


def render_all(
    entries: Sequence[EmojiEntry],
    renderer: GlyphRenderer,
    image_dir: Path,
    size: int,
    limit: int | None,
    progress: bool,
) -> tuple[list[Rendered], RenderStats]:
    """Render (or reuse) a PNG per entry until ``limit`` images are accepted.

    Rendering stays on this thread (FreeType holds the GIL); PNG encoding and the fsync'd
    atomic writes go to a thread pool, because one fsync per file otherwise dominates the
    build time.
    """
    stats = RenderStats()
    accepted: list[Rendered] = []
    with ThreadPoolExecutor(max_workers=WRITER_THREADS) as writer:
        pending: list[Future[None]] = []
        for entry in _with_progress(entries, progress):
            if limit is not None and len(accepted) >= limit:
                break
            path = image_dir / f"{entry.image_id}.png"
            # The single-glyph check is always made: whether an entry belongs in the set must
            # not depend on which files an earlier build left behind.
            if not renderer.is_single_glyph(entry.text):
                stats.multi_glyph.append(entry.image_id)
                continue
            if _existing_png_ok(path, size):
                stats.reused += 1
                accepted.append(Rendered(entry, path))
                continue
            image, reason = renderer.render(entry.text, size)
            if image is None:
                getattr(stats, reason).append(entry.image_id)
                continue
            pending.append(writer.submit(_write_png, path, image))
            stats.rendered += 1
            accepted.append(Rendered(entry, path))
        for future in pending:
            future.result()  # re-raise the first write error (disk full, permissions)
    return accepted, stats


def _write_png(path: Path, image: Image.Image) -> None:
    atomic_write_bytes(path, _png_bytes(image))


def _with_progress(entries: Sequence[EmojiEntry], progress: bool) -> Iterator[EmojiEntry]:
    if not progress:
        yield from entries
        return
    from rich.progress import track

    yield from track(entries, description="rendering emoji", total=len(entries), transient=True)


# --------------------------------------------------------------------------- dataset assembly


def build_records(rendered: Sequence[Rendered], seed: int) -> list[dict[str, Any]]:
    """Karpathy image entries (split by concept, captions seeded) in CLDR order."""
    concepts = [concept_of(item.entry.name) for item in rendered]
    sizes: dict[str, int] = {}
    for concept in concepts:
        sizes[concept] = sizes.get(concept, 0) + 1
    splits = assign_splits(sizes, seed)
    images, sentid = [], 0
    for imgid, (item, concept) in enumerate(zip(rendered, concepts, strict=True)):
        sentences = []
        for text in make_captions(item.entry, seed):
            sentences.append({"sentid": sentid, "imgid": imgid, "raw": text, "tokens": tokens(text)})
            sentid += 1
        images.append(
            {
                "imgid": imgid,
                "image_id": item.entry.image_id,
                "filename": item.path.name,
                "filepath": item.path.parent.name,
                "split": splits[concept],
                "concept": concept,
                "name": item.entry.name,
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
            }
        )
    return images


def dataset_from_json(doc: dict[str, Any], out: Path, source: str) -> PairedDataset:
    """The :class:`PairedDataset` for a dataset.json written by this module (absolute paths)."""
    root = out.resolve()
    records = [
        ImageRecord(
            image_id=item["image_id"],
            path=root / item["filepath"] / item["filename"],
            split=item["split"],
            captions=tuple(Caption(str(s["sentid"]), s["raw"]) for s in item["sentences"]),
            concept=item["concept"],
        )
        for item in doc["images"]
    ]
    return make_dataset("emoji", records, source=source)


def _load_complete(json_path: Path, size: int, seed: int, limit: int | None) -> dict[str, Any] | None:
    """A finished build's JSON for the same inputs with all its images present, else ``None``."""
    try:
        doc = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or (doc.get("size"), doc.get("seed"), doc.get("limit")) != (
        size,
        seed,
        limit,
    ):
        return None
    images = doc.get("images") or []
    base = json_path.parent
    if not images or not all((base / i["filepath"] / i["filename"]).is_file() for i in images):
        return None
    return doc


def build_emoji_dataset(
    out: Path,
    size: int = 64,
    seed: int = 0,
    *,
    font_path: Path | None = None,
    cldr_dir: Path | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> PairedDataset:
    """Render the emoji set into ``out`` (``images/<id>.png`` + ``dataset.json``) and return it.

    Deterministic for ``seed`` (splits and captions) and ``size`` (pixels). ``limit`` keeps the
    first ``limit`` renderable emoji in CLDR order (for quick tests). A rerun over a finished
    build with the same size/seed/limit only reads ``dataset.json``; an interrupted build
    reuses the PNGs it already wrote.
    """
    out = Path(out)
    json_path = out / "dataset.json"
    if size < 1:
        raise EmojiDataError(f"size must be a positive number of pixels, got {size}")
    done = _load_complete(json_path, size, seed, limit)
    if done is not None:
        return dataset_from_json(done, out, str(json_path))
    font_path = Path(font_path) if font_path is not None else DEFAULT_FONT
    cldr_dir = Path(cldr_dir) if cldr_dir is not None else DEFAULT_CLDR_DIR
    check_requirements(font_path, cldr_dir)
    renderer = GlyphRenderer(load_font(font_path))
    rendered, stats = render_all(load_cldr_entries(cldr_dir), renderer, out / "images", size, limit, progress)
    if not rendered:
        raise EmojiDataError(f"no emoji rendered from {font_path} with {cldr_dir}; skipped: {stats.as_dict()}")
    doc = {
        "dataset": "emoji",
        "size": size,
        "seed": seed,
        "limit": limit,
        "skipped": stats.as_dict(),
        "images": build_records(rendered, seed),
    }
    atomic_write_json(json_path, doc, indent=None)
    return dataset_from_json(doc, out, str(json_path))


__all__ = [
    "APT_FIX",
    "DEFAULT_CLDR_DIR",
    "DEFAULT_FONT",
    "EmojiDataError",
    "EmojiEntry",
    "GlyphRenderer",
    "assign_splits",
    "build_emoji_dataset",
    "concept_of",
    "emoji_id",
    "load_cldr_entries",
    "load_font",
    "make_captions",
]
