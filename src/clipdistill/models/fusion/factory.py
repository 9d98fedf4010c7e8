"""Build the frozen fusion teacher a ``fusion:`` or ``blip-itm:`` spec names."""

from __future__ import annotations

import torch

from clipdistill.models.fusion.base import FusionBackend, FusionTeacher
from clipdistill.models.fusion.blip import load_blip_itm
from clipdistill.models.fusion.encoder import load_fusion_encoder
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
