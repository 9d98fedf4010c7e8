"""What several methods share beside the loss math: argument checks, teacher access and the
student→teacher projector.

These lived in whichever method file first needed them, so one method imported another; here
every method imports them from one place and no method file depends on another.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from clipdistill.distill.base import MethodArgs, MethodConfigError, TeacherOutputs, TeacherSource
from clipdistill.distill.losses import MAX_SCALE

if TYPE_CHECKING:
    from clipdistill.models.fusion import FusionStates, FusionTeacher


# --- argument checks ---------------------------------------------------------------------------
def check_non_negative(args: MethodArgs, *names: str) -> None:
    """Raise :class:`MethodConfigError` naming ``method_args.<name>`` unless each is finite and ≥ 0."""
    for name in names:
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0:
            raise MethodConfigError(f"key 'method_args.{name}' must be a finite number >= 0, got {value!r}")


def check_positive(args: MethodArgs, *names: str) -> None:
    """Raise :class:`MethodConfigError` naming ``method_args.<name>`` unless each is finite and > 0."""
    for name in names:
        value = getattr(args, name)
        if not math.isfinite(value) or value <= 0:
            raise MethodConfigError(f"key 'method_args.{name}' must be a finite number > 0, got {value!r}")


def scale_value(logit_scale: torch.Tensor) -> float:
    """κ = exp(log scale) clamped at 100 as the losses use it, as a float for reports."""
    return float(logit_scale.detach().exp().clamp(max=MAX_SCALE))


# --- teacher access ----------------------------------------------------------------------------
def frozen_teacher(outputs: TeacherOutputs, like: torch.Tensor) -> TeacherOutputs:
    """Teacher outputs detached (teachers are frozen: no gradient may reach them, whatever
    the source returns) and moved to ``like``'s device and dtype (a cache may store fp16)."""

    def prep(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.detach().to(device=like.device, dtype=like.dtype)

    return TeacherOutputs(
        image=prep(outputs.image),
        text=prep(outputs.text),
        logit_scale=outputs.logit_scale.detach().to(device=like.device, dtype=torch.float32),
        image_tokens=prep(outputs.image_tokens),
        text_tokens=prep(outputs.text_tokens),
    )


def require_teacher(method: str, teacher: TeacherSource | None) -> TeacherSource:
    """The teacher, or a config error naming the key that provides it."""
    if teacher is None:
        raise MethodConfigError(f"method {method!r} needs a teacher but none was configured (key 'teacher.spec')")
    return teacher


def fusion_of(teacher: TeacherSource) -> FusionTeacher | None:
    """The teacher source's fusion teacher (``None`` when key 'teacher.fusion' is not set)."""
    return getattr(teacher, "fusion", None)


def fusion_states(method: str, outputs: TeacherOutputs) -> FusionStates:
    """The batch's fusion states, or an error naming the key that provides them."""
    if outputs.fusion is None:
        raise MethodConfigError(
            f"method {method!r}: the teacher source gave no fusion states; set key 'teacher.fusion' "
            "(with 'teacher.cache', build the cache with --fusion)"
        )
    return outputs.fusion


# --- student → teacher projector ---------------------------------------------------------------
def make_projector(student_dim: int, teacher_dim: int) -> nn.Linear | None:
    """A trainable linear map student_dim → teacher_dim (with bias, as CLIP-KD), or ``None``
    when the dims already agree (CLIP-KD adds projectors only then)."""
    return None if student_dim == teacher_dim else nn.Linear(student_dim, teacher_dim)


def project_to_teacher(features: torch.Tensor, projector: nn.Module | None) -> torch.Tensor:
    """Student unit features in the teacher's space. A projected feature is re-normalised
    (CLIP-KD does the same) so it is compared with teacher unit vectors on equal terms;
    without a projector the features are returned unchanged (already unit)."""
    return features if projector is None else F.normalize(projector(features), dim=-1)
