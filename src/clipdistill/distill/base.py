"""What the trainer hands a distillation method, and what a method must return.

One trainer serves every method. Per step it builds a :class:`Batch` (augmented unit pixels,
one caption per image, and the stable ids the teacher cache is keyed by), encodes it with the
student into :class:`StudentFeatures`, and calls the method. The method fetches teacher
outputs itself from the :class:`TeacherSource` it was given (online teacher or cache: the
method cannot tell which) and returns named, already-weighted ``*_loss`` terms plus a report.
The trainer sums the ``*_loss`` terms; everything is logged.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from clipdistill.config import ConfigError, check_value
from clipdistill.errors import UserError

if TYPE_CHECKING:
    from clipdistill.models.fusion import FusionStates, FusionTeacher

NEEDS = ("teacher_embeddings", "teacher_tokens", "fusion_scores", "fusion_features")
#: Which teacher provides each need: the dual-encoder teacher (key ``teacher.spec``) or the
#: single-stream fusion teacher (key ``teacher.fusion``).
TEACHER_OF_NEED = {
    "teacher_embeddings": "dual",
    "teacher_tokens": "dual",
    "fusion_scores": "fusion",
    "fusion_features": "fusion",
}


class MethodConfigError(UserError, ValueError):
    """A method name or a method argument that is unknown, mistyped or inconsistent."""


@dataclass
class Batch:
    """One training batch. ``aug_ids[i]`` names the fixed augmentation replayed for image i
    (0 = the plain image), so a cached teacher output can be looked up for exactly these pixels."""

    unit_pixels: torch.Tensor  # (B, 3, H, W) float in [0, 1], already augmented
    texts: list[str]  # one caption per image
    image_ids: list[str]
    caption_ids: list[str]
    aug_ids: torch.Tensor  # (B,) int64


@dataclass
class StudentFeatures:
    """Student outputs for a batch; ``image``/``text`` are L2-normalised (B, D)."""

    image: torch.Tensor
    text: torch.Tensor
    logit_scale: torch.Tensor  # log scale (κ = exp)
    #: In a multi-process run with ``distributed.local_loss``: this process's query rows of the
    #: gathered batch. A method then takes row-wise terms over these rows only (a sum over rows
    #: scaled by B/len(rows)), so the average over processes is the whole-batch value. ``None``:
    #: the loss is over every row (one process, or the default whole-batch mode).
    rows: slice | None = None


@dataclass
class TeacherOutputs:
    """Teacher outputs for a batch, L2-normalised; token features only when asked for."""

    image: torch.Tensor
    text: torch.Tensor
    logit_scale: torch.Tensor
    image_tokens: torch.Tensor | None = None
    text_tokens: torch.Tensor | None = None
    fusion: FusionStates | None = None  # the fusion teacher's per-item states, when one is configured


class TeacherSource:
    """Gives teacher outputs for a batch: :class:`OnlineTeacher` runs the frozen teacher,
    ``distill.cache.CachedTeacher`` reads them from disk. Both give the same numbers.

    ``fusion`` is the frozen fusion teacher when one is configured (key ``teacher.fusion``):
    the source then also fills :attr:`TeacherOutputs.fusion` with its per-item states, and a
    method scores the pairs it needs with ``fusion.pair_logits(states, ...)`` (cheap: the pair
    head only), whether the states were computed now or read from the cache."""

    embed_dim: int
    spec: str
    fusion: FusionTeacher | None = None

    def __call__(self, batch: Batch) -> TeacherOutputs:
        raise NotImplementedError


@dataclass
class MethodOutput:
    """``losses``: named, weighted scalar terms whose keys end in ``_loss`` (the trainer sums
    them); ``report``: floats worth logging (temperatures, weights, accuracies)."""

    losses: dict[str, torch.Tensor]
    report: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, value in self.losses.items():
            if not key.endswith("_loss"):
                raise ValueError(f"loss term {key!r} must end in '_loss'")
            if value.dim() != 0:
                raise ValueError(f"loss term {key!r} must be a scalar, got shape {tuple(value.shape)}")

    def total(self) -> torch.Tensor:
        return torch.stack(list(self.losses.values())).sum()


@dataclass(frozen=True)
class MethodArgs:
    """Base of every method's own frozen config dataclass (the ``method_args`` YAML mapping)."""

    w_task: float = 1.0


@dataclass(frozen=True)
class TunedArgs:
    """Method arguments chosen by an experiment rather than taken from the paper, and where.

    ``values`` are what the demo trains the method with (a subset of its ``Args``; checked when
    the method is registered); ``chosen_by`` names the benchmark JSON that chose them (plus at
    most one short clause), so the figures stay in that file and in docs/results.md, never
    restated by hand in code."""

    values: Mapping[str, Any]
    chosen_by: str


