"""A trained model as a plain open_clip folder (``clipdistill export --format open_clip``).

A student is already an open_clip folder, so it is copied. A LiT teacher (models/lit.py: a
timm trunk + linear head, a frozen text tower from its package) is written in open_clip's own
vocabulary, so ``open_clip.create_model_and_transforms("local-dir:DIR")`` loads it with no
clipdistill code and no hub access:

* image: ``vision_cfg.timm_model_name`` = the LiT trunk, the trunk's own global pooling,
  ``timm_proj: linear`` with a bias (the LiT ``image_proj``);
* text: ``text_cfg.hf_model_name`` = the tower with ``hf_model_pretrained: false`` (its weights are
  in the folder's checkpoint), ``hf_pooler_type: mean_pooler`` (the sentence-transformers mean
  over non-padding tokens, as LiT pools) and ``hf_proj_type`` = ``null`` (identity) for the
  default LiT (``text_proj: none``) or ``linear`` (no bias) for ``text_proj: linear``;
* tokenizer: the tower's WordPiece files in the folder with ``context_length`` = the LiT one (open_clip
  always reads a ``local-dir:`` folder's tokenizer from the folder, and cleans text as the LiT
  tokenizer does); pixels: the LiT size, mean and std with bicubic resizing, so
  ``prepare_pixels`` is the LiT one;
* ``clipdistill.frozen_stages`` (a key open_clip ignores): the trunk stages the LiT teacher kept
  frozen, which clipdistill then runs as the LiT teacher does (the ONNX Runtime prefix,
  models/trunk_split.py), so ``local-dir:`` gives the outputs of ``run:``, as fast.

What open_clip requires of ``hf_model_name``: it calls ``AutoConfig.from_pretrained`` on it as
written, a hub id or a path taken relative to the *working directory*, never to the folder. The
folder therefore holds the tower's ``config.json`` itself and the exported config names the folder
by its absolute path, so plain open_clip loads it from any working directory as long as the
folder stays where it was exported. A moved or copied folder still loads with clipdistill
(``local-dir:DIR``: :func:`~clipdistill.models.openclip_model.load_openclip_folder` points
``hf_model_name`` at the folder), and with plain open_clip by passing the override itself::

    open_clip.create_model_and_transforms(
        "local-dir:DIR", text_cfg={**cfg["model_cfg"]["text_cfg"], "hf_model_name": "DIR"})

(``cfg`` = the folder's ``open_clip_config.json``), or by exporting again at the new place.

open_clip builds a Hugging Face text tower only for the model types in its
``open_clip.hf_configs.arch_dict`` (BERT, RoBERTa, XLM-R, mT5, M2M-100 in 3.3): MiniLM is a BERT,
but all-mpnet-base-v2 (``lit:TRUNK+mpnet``) is an ``mpnet``, so such a teacher is refused up
front, before anything is written, naming the ONNX export that does serve it.

Every export is checked before it is reported done: the folder is loaded by open_clip itself
and must give the source model's image and text embeddings (cosine >= ``MIN_COSINE``).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from clipdistill.errors import UserError
from clipdistill.io import atomic_path, atomic_write_json
from clipdistill.models.openclip_model import (
    FOLDER_EXTRAS,
    HF_TEXT_CONFIG,
    OPENCLIP_CONFIG,
    OpenCLIPDualEncoder,
    has_hf_text_model,
)

WEIGHTS_FILE = "open_clip_model.safetensors"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
#: The least cosine between the source model's embeddings and the exported folder's.
MIN_COSINE = 0.9999
PROBE_CAPTIONS = (
    "a red circle",
    "Two   dogs playing in the snow.",
    "a smiling face with tears of joy, on a blue background with a flag",
    "",
)

Stage = Callable[[str], contextlib.AbstractContextManager[Any]]


class OpenCLIPExportError(UserError, ValueError):
    """A model that cannot be written as an open_clip folder, or a folder that does not reproduce it."""


def _no_stage(name: str) -> contextlib.AbstractContextManager[Any]:
    return contextlib.nullcontext()


# --- the LiT teacher in open_clip's terms ---------------------------------------------------
def _timm_pool(trunk: torch.nn.Module) -> str:
    """The trunk's own global pooling as open_clip's ``timm_pool`` ('' keeps timm's default)."""
    pool = getattr(trunk, "global_pool", None)
    kind = getattr(pool, "pool_type", pool)
    return kind if isinstance(kind, str) else ""


def check_lit_text_tower(model: Any) -> None:
    """Refuse a LiT teacher whose text tower open_clip cannot build (see the module docstring)."""
    import open_clip
    from open_clip.hf_configs import arch_dict

    model_type = str(model.text.model.config.model_type)
    if model_type not in arch_dict:
        raise OpenCLIPExportError(
            f"{model.spec or 'the LiT teacher'}: its text tower {model.text_entry.name} is a Hugging Face "
            f"{model_type!r} model, which open_clip {open_clip.__version__} cannot build (its text towers: "
            f"{', '.join(arch_dict)}); export it with --format onnx instead"
        )


def lit_model_cfg(model: Any, folder: Path) -> dict[str, Any]:
    """The open_clip ``model_cfg`` of a LiT teacher whose text model config is in ``folder``."""
    config = model.config
    return {
        "embed_dim": int(config.embed_dim),
        "vision_cfg": {
            "timm_model_name": config.image_model,
            "timm_model_pretrained": False,
            "timm_pool": _timm_pool(model.trunk),
            "timm_proj": "linear",
            "timm_proj_bias": True,
            "image_size": int(config.image_size),
        },
        "text_cfg": {
            "hf_model_name": str(folder.resolve()),
            "hf_tokenizer_name": model.text_entry.hub_id,
            "hf_model_pretrained": False,
            "hf_pooler_type": "mean_pooler",
            "hf_proj_type": "linear" if config.text_proj == "linear" else None,
            "context_length": int(config.context_length),
        },
    }


def lit_preprocess_cfg(model: Any) -> dict[str, Any]:
    """Size, mean, std and resizing of the LiT teacher's ``prepare_pixels`` (bicubic)."""
    return {
        "size": int(model.config.image_size),
        "mean": [float(v) for v in model.config.image_mean],
        "std": [float(v) for v in model.config.image_std],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


def lit_state(model: Any) -> dict[str, torch.Tensor]:
    """The LiT weights under open_clip's ``CustomTextCLIP`` names (the tower's unused pooler left out)."""
    renames = (
        ("trunk.", "visual.trunk."),
        ("image_proj.", "visual.head.proj."),
        ("text.model.", "text.transformer."),
        ("text_proj.", "text.proj."),
    )
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith("text.model.pooler."):
            continue  # open_clip builds the HF model without BERT's pooler (mean pooling)
        if key == "log_scale":
            state["logit_scale"] = value
            continue
        for old, new in renames:
            if key.startswith(old):
                state[new + key[len(old) :]] = value
                break
        else:
            raise OpenCLIPExportError(f"LiT weight {key!r} has no open_clip counterpart")
    return {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in state.items()}


def write_lit_folder(model: Any, out: Path) -> list[str]:
    """Write a LiT teacher as an open_clip folder; ``open_clip_config.json`` last."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    check_lit_text_tower(model)
    source = model.text_folder
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(lit_state(model), str(tmp))
    with atomic_path(out / HF_TEXT_CONFIG) as tmp:
        tmp.write_bytes((source / HF_TEXT_CONFIG).read_bytes())
    tokenizer_files = _save_tokenizer(AutoTokenizer.from_pretrained(str(source), local_files_only=True), out)
    config = {
        "model_cfg": lit_model_cfg(model, out),
        "preprocess_cfg": lit_preprocess_cfg(model),
        # open_clip ignores keys it does not know; clipdistill runs these stages as the LiT
        # teacher does (models/trunk_split.py), which makes the folder's outputs those of run:.
        FOLDER_EXTRAS: {"frozen_stages": int(model.config.frozen_stages)} if model.splits_at_frozen() else {},
    }
    atomic_write_json(out / OPENCLIP_CONFIG, config)
    return [WEIGHTS_FILE, HF_TEXT_CONFIG, *tokenizer_files, OPENCLIP_CONFIG]


def _save_tokenizer(tokenizer: Any, out: Path) -> list[str]:
    """The tokenizer's files moved into ``out`` one by one (each move atomic)."""
    import os
    import tempfile

    names = []
    with tempfile.TemporaryDirectory(prefix=".tokenizer-", dir=out) as tmp:
        tokenizer.save_pretrained(tmp)
        for path in sorted(Path(tmp).iterdir()):
            os.replace(path, out / path.name)
            names.append(path.name)
    return names


# --- an open_clip folder as it is -----------------------------------------------------------
def _source_folder(spec: str) -> Path | None:
    """The open_clip folder a ``run:``/``local-dir:`` spec loads from, else ``None``."""
    from clipdistill.models.run_dir import resolve_run_dir
    from clipdistill.models.spec import parse_spec

    parsed = parse_spec(spec)
    if parsed.schema == "local-dir":
        return Path(parsed.name)
    if parsed.schema == "run":
        kind, directory = resolve_run_dir(parsed.name)
        return directory if kind == "openclip" else None
    return None


def copy_openclip_folder(source: Path, out: Path) -> list[str]:
    """Copy an open_clip folder's files (a student, or an earlier export); a folder with its
    own Hugging Face text model gets ``hf_model_name`` pointed at the new place."""
    names = []
    for path in sorted(source.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.name != OPENCLIP_CONFIG:
            with atomic_path(out / path.name) as tmp:
                shutil.copyfile(path, tmp)
            names.append(path.name)
    raw = json.loads((source / OPENCLIP_CONFIG).read_text(encoding="utf-8"))
    if has_hf_text_model(source) and (source / HF_TEXT_CONFIG).is_file():
        raw.setdefault("model_cfg", {}).setdefault("text_cfg", {})["hf_model_name"] = str(out.resolve())
    atomic_write_json(out / OPENCLIP_CONFIG, raw)
    return [*names, OPENCLIP_CONFIG]


# --- the check ------------------------------------------------------------------------------
def _probe_pixels(model: Any, count: int = 6, seed: int = 0) -> torch.Tensor:
    """Unit pixels at a size other than the model's, so the check covers the resizing too."""
    generator = torch.Generator().manual_seed(seed)
    height, width = model.image_size
    return torch.rand(count, 3, height + 7, width + 5, generator=generator)


@torch.no_grad()
def check_folder(model: Any, out: Path) -> dict[str, Any]:
    """Load ``out`` with open_clip alone (``create_model_and_transforms``, its tokenizer) and
    compare its embeddings with the source model's on probe images and captions."""
    import open_clip

    name = f"local-dir:{out}"
    plain, _, _ = open_clip.create_model_and_transforms(name)
    plain.eval()
    exported = OpenCLIPDualEncoder(plain, open_clip.get_tokenizer(name), spec=name)
    unit = _probe_pixels(model)
    ours_image = model.embed_images(unit)
    theirs_image = exported.embed_images(unit)
    ours_text = model.embed_texts(list(PROBE_CAPTIONS))
    theirs_text = exported.embed_texts(list(PROBE_CAPTIONS))
    image_cos = torch.nn.functional.cosine_similarity(ours_image, theirs_image, dim=-1).min().item()
    text_cos = torch.nn.functional.cosine_similarity(ours_text, theirs_text, dim=-1).min().item()
    report = {
        "image_min_cosine": round(image_cos, 7),
        "text_min_cosine": round(text_cos, 7),
        "probe": f"{len(unit)} random images, {len(PROBE_CAPTIONS)} captions",
    }
    if min(image_cos, text_cos) < MIN_COSINE:
        raise OpenCLIPExportError(
            f"the open_clip folder {out} does not reproduce {model.spec or 'the model'}: min cosine image "
            f"{image_cos:.6f}, text {text_cos:.6f} (need >= {MIN_COSINE})"
        )
    return report


def _prepare_out(out: Path) -> None:
    """``out`` made ready: a half-written folder never looks finished (its config goes first),
    and a weights file of another model is refused, since open_clip loads any checkpoint it finds."""
    out.mkdir(parents=True, exist_ok=True)
    (out / OPENCLIP_CONFIG).unlink(missing_ok=True)
    foreign = sorted(p.name for p in out.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.name != WEIGHTS_FILE)
    if foreign:
        raise OpenCLIPExportError(
            f"{out} already holds {', '.join(foreign)}; open_clip would load any weights file it finds there, "
            "so export into an empty folder"
        )


def export_open_clip(spec: str, out: str | Path, *, stage: Stage | None = None) -> dict[str, Any]:
    """Write ``spec`` (a LiT teacher, or a student / open_clip folder) to ``out`` as a plain
    open_clip folder, check that open_clip alone reproduces it, and return what was done."""
    from clipdistill.models.lit import LiTModel
    from clipdistill.models.spec import parse_spec
    from clipdistill.models.teachers import load_model

    stage = stage or _no_stage
    out = Path(out)
    parsed = parse_spec(spec)
    if parsed.schema not in ("run", "local-dir", "lit"):
        raise OpenCLIPExportError(
            f"--format open_clip writes a LiT teacher (run:PATH of `clipdistill teacher train`) or copies an "
            f"open_clip folder (run:PATH, local-dir:PATH); {spec} is neither (open_clip loads zoo and hub "
            "models by name already)"
        )
    source = _source_folder(spec)
    if source is not None and out.exists() and source.resolve() == out.resolve():
        raise OpenCLIPExportError(f"--out {out} is the folder {spec} loads from; give another folder")
    with stage(f"loading {spec}"):
        model = load_model(spec)
    if isinstance(model, LiTModel):
        kind = "lit"
        check_lit_text_tower(model)
        with stage("writing the LiT teacher as an open_clip folder"):
            _prepare_out(out)
            files = write_lit_folder(model, out)
    elif source is not None:
        kind = "open_clip"
        with stage(f"copying the open_clip folder {source}"):
            _prepare_out(out)
            files = copy_openclip_folder(source, out)
    else:  # not reached: run:/local-dir: give a LiT model or a folder
        raise OpenCLIPExportError(f"--format open_clip cannot write {spec} ({type(model).__name__})")
    with stage("checking the folder with open_clip alone"):
        check = check_folder(model, out)
    return {"spec": spec, "kind": kind, "out": str(out), "files": files, "check": check}
