"""The online fusion source: adds a fusion teacher's per-item states, computed now, to the
outputs of another teacher source.

The cached path needs no wrapper: ``CachedTeacher.open(..., fusion=SPEC)`` serves the states
from disk. Either way a method sees ``TeacherOutputs.fusion`` and ``source.fusion`` (the frozen
fusion teacher whose pair head scores them), and cannot tell where the states came from.
"""

from __future__ import annotations

from clipdistill.distill.base import Batch, TeacherOutputs, TeacherSource
from clipdistill.models.fusion import FusionStates, FusionTeacher


class OnlineFusion(TeacherSource):
    """``base``'s outputs plus ``fusion``'s states for the batch's own pixels and captions."""

    def __init__(self, base: TeacherSource, fusion: FusionTeacher) -> None:
        self.base = base
        self.fusion = fusion
        self.embed_dim = base.embed_dim
        self.spec = base.spec

    def __call__(self, batch: Batch) -> TeacherOutputs:
        outputs = self.base(batch)
        image, image_global = self.fusion.image_states(batch.unit_pixels)
        text, mask, text_global = self.fusion.text_states(batch.texts)
        outputs.fusion = FusionStates(image, image_global, text, mask, text_global)
        return outputs