class DistillMethod(nn.Module):
    """Base of every method. Subclasses set ``name``, ``summary``, ``needs``, ``Args`` and
    implement ``forward``; :func:`~clipdistill.distill.registry.register_method` enters them.

    ``student`` is the trainable model; ``teacher`` is ``None`` only for methods that need
    nothing (the baseline). Trainable extras (projectors, attention) are submodules
    of the method, so the trainer's optimiser sees them; they are never exported.

    The class attributes are the method's metadata; the demo, the report, the benchmarks and
    the trainer's checks read them through the registry instead of listing methods by name.
    """

    name: ClassVar[str] = ""
    #: One line for ``report.md``: what a reader needs to know to choose between methods.
    summary: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    #: What the method uses when it is configured but can do without (DCD's fusion scores fall
    #: back to the dual teacher's); the trainer refuses a configured input no method uses.
    optional_needs: ClassVar[frozenset[str]] = frozenset()
    Args: ClassVar[type[MethodArgs]] = MethodArgs
    #: Arguments tuned on the val split (the demo trains with them); ``None``: the defaults.
    tuned: ClassVar[TunedArgs | None] = None
    #: The no-teacher baseline: the report's "scratch" row, which the others are compared with.
    baseline: ClassVar[bool] = False
    #: The loss term that is the student's own contrastive task: every other term's gradient is
    #: measured against it (train/term_gradients.py).
    task_term: ClassVar[str] = "task_loss"

    @classmethod
    def teachers(cls) -> frozenset[str]:
        """The teachers it reads, needed or optional: ``"dual"`` and/or ``"fusion"``."""
        return frozenset(TEACHER_OF_NEED[need] for need in cls.needs | cls.optional_needs)

    def __init__(self, student_dim: int, teacher: TeacherSource | None, args: MethodArgs) -> None:
        super().__init__()
        self.student_dim = student_dim
        self.teacher = teacher
        self.args = args
        if teacher is not None and "fusion" in self.teachers():
            require_trained_fusion(self.name, getattr(teacher, "fusion", None))

    def forward(self, batch: Batch, student: StudentFeatures) -> MethodOutput:
        raise NotImplementedError

    def teacher_outputs(self, batch: Batch) -> TeacherOutputs:
        if self.teacher is None:
            raise MethodConfigError(
                f"method {self.name!r} needs a teacher but none was configured (key 'teacher.spec')"
            )
        return self.teacher(batch)


def require_trained_fusion(method: str, fusion: FusionTeacher | None) -> None:
    """Refuse a fusion teacher whose pair head is untrained (``FusionTeacher.untrained``).

    Every method that reads a fusion teacher's scores or features is built through
    :class:`DistillMethod`, which calls this. An untrained ``fusion:`` head scores exactly like
    the dual teacher and its heads g, h are random, so a run would report a fusion teacher that
    adds nothing, or random feature targets. A stand-in without ``untrained`` counts as trained."""
    untrained = getattr(fusion, "untrained", None)
    why = untrained() if callable(untrained) else None
    if why is None:
        return
    assert fusion is not None
    dual = fusion.dual_spec or "DUAL_TEACHER"
    raise MethodConfigError(
        f"method {method!r}: fusion teacher {fusion.spec} (key 'teacher.fusion') has an untrained pair head "
        f"({why}); train one with `clipdistill teacher train-fusion --teacher {dual} --data DATA --out FOLDER` "
        "and set 'teacher.fusion' to fusion:FOLDER"
    )


def build_method_args(cls: type[DistillMethod], raw: Mapping[str, Any] | None) -> MethodArgs:
    """The method's own config from a mapping; unknown keys and wrong types name the key.

    Scalars (and optional scalars) are checked by the training config's own checker
    (:func:`clipdistill.config.check_value`), so a key means the same in ``method_args`` as
    anywhere else in the YAML; containers are left to the method's ``__post_init__``, which
    knows their meaning."""
    raw = dict(raw or {})
    known = {f.name for f in fields(cls.Args)}
    hints = typing.get_type_hints(cls.Args)
    for key, value in raw.items():
        if key not in known:
            hint = difflib.get_close_matches(key, list(known), n=1)
            raise MethodConfigError(
                f"unknown key 'method_args.{key}' for method {cls.name!r}; valid: {', '.join(sorted(known))}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
            )
        if _is_scalar(hints[key]):
            try:
                raw[key] = check_value(f"method_args.{key}", value, hints[key])
            except ConfigError as error:
                raise MethodConfigError(str(error)) from error
    try:
        return cls.Args(**raw)
    except (TypeError, ValueError) as error:
        raise MethodConfigError(f"method {cls.name!r}: {error}") from error


def _is_scalar(annotation: Any) -> bool:
    """A bool/int/float/str annotation, or an optional one."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    return all(option in _SCALARS for option in options or (annotation,))


_SCALARS = (bool, int, float, str, type(None))
