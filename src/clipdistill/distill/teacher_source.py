"""The online teacher source: runs the frozen teacher on each batch."""

from __future__ import annotations

import torch

from clipdistill.distill.base import Batch, TeacherOutputs, TeacherSource
from clipdistill.models.base import FrozenTeacher


class OnlineTeacher(TeacherSource):
    """Runs the frozen teacher on the batch's own (augmented) pixels and captions. The
    teacher re-normalises the pixels and re-tokenises the captions itself."""

    def __init__(self, teacher: FrozenTeacher) -> None:
        self.teacher = teacher
        self.embed_dim = int(teacher.model.embed_dim)
        self.spec = teacher.spec

    @classmethod
    def from_spec(
        cls, spec: str, *, device: str | torch.device = "cpu", allow_random_teacher: bool = False
    ) -> OnlineTeacher:
        """The online source of the teacher ``spec`` names; a teacher without trained weights is
        refused unless ``allow_random_teacher`` (:func:`~clipdistill.models.teachers.load_teacher`)."""
        from clipdistill.models.teachers import load_teacher

        return cls(load_teacher(spec, device=device, allow_random=allow_random_teacher))

    def __call__(self, batch: Batch) -> TeacherOutputs:
        device = next(self.teacher.model.parameters()).device
        image = self.teacher.embed_images(batch.unit_pixels.to(device))
        text = self.teacher.embed_texts(batch.texts)
        return TeacherOutputs(image=image, text=text, logit_scale=self.teacher.logit_scale)
