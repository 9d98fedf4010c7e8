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
        from clipdistill.models.students import load_student

        directory = Path(parsed.name)
        if not directory.is_dir():
            raise ModelSpecError(f"{text}: folder does not exist")
        model = load_student(directory, spec=text)
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
            from clipdistill.models.students import load_student

            model = load_student(directory, spec=text)
    return model.to(device).eval()


def load_teacher(spec: str | ModelSpec, *, device: str | torch.device = "cpu") -> FrozenTeacher:
    """A frozen, eval-mode teacher: no gradients, no autograd graph, never in train mode."""
    return FrozenTeacher(load_model(spec, device=device))
