"""The registered teacher kinds: one :class:`~clipdistill.models.kinds.TeacherKind` per schema.

Each entry says, for one schema, how its specs are written, how they load, which files hold
their weights (the fingerprint) and when they would have random weights. The loader
(:func:`~clipdistill.models.teachers.load_model`), the random-weights check and the fingerprint
(:mod:`clipdistill.models.fingerprint`) look the kind up here instead of branching on schemas,
so adding a schema is one entry below. Registration order is the order spec errors list the
syntax lines.

Importing this module stays cheap (``clipdistill/models/__init__.py`` imports it, so every
``clipdistill.models`` import registers the kinds): the networks, torch and open_clip are
imported inside the functions, when a spec is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipdistill.models.fingerprint import folder_weight_files
from clipdistill.models.kinds import ModelSpec, ModelSpecError, TeacherKind, close_matches, register_kind
from clipdistill.models.run_dir import resolve_run_dir


# --- open_clip folders (local-dir:, run: of a student) ----------------------------------------
def _load_openclip_dir(directory: Path, *, spec: str) -> Any:
    """An open_clip folder: one whose text tower is a Hugging Face model (an exported LiT
    teacher, export/open_clip.py) through the loader that finds that model inside the folder
    wherever it has moved; every other folder as a student."""
    from clipdistill.models.openclip_model import has_hf_text_model, load_openclip_folder

    if has_hf_text_model(directory):
        return load_openclip_folder(directory, spec=spec)
    from clipdistill.models.students import load_student

    return load_student(directory, spec=spec)


def _weightless_folder(directory: Path) -> str | None:
    """An open_clip folder without a weights file (open_clip then builds the architecture
    alone, with a warning)."""
    from clipdistill.models.students import CONFIG_FILE

    if (directory / CONFIG_FILE).is_file() and not any(
        path.suffix in (".safetensors", ".bin", ".pth") for path in directory.iterdir()
    ):
        return f"the open_clip folder {directory} holds no weights file"
    return None


def _folder_files(spec: ModelSpec) -> list[Path] | None:
    """A folder's weight and config files (a moved folder keeps its fingerprint); a name that
    is no folder (a hub id) names fixed weights."""
    directory = Path(spec.name)
    return folder_weight_files(directory) if directory.is_dir() else None


# --- openclip: the zoo ------------------------------------------------------------------------
def _check_openclip_name(spec: ModelSpec) -> None:
    import open_clip

    names = open_clip.list_models()
    if spec.name not in names:
        hint = close_matches(spec.name, names)
        raise ModelSpecError(
            f"unknown open_clip model {spec.name!r} in spec {str(spec)!r}"
            + (f"; close matches: {', '.join(hint)}" if hint else "")
            + " (open_clip.list_models() lists them all)"
        )
    if spec.pretrained and not Path(spec.pretrained).is_file():
        tags = open_clip.list_pretrained_tags_by_model(spec.name)
        if spec.pretrained not in tags:
            hint = close_matches(spec.pretrained, tags)
            raise ModelSpecError(
                f"unknown pretrained tag {spec.pretrained!r} for open_clip model {spec.name!r}; "
                f"valid tags: {', '.join(tags) or '(none)'}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
            )


def load_openclip_zoo(spec: ModelSpec, *, load_weights: bool = True) -> Any:
    """``openclip:NAME[@TAG]``: a zoo model, its name and tag checked against open_clip's lists."""
    from clipdistill.models.openclip_model import load_openclip

    _check_openclip_name(spec)
    return load_openclip(spec.name, spec.pretrained, load_weights=load_weights, spec=str(spec))


def openclip_weight_files(spec: ModelSpec) -> list[Path] | None:
    """A weights file given as the tag can change under the same spec; a zoo tag cannot."""
    if spec.pretrained and Path(spec.pretrained).is_file():
        return [Path(spec.pretrained)]
    return None


def openclip_random(spec: ModelSpec) -> str | None:
    """A zoo name without ``@TAG`` is the architecture alone."""
    if not spec.pretrained:
        return f"open_clip model {spec.name!r} is named without a pretrained tag (@TAG) or weights file"
    return None


# --- hf-hub: an open_clip model on the hub ----------------------------------------------------
def load_hf_hub(spec: ModelSpec, *, load_weights: bool = True) -> Any:
    """``hf-hub:ORG/REPO``: open_clip's own hub schema."""
    from clipdistill.models.openclip_model import load_openclip

    return load_openclip(f"hf-hub:{spec.name}", None, load_weights=load_weights, spec=str(spec))


def no_weight_files(spec: ModelSpec) -> list[Path] | None:
    """A hub id names fixed weights, a ``lit:`` spec none yet: no fingerprint."""
    return None


# --- local-dir: an open_clip folder -----------------------------------------------------------
def load_local_dir(spec: ModelSpec, *, load_weights: bool = True) -> Any:
    """``local-dir:PATH``: an open_clip folder (a student, an exported LiT teacher, any other)."""
    directory = Path(spec.name)
    if not directory.is_dir():
        raise ModelSpecError(f"{spec}: folder does not exist")
    return _load_openclip_dir(directory, spec=str(spec))


def local_dir_random(spec: ModelSpec) -> str | None:
    """A folder holding a config but no weights file."""
    return _weightless_folder(Path(spec.name))


# --- hf: a transformers CLIPModel -------------------------------------------------------------
def load_hf(spec: ModelSpec, *, load_weights: bool = True) -> Any:
    """``hf:ID_OR_PATH``: a transformers ``CLIPModel`` (always with its weights)."""
    from clipdistill.models.hf_clip import load_hf_clip

    return load_hf_clip(spec.name, spec=str(spec))


