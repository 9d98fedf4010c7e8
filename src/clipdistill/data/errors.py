"""The errors every dataset reader raises, in a module that imports no other part of ``data``.

Readers, the image decoder, the bad-sample policy and the dataset model all raise them, so they
live below all of those: a reader never has to import the dataset model (or the other way
round) just to name an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class DatasetError(ValueError):
    """Bad dataset input: the message names the file, the row or index, the field and the value."""


class MissingImagesError(DatasetError):
    """Image files referenced by a dataset do not exist on disk."""

    def __init__(self, missing: Sequence[Path], source: str) -> None:
        self.missing = list(missing)
        shown = ", ".join(str(p) for p in self.missing[:5])
        more = f" (and {len(self.missing) - 5} more)" if len(self.missing) > 5 else ""
        super().__init__(f"{len(self.missing)} image file(s) listed in {source} are missing: {shown}{more}")
