"""Named failpoints: crash the product at an exact place, so crash safety is tested, not assumed.

A failpoint is a named spot in a writer or the training loop (``atomic:latest.pt`` is reached
after a checkpoint's bytes are written and before its rename; ``append:log.jsonl`` after each
log line). Setting ``CLIPDISTILL_FAILPOINT=NAME@N`` makes the N-th arrival (1-based, counted
per process) act: ``CLIPDISTILL_FAILPOINT_ACTION=kill`` (the default) sends the process a real
SIGKILL, as a power cut or the OOM killer would; ``raise`` raises :class:`InjectedFault`
(an ``OSError``, like a full disk). With the variable unset a failpoint costs one dict lookup.
Tests may also replace :data:`hook` to act in-process (e.g. truncate the temp file, then raise).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

ENV = "CLIPDISTILL_FAILPOINT"
ACTION_ENV = "CLIPDISTILL_FAILPOINT_ACTION"

_hits: dict[str, int] = {}


class InjectedFault(OSError):
    """The failure a failpoint raises when its action is ``raise``."""


def _from_environment(name: str, path: Path | None) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    wanted, _, count = spec.rpartition("@")
    if wanted != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != int(count or 1):
        return
    if os.environ.get(ACTION_ENV, "kill") == "raise":
        raise InjectedFault(f"injected failure at failpoint {name!r} (hit {_hits[name]}, file {path})")
    os.kill(os.getpid(), signal.SIGKILL)


hook: Callable[[str, Path | None], None] = _from_environment


def failpoint(name: str, path: Path | None = None) -> None:
    """Mark a crash-test point; ``path`` is the file being written there (a temp file), if any."""
    hook(name, path)


def reset() -> None:
    """Forget hit counts (tests that run several injected processes in one interpreter)."""
    _hits.clear()
