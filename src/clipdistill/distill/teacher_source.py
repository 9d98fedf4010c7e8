"""The online teacher source: runs the frozen teacher on each batch."""

from __future__ import annotations

from clipdistill.distill.base import Batch, TeacherOutputs, TeacherSource
from clipdistill.models.base import FrozenTeacher


class OnlineTeacher(TeacherSource):
    """Runs the frozen teacher on the batch's own (augmented) pixels and captions. The
    teacher re-normalises the pixels and re-tokenises the captions itself."""

    def __init__(self, teacher: FrozenTeacher) -> None:
        self.teacher = teacher
        self.embed_dim = int(teacher.model.embed_dim)
        self.spec = teacher.spec

    def __call__(self, batch: Batch) -> TeacherOutputs:
        device = next(self.teacher.model.parameters()).device
        image = self.teacher.embed_images(batch.unit_pixels.to(device))
        text = self.teacher.embed_texts(batch.texts)
        return TeacherOutputs(image=image, text=text, logit_scale=self.teacher.logit_scale)
