"""Load any model spec as a :class:`DualEncoder`, and teachers as frozen ones.

This is the single place where a spec string turns into a network, so every CLI command
and config key accepts the same names and fails with the same helpful errors.
"""

from __future__ import annotations

from pathlib import Path

import torch

from clipdistill.models.base import DualEncoder, FrozenTeacher
from clipdistill.models.run_dir import resolve_run_dir
from clipdistill.models.spec import FUSION_SCHEMAS, ModelSpec, ModelSpecError, close_matches, parse_spec


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


def load_model(spec: str | ModelSpec, *, device: str | torch.device = "cpu", load_weights: bool = True) -> DualEncoder:
    """Build the model a spec names. ``load_weights=False`` gives the same architecture with
    random weights (how tests exercise the real loaders offline)."""
    parsed = parse_spec(spec)
    text = str(parsed)
    if parsed.schema in FUSION_SCHEMAS:
        raise ModelSpecError(
            f"{text!r} is a fusion teacher (it scores an image-caption pair jointly), not a dual encoder; "
            "give it as the fusion teacher (key 'teacher.fusion'), and a dual encoder here"
        )
    if parsed.schema == "openclip":
        from clipdistill.models.openclip_model import load_openclip

        _check_openclip_name(parsed)
        model: DualEncoder = load_openclip(parsed.name, parsed.pretrained, load_weights=load_weights, spec=text)
    elif parsed.schema == "hf-hub":
        from clipdistill.models.openclip_model import load_openclip

        model = load_openclip(f"hf-hub:{parsed.name}", None, load_weights=load_weights, spec=text)
    elif parsed.schema == "local-dir":
        directory = Path(parsed.name)
        if not directory.is_dir():
            raise ModelSpecError(f"{text}: folder does not exist")
        model = _load_openclip_dir(directory, spec=text)
    elif parsed.schema == "lit":
        from clipdistill.models.lit import LiTModel, lit_config_from_spec

        try:
            config = lit_config_from_spec(parsed.name)
        except ValueError as error:
            raise ModelSpecError(str(error)) from error
        model = LiTModel(config, spec=text, load_pretrained=load_weights)
    elif parsed.schema == "hf":
        from clipdistill.models.hf_clip import load_hf_clip

        model = load_hf_clip(parsed.name, spec=text)
    else:  # run
        kind, directory = resolve_run_dir(parsed.name)
        if kind == "lit":
            from clipdistill.models.lit import load_lit

            model = load_lit(directory, spec=text)
        else:
            model = _load_openclip_dir(directory, spec=text)
    return model.to(device).eval()


def _load_openclip_dir(directory: Path, *, spec: str) -> DualEncoder:
    """An open_clip folder: one whose text tower is a Hugging Face model (an exported LiT
    teacher, models/openclip_export.py) through the loader that finds that model inside the
    folder wherever it has moved; every other folder as a student."""
    from clipdistill.models.openclip_model import has_hf_text_model, load_openclip_folder

    if has_hf_text_model(directory):
        return load_openclip_folder(directory, spec=spec)
    from clipdistill.models.students import load_student

    return load_student(directory, spec=spec)


class RandomTeacherError(ModelSpecError):
    """A teacher spec that names an architecture without trained weights."""


#: How a user says that a teacher with random weights is meant (the CLI flag; the training
#: config's ``teacher.allow_random`` key says the same).
ALLOW_RANDOM_FLAG = "--allow-random-teacher"


def random_weights_reason(spec: str | ModelSpec) -> str | None:
    """Why ``spec`` would load with random weights, or ``None`` when it names trained weights.

    Random: ``openclip:NAME`` without ``@TAG`` (or weights file), a ``lit:`` spec (the LiT
    architecture before ``clipdistill teacher train``), an open_clip folder without a weights
    file (open_clip then builds the architecture alone, with a warning). Read from the spec and
    the folder's file names only: nothing is loaded."""
    parsed = parse_spec(spec)
    if parsed.schema == "openclip" and not parsed.pretrained:
        return f"open_clip model {parsed.name!r} is named without a pretrained tag (@TAG) or weights file"
    if parsed.schema == "lit":
        return "a lit: spec is the untrained LiT architecture (train it with `clipdistill teacher train`)"
    if parsed.schema in ("local-dir", "run"):
        from clipdistill.models.students import CONFIG_FILE

        directory = Path(parsed.name)
        if parsed.schema == "run":
            try:
                kind, directory = resolve_run_dir(parsed.name)
            except ModelSpecError:
                return None  # the loader names the missing folder
            if kind != "openclip":
                return None
        if (directory / CONFIG_FILE).is_file() and not any(
            path.suffix in (".safetensors", ".bin", ".pth") for path in directory.iterdir()
        ):
            return f"the open_clip folder {directory} holds no weights file"
    return None


def check_teacher_weights(spec: str | ModelSpec, *, allow_random: bool = False) -> None:
    """Refuse a teacher that would have random weights unless ``allow_random``: distilling from
    one silently trains a student towards noise. One line naming the spec and the fix."""
    if allow_random:
        return
    reason = random_weights_reason(spec)
    if reason is None:
        return
    raise RandomTeacherError(
        f"teacher {str(parse_spec(spec))!r} would have random weights ({reason}); give trained weights "
        "(openclip:NAME@TAG, a trained run:PATH or local-dir:PATH), or pass "
        f"{ALLOW_RANDOM_FLAG} (config: teacher.allow_random=true) if you really mean it"
    )


def load_teacher(
    spec: str | ModelSpec, *, device: str | torch.device = "cpu", allow_random: bool = False
) -> FrozenTeacher:
    """A frozen, eval-mode teacher: no gradients, no autograd graph, never in train mode.

    A spec without trained weights (:func:`random_weights_reason`) is refused unless
    ``allow_random`` (:func:`check_teacher_weights`)."""
    check_teacher_weights(spec, allow_random=allow_random)
    return FrozenTeacher(load_model(spec, device=device))
