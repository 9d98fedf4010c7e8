"""A student that starts from an open_clip checkpoint (``student.init``).

Its own module because it needs both sides: ``teachers.load_model`` (every spec loads there)
and the student's folder format (``students.py``, which ``teachers.py`` itself imports).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from clipdistill.models.openclip_model import OpenCLIPDualEncoder
from clipdistill.models.spec import parse_spec
from clipdistill.models.students import CONFIG_FILE, StudentConfigError
from clipdistill.models.teachers import load_model


def init_student(spec: str) -> OpenCLIPDualEncoder:
    """A student that starts from an open_clip checkpoint's architecture and weights.

    Any spec open_clip can load works (``local-dir:``, ``hf-hub:``, ``openclip:NAME@TAG``);
    the architecture config and pixel statistics travel with the weights, so the trained
    student saves as an ordinary open_clip folder of the same architecture."""
    import open_clip

    parsed = parse_spec(spec)
    if parsed.schema not in ("local-dir", "hf-hub", "openclip"):
        raise StudentConfigError(
            f"key 'student.init': {spec!r} is not an open_clip checkpoint (local-dir:PATH, hf-hub:ORG/REPO or "
            "openclip:NAME@TAG); a student must stay an open_clip model"
        )
    student = load_model(spec)
    if not isinstance(student, OpenCLIPDualEncoder):
        raise StudentConfigError(f"key 'student.init': {spec!r} did not load as an open_clip model")
    if getattr(student, "model_cfg", None) is None:
        name = f"hf-hub:{parsed.name}" if parsed.schema == "hf-hub" else parsed.name
        model_cfg = _hub_model_cfg(parsed.name) if parsed.schema == "hf-hub" else open_clip.get_model_config(name)
        if model_cfg is None:
            raise StudentConfigError(f"key 'student.init': open_clip has no architecture config for {spec!r}")
        student.model_cfg = copy.deepcopy(model_cfg)
    if getattr(student, "preprocess_cfg", None) is None:
        student.preprocess_cfg = {
            "size": list(student.image_size),
            "mean": list(student.image_mean),
            "std": list(student.image_std),
        }
    return student.train()


def _hub_model_cfg(repo: str) -> dict[str, Any]:
    """The ``model_cfg`` of a hub checkpoint, read from the config file open_clip itself fetched."""
    from huggingface_hub import hf_hub_download

    raw = json.loads(Path(hf_hub_download(repo, CONFIG_FILE)).read_text(encoding="utf-8"))
    return raw.get("model_cfg", raw)
