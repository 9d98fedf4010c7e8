"""Build the frozen fusion teacher a ``fusion:`` or ``blip-itm:`` spec names."""

from __future__ import annotations

from pathlib import Path

import torch

from clipdistill.models.base import load_trained_weights
from clipdistill.models.fusion.base import FusionBackend, FusionError, FusionTeacher
from clipdistill.models.fusion.blip import load_blip_itm
from clipdistill.models.fusion.encoder import WEIGHTS_FILE, FusionEncoder, read_fusion_config, read_fusion_training
from clipdistill.models.spec import ModelSpec, parse_fusion_spec


def load_fusion(
    spec: str | ModelSpec, *, device: str | torch.device = "cpu", with_encoders: bool = True
) -> FusionTeacher:
    """Load the fusion teacher a ``fusion:`` or ``blip-itm:`` spec names, frozen."""
    parsed = parse_fusion_spec(spec)
    backend: FusionBackend
    if parsed.schema == "fusion":
        backend = load_fusion_encoder(parsed.name, with_dual=with_encoders)
    else:
        backend = load_blip_itm(parsed.name)
    return FusionTeacher(backend.to(device), spec=str(parsed))


def load_fusion_encoder(directory: str | Path, *, with_dual: bool = True) -> FusionEncoder:
    """Load a ``fusion:`` folder; with its dual teacher, checked to be the one it was trained on."""
    directory = Path(directory)
    config = read_fusion_config(directory)
    dual = None
    if with_dual:
        # Here, not in encoder.py: fingerprint.py reads fusion folders through encoder.py, and
        # teachers.py is where every dual teacher loads, so the loader sits above both.
        from clipdistill.models.fingerprint import teacher_fingerprint
        from clipdistill.models.teachers import load_model

        current = teacher_fingerprint(config.dual_spec)
        if config.dual_fingerprint and current and current != config.dual_fingerprint:
            raise FusionError(
                f"fusion teacher {directory} was trained on dual teacher {config.dual_spec} with weights "
                f"{config.dual_fingerprint[:12]}, but that folder now holds weights {current[:12]}; retrain it with "
                f"`clipdistill teacher train-fusion --teacher {config.dual_spec} ...`"
            )
        dual = load_model(config.dual_spec)
    encoder = FusionEncoder(config, dual)
    load_trained_weights(encoder, directory / WEIGHTS_FILE, "dual.", FusionError)  # the dual teacher: its own folder
    encoder.training_record = read_fusion_training(directory)
    return encoder.eval()


def load_fusion_teacher(
    spec: str | ModelSpec, *, device: str | torch.device = "cpu", with_encoders: bool = True
) -> FusionTeacher:
    """A frozen fusion teacher (``blip-itm:`` or ``fusion:``), see :mod:`clipdistill.models.fusion`.

    ``with_encoders=False`` loads only what scores pairs from per-item states (enough when the
    states come from the teacher cache): for ``fusion:`` it skips loading the dual teacher."""
    return load_fusion(spec, device=device, with_encoders=with_encoders)
