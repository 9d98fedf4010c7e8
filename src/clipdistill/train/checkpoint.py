"""Training checkpoints: atomic writes, safe loads, ``latest`` and ``best``.

A checkpoint holds everything an exact resume needs: model, method extras, optimiser,
scheduler, grad scaler, RNG states and the data position. It is written to a temp file,
fsynced and renamed, so a crash mid-write leaves the previous checkpoint readable; it is read
with ``torch.load(weights_only=True)``, so a checkpoint file can never execute code.

``latest`` also keeps the checkpoint it replaces as ``latest.prev.pt`` (a hard link: no copy),
so a ``latest`` damaged after it was written (a bad disk, a copy cut short) costs one save
interval, not the run: :func:`find_resume_checkpoint` falls back to it and says so.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipdistill.errors import UserError
from clipdistill.io import atomic_path

LATEST = "latest.pt"
BEST = "best.pt"
PREVIOUS = "latest.prev.pt"


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, unreadable or from a different run."""


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states in types ``weights_only`` loading accepts."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *[float(v) for v in np_state[2:]]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _keep_previous(path: Path) -> None:
    """Make ``latest.prev.pt`` the current ``latest`` (atomically), before ``latest`` is replaced."""
    if not path.is_file():
        return
    previous = path.with_name(PREVIOUS)
    staging = path.with_name(f".{PREVIOUS}.link.tmp")
    staging.unlink(missing_ok=True)
    try:
        os.link(path, staging)
    except OSError:  # a filesystem without hard links: copy instead
        import shutil

        shutil.copyfile(path, staging)
    os.replace(staging, previous)


def save_checkpoint(path: str | Path, state: dict[str, Any], *, keep_previous: bool = False) -> None:
    """``torch.save`` through a temp file + fsync + rename; with ``keep_previous`` the replaced
    file stays readable as ``latest.prev.pt``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        if keep_previous:
            _keep_previous(path)


def prune_finished(checkpoints: str | Path, keep: str) -> list[Path]:
    """Delete what a finished run does not keep (``keep_checkpoints``: ``latest`` drops
    ``best.pt``, whose weights the model folder holds, and ``latest.prev.pt``; ``none`` also
    ``latest.pt``; ``all`` nothing); returns the files removed."""
    drop = {"all": (), "latest": (BEST, PREVIOUS), "none": (BEST, PREVIOUS, LATEST)}[keep]
    removed = []
    for name in drop:
        path = Path(checkpoints) / name
        if path.exists():
            path.unlink()
            removed.append(path)
    return removed


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load with ``weights_only=True`` (no pickle code execution); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt/unsafe files
        raise CheckpointError(f"cannot load checkpoint {path}: {error}") from error


def find_resume_checkpoint(checkpoints: str | Path, resume: str) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint ``--resume`` means, loaded; ``None`` when ``latest`` is asked for and the run
    never saved one (it was killed before its first save, so it starts again from step 0).

    An unreadable ``latest`` falls back to ``latest.prev.pt`` with a warning on stderr; an explicit
    path is loaded as given, with no fallback.
    """
    if resume != "latest":
        path = Path(resume)
        return path, load_checkpoint(path)
    checkpoints = Path(checkpoints)
    latest, previous = checkpoints / LATEST, checkpoints / PREVIOUS
    if not latest.exists() and not previous.exists():
        return None
    try:
        return latest, load_checkpoint(latest)
    except CheckpointError as error:
        if not previous.is_file():
            raise
        print(f"warning: {error}; resuming from the one before it, {previous}", file=sys.stderr)
        return previous, load_checkpoint(previous)
