"""What a reader does with a bad sample: stop (``error``, the default) or drop it and count it (``skip``).

One web-scraped image that will not decode should not cost a 30K-image run, but neither may
data vanish unnoticed: under ``skip`` every dropped image or caption is recorded with its
file, its place (``images[12]``, ``row 40``, ``sub/cat.txt``) and the reason, and the counts
and first offenders go to stderr, the run's ``bad_samples.json``/``summary.json`` and the
report. Problems with a whole file (invalid JSON, a missing column) always stop: there is no
sample to skip. Under ``error`` the first bad sample stops the load, naming file, place and reason.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from clipdistill.data.errors import DatasetError

POLICIES = ("error", "skip")
SHOWN = 10  # offenders kept verbatim in the summary; the counts cover all of them

_default_policy = "error"


def check_policy(policy: str, what: str = "on_bad_sample") -> str:
    if policy not in POLICIES:
        raise DatasetError(f"{what} {policy!r} is not a policy; valid: {', '.join(POLICIES)}")
    return policy


def set_default_policy(policy: str) -> None:
    """The policy ``load_dataset`` uses when its caller gives none (the CLI's ``--on-bad-sample``)."""
    global _default_policy
    _default_policy = check_policy(policy)


def default_policy() -> str:
    return _default_policy


@dataclass(frozen=True)
class BadSample:
    """One dropped image or caption: where it is and why it was dropped."""

    source: str  # the dataset file or folder
    where: str  # images[3], images[3].sentences[1], row 7, sub/cat.txt, image 'x' (path)
    reason: str
    kind: str  # image | caption

    def message(self) -> str:
        return f"{self.source}: {self.where} {self.reason}"


@dataclass
class BadSamples:
    """Collects a load's bad samples under one policy; :meth:`bad` raises under ``error``."""

    policy: str = "error"
    samples: list[BadSample] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_policy(self.policy)

    def bad(self, source: str, where: str, reason: str, kind: str = "image") -> None:
        """Report a bad sample: raise :class:`DatasetError` (``error``) or record it (``skip``)."""
        sample = BadSample(str(source), where, reason, kind)
        if self.policy == "error":
            raise DatasetError(sample.message() + " (pass --on-bad-sample skip to drop bad samples and go on)")
        self.samples.append(sample)

    def count(self, kind: str) -> int:
        return sum(sample.kind == kind for sample in self.samples)

    def summary(self) -> dict[str, Any]:
        """Counts and the first offenders, as written to the run folder and the report."""
        return {
            "policy": self.policy,
            "skipped_images": self.count("image"),
            "skipped_captions": self.count("caption"),
            "first": [sample.message() for sample in self.samples[:SHOWN]],
        }

    def announce(self, dataset: str) -> None:
        """One stderr block when anything was skipped, so a skip is never silent."""
        if not self.samples:
            return
        lines = [
            f"warning: {dataset}: skipped {self.count('image')} image(s) and {self.count('caption')} caption(s) "
            f"(--on-bad-sample skip); first {min(SHOWN, len(self.samples))}:"
        ]
        lines += [f"  {sample.message()}" for sample in self.samples[:SHOWN]]
        print("\n".join(lines), file=sys.stderr)


# Bytes that are not UTF-8 are decoded with ``surrogateescape`` (byte 0xNN -> U+DCNN). Parsers
# that re-encode their input (pandas' C reader) cannot hold those, so :func:`mark_invalid_bytes`
# moves them to the last private-use code points, U+10FF80 + (0xNN - 0x80); both forms are found.
_MARK_BASE = 0x10FF80
_TO_MARK = {0xDC80 + b: _MARK_BASE + b for b in range(128)}


def mark_invalid_bytes(text: str) -> str:
    """surrogateescape'd text -> text every UTF-8 encoder accepts, invalid bytes still findable."""
    return text.translate(_TO_MARK)


def _invalid(char: str) -> str | None:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:
        return f"0x{code - 0xDC00:02x}"
    if code >= _MARK_BASE:
        return f"0x{code - _MARK_BASE + 0x80:02x}"
    if 0xD800 <= code <= 0xDFFF:
        return f"U+{code:04X} (a lone surrogate)"
    return None


def is_clean_text(text: str) -> bool:
    """False for text holding bytes that were not UTF-8 (or a lone surrogate from a JSON escape)."""
    return not any(_invalid(char) for char in text)


def invalid_byte(text: str) -> str:
    """The first invalid byte in such text, as ``0xNN`` for messages."""
    return next((found for found in map(_invalid, text) if found), "?")
