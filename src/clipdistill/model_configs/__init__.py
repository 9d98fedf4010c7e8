"""The student architectures, one open_clip model-config JSON file each (``NAME.json``).

open_clip ships its architectures the same way (``open_clip/model_configs/*.json``), so a
preset file here can be copied into an open_clip checkout, and any open_clip model-config file
can be handed to ``student_config`` in place of a preset name. A file holds only what open_clip's
``CLIP(**model_cfg)`` takes (``embed_dim``, ``vision_cfg``, ``text_cfg``), so the reasons behind
the numbers live in ``models/students.py``, beside the code that builds them.

This module reads the files without importing torch, so the CLI can list the presets in its
help text at no cost.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

SUFFIX = ".json"


def preset_names() -> list[str]:
    """Every preset shipped in this folder, sorted by name (open_clip lists its configs the same way)."""
    folder = resources.files(__name__)
    return sorted(
        entry.name.removesuffix(SUFFIX) for entry in folder.iterdir() if entry.is_file() and entry.name.endswith(SUFFIX)
    )


def read_preset(name: str) -> dict[str, Any]:
    """The open_clip model config of preset ``name`` (a fresh dict on every call)."""
    if name not in preset_names():
        raise KeyError(name)
    text = resources.files(__name__).joinpath(name + SUFFIX).read_text(encoding="utf-8")
    return json.loads(text)
