"""The index options of ``clipdistill serve``: ``--index NAME=DIR`` and the default name."""

from __future__ import annotations

import re
from pathlib import Path

from clipdistill.serve.app.limits import INDEX_NAME, LOCAL_HOSTS


def parse_index_option(value: str) -> tuple[str, Path]:
    """``NAME=DIR`` of ``clipdistill serve --index``."""
    name, sep, directory = value.partition("=")
    if not sep or not name or not directory:
        raise ValueError(f"--index takes NAME=DIR, got {value!r}")
    if not INDEX_NAME.match(name):
        raise ValueError(f"index name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    return name, Path(directory)


def default_index_name(directory: Path) -> str:
    """A served name for INDEX_DIR: its folder name, made URL-safe."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", directory.resolve().name).strip("-.") or "index"
    return name[:64] if INDEX_NAME.match(name[:64]) else "index"


def allowed_hosts(bind: str, extra: list[str] | None = None) -> list[str]:
    """The ``Host`` names ``clipdistill serve`` answers to: the bind address, the local names
    (``localhost``, 127.0.0.1, ::1) and ``extra`` (``--allow-host``; ``*`` turns the check off).
    Bound to every interface (0.0.0.0, ::) the machine's own host names join them; any other
    name a client uses (a DNS alias, a public address) must be given with ``--allow-host``."""
    import socket

    names = [bind, *LOCAL_HOSTS]
    if bind in ("0.0.0.0", "::", ""):
        names = [*LOCAL_HOSTS, socket.gethostname(), socket.getfqdn()]
    names += extra or []
    return list(dict.fromkeys(name.lower().strip("[]") for name in names if name))
