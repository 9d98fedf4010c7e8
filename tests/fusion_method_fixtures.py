"""Fakes for the tests of MCAD, DCD and ComKD: a teacher of fixed embeddings with a real
(random) fusion head and fixed fusion states, a student of leaf tensors, and a naive KL."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from clipdistill.distill.base import (
    Batch,
    StudentFeatures,
    TeacherOutputs,
    TeacherSource,
    build_method_args,
)
from clipdistill.distill.methods import get_method
from clipdistill.models.fusion import FusionConfig, FusionEncoder, FusionStates, FusionTeacher

B, D = 6, 8


class FusionFakeTeacher(TeacherSource):
    """Fixed unit embeddings + fixed fusion states; ``fusion`` a real (random) fusion head."""

    def __init__(self, seed: int = 0, with_fusion: bool = True, dual_spec: str = "fake:teacher") -> None:
        g = torch.Generator().manual_seed(seed)
        self.embed_dim = D
        self.spec = "fake:teacher"
        self.image = F.normalize(torch.randn(B, D, generator=g), dim=-1).requires_grad_(True)
        self.text = F.normalize(torch.randn(B, D, generator=g), dim=-1).requires_grad_(True)
        self.logit_scale = torch.tensor(math.log(20.0), requires_grad=True)
        config = FusionConfig(
            dual_spec=dual_spec, image_token_dim=5, image_tokens=3, text_token_dim=7, embed_dim=D, width=8, heads=2
        )
        torch.manual_seed(seed)
        encoder = FusionEncoder(config)
        torch.nn.init.normal_(encoder.itm.weight)  # untrained it would only repeat the dual score
        self.fusion = FusionTeacher(encoder, spec="fusion:fake") if with_fusion else None
        mask = torch.tensor([[True] * n + [False] * (4 - n) for n in (4, 2, 3, 1, 4, 2)])
        self.states = FusionStates(
            image=torch.randn(B, 3, 8, generator=g),
            image_global=self.image.detach(),
            text=torch.randn(B, 4, 8, generator=g) * mask[..., None],
            text_mask=mask,
            text_global=self.text.detach(),
        )

    def __call__(self, batch: Batch) -> TeacherOutputs:
        return TeacherOutputs(
            image=self.image,
            text=self.text,
            logit_scale=self.logit_scale,
            fusion=self.states if self.fusion is not None else None,
        )

    def tensors(self) -> list[torch.Tensor]:
        return [self.image, self.text, self.logit_scale]


def make_batch(texts: list[str] | None = None) -> Batch:
    return Batch(
        unit_pixels=torch.zeros(B, 3, 4, 4),
        texts=texts or [f"caption {i}" for i in range(B)],
        image_ids=[str(i) for i in range(B)],
        caption_ids=[f"{i}_0" for i in range(B)],
        aug_ids=torch.zeros(B, dtype=torch.int64),
    )


def make_student(dim: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, dim, generator=g).requires_grad_(True),
        torch.randn(B, dim, generator=g).requires_grad_(True),
        torch.tensor(math.log(1 / 0.07), requires_grad=True),
    )


def features(raw: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> StudentFeatures:
    return StudentFeatures(image=F.normalize(raw[0], dim=-1), text=F.normalize(raw[1], dim=-1), logit_scale=raw[2])


def build(name: str, student_dim: int, teacher: TeacherSource, raw_args: dict | None = None):
    cls = get_method(name)
    return cls(student_dim, teacher, build_method_args(cls, raw_args))


def naive_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, t: float = 1.0) -> torch.Tensor:
    """½[KL rows + KL columns], written out per row."""
    total = 0.0
    for a, b in ((teacher_logits, student_logits), (teacher_logits.t(), student_logits.t())):
        rows = []
        for i in range(a.shape[0]):
            p = torch.softmax(a[i] / t, 0)
            rows.append((p * (torch.log(p) - torch.log_softmax(b[i] / t, 0))).sum())
        total = total + torch.stack(rows).mean() * t * t
    return total / 2
