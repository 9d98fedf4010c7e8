"""Names read from one file that point at another: confined to their folder.

Manifests and configs name the files beside them (``export.json`` ``files``,
``tokenizer_config.json`` ``file``, ``embeddings.json`` shards, ``metadata.parquet``
thumbnails). Joining such a name unchecked lets an edited config read any file of the machine
(an absolute path, ``../..``, or a symlink that leads out), and the service would then hand it
to a client. Every such name goes through :func:`resolve_inside`, which refuses all three with
an error naming the file and the field the name came from.

Written here rather than taken from a library: the standard library has the two pieces
(``PurePath`` parts, ``Path.resolve``) but no single "join, then stay inside" call.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath


class UnsafePathError(ValueError):
    """A name from a manifest or config that would leave its folder."""


def check_relative(name: object, what: str, error: type[ValueError] = UnsafePathError) -> str:
    """``name`` as a relative path of plain components, else :class:`UnsafePathError`.

    ``what`` says where the name came from (``"export.json files key"``), so the message tells
    the user which file to fix; ``error`` is the exception type the caller's command reports.
    Only the spelling is checked here (cheap enough for a million thumbnail rows);
    :func:`resolve_inside` also follows symlinks.
    """
    if not isinstance(name, str) or not name:
        raise error(f"{what}: {name!r} is not a file name")
    if "\x00" in name:
        raise error(f"{what}: {name!r} contains a NUL byte")
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or name.startswith(("/", "\\")):
        raise error(f"{what}: {name!r} is an absolute path; only names inside the folder are allowed")
    if ".." in posix.parts or ".." in windows.parts:
        raise error(f"{what}: {name!r} climbs out of the folder with '..'")
    return name


def resolve_inside(folder: str | Path, name: object, *, what: str, error: type[ValueError] = UnsafePathError) -> Path:
    """``folder / name`` with symlinks resolved, refused unless it stays inside ``folder``
    (itself resolved, so a folder reached through a link is fine; a name whose own links lead
    out of it is not)."""
    relative = check_relative(name, what, error)
    root = Path(folder).resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise error(f"{what}: {relative!r} leads out of {root} (to {path}) through a symbolic link")
    return path
