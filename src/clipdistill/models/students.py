"""Students: a timm image trunk + a small text transformer, as plain open_clip configs.

Expressing students as open_clip model configs (``vision_cfg.timm_model_name``) means a
trained student is an ordinary open_clip folder that loads with
``open_clip.create_model_and_transforms("local-dir:PATH")`` and no clipdistill at all. The
presets themselves ship as open_clip model-config files (``clipdistill/model_configs/NAME.json``,
open_clip's ``model_configs`` convention), and :func:`student_config` takes such a file's path as
readily as a preset name.

A known limit: open_clip 3.3's timm wrapper breaks on trunks whose conv head
widens the pooled features (mobilenetv3/v4); the presets use trunks that build fine.

The ``lite0`` preset is the one built to start from weights (``student.image_init`` /
``student.text_init``, models/student_towers.py): an EfficientNet-Lite0 trunk (ImageNet weights
exist offline) and a bidirectional text transformer on the teacher's MiniLM WordPiece vocabulary,
named through open_clip's own ``text_cfg.hf_tokenizer_name``: open_clip then builds an
``HFTokenizer`` from the tokenizer files saved inside the folder, so the folder stays plain
open_clip.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from clipdistill.errors import UserError
from clipdistill.io import atomic_path, atomic_write_json
from clipdistill.model_configs import preset_names, read_preset
from clipdistill.models.imagenet_lite import LITE_MEAN, LITE_STD, LITE_VARIANTS
from clipdistill.models.openclip_model import OpenCLIPDualEncoder
from clipdistill.models.spec import close_matches

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# The hub id of the teacher's text model (all-MiniLM-L6-v2). open_clip reads it only for
# ``hf-hub:`` folders; a ``local-dir:`` folder always loads the tokenizer files saved inside it.
MINILM_TOKENIZER = "sentence-transformers/all-MiniLM-L6-v2"
_LITE_TRUNKS = frozenset(variant.timm_name for variant in LITE_VARIANTS.values())

# The presets are the open_clip model-config files in ``clipdistill/model_configs/`` (one
# ``NAME.json`` each, open_clip's own convention), read into this registry. JSON holds no comments,
# so why their numbers are what they are is written here:
#  * every preset: a timm trunk (``timm_pool: avg``, a bias-free linear projection unless said
#    otherwise) and an open_clip text transformer; ``tiny``/``small``/``base`` use open_clip's BPE
#    vocabulary (49408 ids) at context 32.
#  * parameter counts at 64 px (open_clip 3.3): tiny image tower 2.2M, small 3.4M, base 10.8M.
#  * lite0: image tower 3.9M (the trunk's 1280 features, linear proj to 384), text 9.5M of which
#    7.8M is the 30522 x 256 token table (a lookup, no compute); 2 layers at width 256 are several
#    times cheaper than the teacher's 6 x 384 MiniLM. heads 8 keeps MiniLM's head size (32), so
#    ``text_init=teacher`` copies whole teacher heads (models/student_towers.py).
#  * lite0's text is BERT/MiniLM WordPiece (``hf_tokenizer_name`` = :data:`MINILM_TOKENIZER`):
#    30522 ids, [PAD]=0, [CLS]=101 first; bidirectional attention (``no_causal_mask``) pooled at
#    [CLS] (open_clip's ``pool_type: first``), as BERT-style towers are.
#  * lite0's ``timm_proj_bias: true``: so ``student.image_init=teacher`` copies the LiT teacher's
#    projection (it has a bias) exactly.
PRESETS: dict[str, dict[str, Any]] = {name: read_preset(name) for name in preset_names()}


class StudentConfigError(UserError, ValueError):
    """An unknown preset or a student config open_clip cannot build."""


def student_config(
    preset: str, *, image_size: int | None = None, embed_dim: int | None = None, **text_overrides: int
) -> dict[str, Any]:
    """A deep copy of a preset's open_clip model config, optionally resized (``image_size``) and
    with another shared embedding width (``embed_dim``: both towers' projections change shape).

    ``preset`` is a preset name (:data:`PRESETS`) or the path of an open_clip model-config JSON
    file (open_clip's ``model_configs/NAME.json``, or a folder's ``open_clip_config.json``), so an
    architecture open_clip knows, or one written by hand, trains without a code change.
    """
    config = copy.deepcopy(PRESETS[preset]) if preset in PRESETS else _config_file(preset)
    if image_size is not None:
        config["vision_cfg"]["image_size"] = image_size
    if embed_dim is not None:
        config["embed_dim"] = embed_dim
    for key, value in text_overrides.items():
        if key not in config["text_cfg"]:
            raise StudentConfigError(f"unknown text_cfg key {key!r}; known: {', '.join(config['text_cfg'])}")
        config["text_cfg"][key] = value
    return config


def _looks_like_path(name: str) -> bool:
    return name.endswith(".json") or "/" in name or "\\" in name or Path(name).is_file()


def _config_file(name: str) -> dict[str, Any]:
    """The model config in an open_clip JSON file; a name that is neither a preset nor a file is
    an unknown preset (with close matches)."""
    if not _looks_like_path(name):
        hint = close_matches(name, list(PRESETS))
        raise StudentConfigError(
            f"unknown student preset {name!r}; valid: {', '.join(PRESETS)} or an open_clip model-config JSON file"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
        )
    path = Path(name)
    if not path.is_file():
        raise StudentConfigError(f"student config file {path} does not exist (valid presets: {', '.join(PRESETS)})")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StudentConfigError(f"student config file {path} is not readable JSON ({error})") from error
    config = raw.get("model_cfg", raw) if isinstance(raw, dict) else raw  # a folder's open_clip_config.json
    if not isinstance(config, dict) or not all(isinstance(config.get(key), dict) for key in ("vision_cfg", "text_cfg")):
        raise StudentConfigError(
            f"student config file {path} is not an open_clip model config (an object with vision_cfg and text_cfg)"
        )
    if "embed_dim" not in config:
        raise StudentConfigError(f"student config file {path} has no embed_dim")
    return config


def _preprocess_cfg(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """OpenAI statistics, except for EfficientNet-Lite trunks: their ImageNet weights (and timm's
    pretrained config for them) take mean = std = 0.5, so a student that may start from those
    weights must see pixels normalised that way."""
    vision = model_cfg["vision_cfg"]
    lite = vision.get("timm_model_name") in _LITE_TRUNKS
    mean, std = (LITE_MEAN, LITE_STD) if lite else (OPENAI_MEAN, OPENAI_STD)
    return {"size": vision["image_size"], "mean": list(mean), "std": list(std)}


def _write_config_tokenizer(model_cfg: dict[str, Any], directory: Path) -> None:
    """Put the tokenizer files a config's ``hf_tokenizer_name`` names into a fresh folder, from
    this machine (the teacher's MiniLM is installed as a package; other names come from the
    Hugging Face cache), so open_clip's ``get_tokenizer("local-dir:...")`` finds them."""
    name = model_cfg.get("text_cfg", {}).get("hf_tokenizer_name")
    if not name:
        return
    from transformers import AutoTokenizer

    if name == MINILM_TOKENIZER:
        from clipdistill.models.text_minilm import minilm_path

        source = str(minilm_path())
    else:
        source = name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise StudentConfigError(f"text_cfg.hf_tokenizer_name {name!r}: cannot load the tokenizer ({error})") from error
    tokenizer.save_pretrained(str(directory))


def _save_tokenizer(student: OpenCLIPDualEncoder, directory: Path) -> None:
    """Save an open_clip ``HFTokenizer``'s files into the folder (open_clip's own
    ``save_pretrained``), each file moved in atomically; a BPE ``SimpleTokenizer`` needs none."""
    import os
    import tempfile

    tokenizer = getattr(student, "_tokenizer", None)
    if not hasattr(tokenizer, "save_pretrained"):
        return
    with tempfile.TemporaryDirectory(prefix=".tokenizer-", dir=directory) as tmp:
        tokenizer.save_pretrained(tmp)
        for path in sorted(Path(tmp).iterdir()):
            os.replace(path, directory / path.name)


def _student_preprocess_cfg(student: OpenCLIPDualEncoder, model_cfg: dict[str, Any]) -> dict[str, Any]:
    """What a saved folder tells open_clip about pixels: the student's own size/mean/std when it
    came from a checkpoint with other statistics (``init_student``), else the presets' OpenAI ones."""
    own = getattr(student, "preprocess_cfg", None)
    return dict(own) if own else _preprocess_cfg(model_cfg)


def build_student(model_cfg: dict[str, Any] | str, *, spec: str = "") -> OpenCLIPDualEncoder:
    """Build a randomly initialised student from a preset name or an open_clip model config.

    Built through open_clip itself (a temporary ``local-dir`` folder) so that what trains is
    exactly what ``open_clip.create_model("local-dir:...")`` rebuilds from the saved folder.
    """
    import tempfile

    config = student_config(model_cfg) if isinstance(model_cfg, str) else copy.deepcopy(model_cfg)
    with tempfile.TemporaryDirectory(prefix="clipdistill-student-") as tmp:
        atomic_write_json(Path(tmp) / CONFIG_FILE, {"model_cfg": config, "preprocess_cfg": _preprocess_cfg(config)})
        _write_config_tokenizer(config, Path(tmp))
        try:
            return load_student(tmp, spec=spec or "student")
        except (RuntimeError, ValueError) as error:
            trunk = config.get("vision_cfg", {}).get("timm_model_name")
            raise StudentConfigError(
                f"open_clip could not build the student (timm trunk {trunk!r}): {error}"
            ) from error


def load_student(directory: str | Path, *, spec: str = "") -> OpenCLIPDualEncoder:
    """Load an open_clip folder (config + optional safetensors weights) as a DualEncoder."""
    import logging

    import open_clip

    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{directory} is not an open_clip folder: {CONFIG_FILE} is missing")
    name = f"local-dir:{directory}"
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.setLevel(logging.ERROR)  # open_clip warns "no pretrained weights" for fresh students
    try:
        model = open_clip.create_model(name)
    finally:
        root_logger.setLevel(level)
    student = OpenCLIPDualEncoder(model, open_clip.get_tokenizer(name), spec=spec or f"local-dir:{directory}")
    student.model_cfg = read_model_cfg(directory)
    raw = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    if raw.get("preprocess_cfg"):
        student.preprocess_cfg = raw["preprocess_cfg"]
    return student


def save_student(student: OpenCLIPDualEncoder, directory: str | Path) -> Path:
    """Write an open_clip folder: ``open_clip_config.json`` + ``open_clip_model.safetensors``
    (+ the tokenizer files when the text tower uses a Hugging Face tokenizer).

    The config is the one open_clip built the model from (kept on the wrapper), so
    ``open_clip.create_model_and_transforms("local-dir:DIR")`` reproduces the same network.
    """
    from safetensors.torch import save_file

    model_cfg = getattr(student, "model_cfg", None)
    if model_cfg is None:
        raise ValueError("student has no model_cfg; build it with build_student() or load_student()")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in student.model.state_dict().items()}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp))
    _save_tokenizer(student, directory)
    preprocess_cfg = _student_preprocess_cfg(student, model_cfg)
    atomic_write_json(directory / CONFIG_FILE, {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg})
    return directory


def read_model_cfg(directory: str | Path) -> dict[str, Any]:
    raw = json.loads((Path(directory) / CONFIG_FILE).read_text(encoding="utf-8"))
    return raw.get("model_cfg", raw)
