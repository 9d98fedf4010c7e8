"""Where the model of a ``run:`` spec lives: a training run or checkpoint folder, or its ``model/``.

The ``run:`` teacher kind's loader, weight files and random-weights rule
(:mod:`clipdistill.models.teacher_kinds`) and the open_clip export all need it; it imports none
of them, so the fingerprint never depends on the loader.
"""

from __future__ import annotations

from pathlib import Path

from clipdistill.models.spec import ModelSpecError


def resolve_run_dir(path: str | Path) -> tuple[str, Path]:
    """Find the model inside a clipdistill checkpoint or run folder: ('lit' | 'openclip', dir)."""
    from clipdistill.models.lit import MODEL_FILE
    from clipdistill.models.students import CONFIG_FILE

    root = Path(path)
    for candidate in (root, root / "model"):
        if (candidate / MODEL_FILE).is_file():
            return "lit", candidate
        if (candidate / CONFIG_FILE).is_file():
            return "openclip", candidate
    if not root.exists():
        raise ModelSpecError(f"run:{path}: folder does not exist")
    raise ModelSpecError(
        f"run:{path}: no model found (looked for {MODEL_FILE} or {CONFIG_FILE} in {root} and {root / 'model'})"
    )
