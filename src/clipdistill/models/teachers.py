"""Load any model spec as a :class:`DualEncoder`, and teachers as frozen ones.

This is the single place where a spec string turns into a network, so every CLI command
and config key accepts the same names and fails with the same helpful errors.
"""

from __future__ import annotations

import torch

from clipdistill.models.base import DualEncoder, FrozenTeacher
from clipdistill.models.kinds import get_kind
from clipdistill.models.spec import ModelSpec, ModelSpecError, parse_spec


def load_model(spec: str | ModelSpec, *, device: str | torch.device = "cpu", load_weights: bool = True) -> DualEncoder:
    """Build the model a spec names. ``load_weights=False`` gives the same architecture with
    random weights (how tests exercise the real loaders offline). How each schema loads is its
    teacher kind's loader (models/teacher_kinds.py)."""
    parsed = parse_spec(spec)
    kind = get_kind(parsed.schema)
    if kind.fusion:
        raise ModelSpecError(
            f"{str(parsed)!r} is a fusion teacher (it scores an image-caption pair jointly), not a dual encoder; "
            "give it as the fusion teacher (key 'teacher.fusion'), and a dual encoder here"
        )
    model: DualEncoder = kind.load(parsed, load_weights=load_weights)
    return model.to(device).eval()


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
    the folder's file names only: nothing is loaded. Each teacher kind holds its own rule
    (``TeacherKind.random_weights``, models/teacher_kinds.py)."""
    parsed = parse_spec(spec)
    return get_kind(parsed.schema).random_weights(parsed)


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