# --- run: a clipdistill run or checkpoint folder ----------------------------------------------
def load_run(spec: ModelSpec, *, load_weights: bool = True) -> Any:
    """``run:PATH``: the LiT teacher or open_clip student the folder (or its ``model/``) holds."""
    kind, directory = resolve_run_dir(spec.name)
    if kind == "lit":
        from clipdistill.models.lit import load_lit

        return load_lit(directory, spec=str(spec))
    return _load_openclip_dir(directory, spec=str(spec))


def run_weight_files(spec: ModelSpec) -> list[Path] | None:
    """The saved model's config and weights (a retrained run at the same path differs)."""
    from clipdistill.models import lit, students

    kind, directory = resolve_run_dir(spec.name)
    names = (lit.MODEL_FILE, lit.WEIGHTS_FILE) if kind == "lit" else (students.CONFIG_FILE, students.WEIGHTS_FILE)
    return [directory / name for name in names if (directory / name).is_file()]


def run_random(spec: ModelSpec) -> str | None:
    """An open_clip run folder without weights; a missing folder is the loader's to name."""
    try:
        kind, directory = resolve_run_dir(spec.name)
    except ModelSpecError:
        return None  # the loader names the missing folder
    return _weightless_folder(directory) if kind == "openclip" else None


# --- lit: the LiT architecture before training ------------------------------------------------
def load_lit_architecture(spec: ModelSpec, *, load_weights: bool = True) -> Any:
    """``lit:WEIGHTS[@SIZE][+TEXT]``: the untrained LiT teacher (ImageNet trunk + frozen text tower)."""
    from clipdistill.models.lit import LiTModel, lit_config_from_spec

    try:
        config = lit_config_from_spec(spec.name)
    except ValueError as error:
        raise ModelSpecError(str(error)) from error
    return LiTModel(config, spec=str(spec), load_pretrained=load_weights)


def lit_random(spec: ModelSpec) -> str | None:
    """A ``lit:`` spec is always the architecture before ``clipdistill teacher train``."""
    return "a lit: spec is the untrained LiT architecture (train it with `clipdistill teacher train`)"


# --- fusion teachers --------------------------------------------------------------------------
def load_fusion_kind(spec: ModelSpec, *, load_weights: bool = True) -> Any:
    """``blip-itm:`` / ``fusion:``: the frozen fusion teacher (models/fusion/factory.py)."""
    from clipdistill.models.fusion.factory import load_fusion

    return load_fusion(spec)


def fusion_weight_files(spec: ModelSpec) -> list[Path] | None:
    """A ``fusion:`` folder's config and weights; a missing or foreign folder is an error naming it."""
    from clipdistill.models.fusion.encoder import CONFIG_FILE, WEIGHTS_FILE, read_fusion_config

    directory = Path(spec.name)
    read_fusion_config(directory)
    return [directory / name for name in (CONFIG_FILE, WEIGHTS_FILE) if (directory / name).is_file()]


# --- the table (registration order = the order spec errors list them) -------------------------
register_kind(
    TeacherKind(
        name="openclip",
        syntax="openclip:NAME@PRETRAINED  (open_clip zoo, e.g. openclip:ViT-B-32@laion2b_s34b_b79k)",
        load=load_openclip_zoo,
        weight_files=openclip_weight_files,
        random_weights=openclip_random,
    )
)
register_kind(
    TeacherKind(
        name="hf-hub",
        syntax="hf-hub:ORG/REPO  (an open_clip model on the Hugging Face hub)",
        load=load_hf_hub,
        weight_files=no_weight_files,
    )
)
register_kind(
    TeacherKind(
        name="local-dir",
        syntax="local-dir:PATH  (an open_clip folder: open_clip_config.json + weights)",
        load=load_local_dir,
        weight_files=_folder_files,
        random_weights=local_dir_random,
    )
)
register_kind(
    TeacherKind(
        name="hf",
        syntax="hf:ID_OR_PATH  (a transformers CLIPModel, e.g. hf:openai/clip-vit-base-patch32)",
        load=load_hf,
        weight_files=_folder_files,
    )
)
register_kind(
    TeacherKind(
        name="run",
        syntax="run:PATH  (a clipdistill checkpoint or run folder)",
        load=load_run,
        weight_files=run_weight_files,
        random_weights=run_random,
    )
)
register_kind(
    TeacherKind(
        name="lit",
        syntax=(
            "lit:WEIGHTS[@SIZE][+TEXT]  (LiT teacher to train: ImageNet trunk + frozen MiniLM, or +mpnet for "
            "all-mpnet-base-v2, e.g. lit:efficientnet-lite2@260+mpnet)"
        ),
        load=load_lit_architecture,
        weight_files=no_weight_files,
        random_weights=lit_random,
    )
)
register_kind(
    TeacherKind(
        name="blip-itm",
        syntax="blip-itm:ID_OR_PATH  (fusion teacher: BLIP ITM, e.g. blip-itm:Salesforce/blip-itm-base-coco)",
        load=load_fusion_kind,
        weight_files=_folder_files,
        fusion=True,
    )
)
register_kind(
    TeacherKind(
        name="fusion",
        syntax="fusion:PATH  (fusion teacher: a folder written by `clipdistill teacher train-fusion`)",
        load=load_fusion_kind,
        weight_files=fusion_weight_files,
        fusion=True,
    )
)
