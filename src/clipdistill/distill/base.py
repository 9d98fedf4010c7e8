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
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from clipdistill.models.fusion import FusionStates, FusionTeacher

NEEDS = ("teacher_embeddings", "teacher_tokens", "fusion_scores", "fusion_features")


class MethodConfigError(ValueError):
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


class DistillMethod(nn.Module):
    """Base of every method. Subclasses set ``name``, ``needs``, ``Args`` and implement ``forward``.

    ``student`` is the trainable model; ``teacher`` is ``None`` only for methods that need
    nothing (the ``clip`` baseline). Trainable extras (projectors, attention) are submodules
    of the method, so the trainer's optimiser sees them; they are never exported.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    #: What the method uses when it is configured but can do without (DCD's fusion scores fall
    #: back to the dual teacher's); the trainer refuses a configured input no method uses.
    optional_needs: ClassVar[frozenset[str]] = frozenset()
    Args: ClassVar[type[MethodArgs]] = MethodArgs

    def __init__(self, student_dim: int, teacher: TeacherSource | None, args: MethodArgs) -> None:
        super().__init__()
        self.student_dim = student_dim
        self.teacher = teacher
        self.args = args

    def forward(self, batch: Batch, student: StudentFeatures) -> MethodOutput:
        raise NotImplementedError

    def teacher_outputs(self, batch: Batch) -> TeacherOutputs:
        if self.teacher is None:
            raise MethodConfigError(
                f"method {self.name!r} needs a teacher but none was configured (key 'teacher.spec')"
            )
        return self.teacher(batch)


_REGISTRY: dict[str, type[DistillMethod]] = {}


def register_method(cls: type[DistillMethod]) -> type[DistillMethod]:
    """Class decorator: adding a method = one file + this decorator (+ one import line)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no 'name'")
    unknown = (set(cls.needs) | set(cls.optional_needs)) - set(NEEDS)
    if unknown:
        raise ValueError(f"{cls.__name__}.needs has unknown entries {sorted(unknown)}; valid: {NEEDS}")
    _REGISTRY[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    from clipdistill.distill import methods  # noqa: F401  (imports register every method)

    return sorted(_REGISTRY)


def get_method(name: str) -> type[DistillMethod]:
    names = list_methods()
    if name not in _REGISTRY:
        hint = difflib.get_close_matches(name, names, n=1)
        raise MethodConfigError(
            f"unknown method {name!r} (key 'method'); available: {', '.join(names)}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
        )
    return _REGISTRY[name]


def build_method_args(cls: type[DistillMethod], raw: dict[str, Any] | None) -> MethodArgs:
    """The method's own config from a mapping; unknown keys and wrong types name the key."""
    raw = dict(raw or {})
    known = {f.name: f for f in fields(cls.Args)}
    for key, value in raw.items():
        if key not in known:
            hint = difflib.get_close_matches(key, list(known), n=1)
            raise MethodConfigError(
                f"unknown key 'method_args.{key}' for method {cls.name!r}; valid: {', '.join(sorted(known))}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
            )
        raw[key] = _coerce(f"method_args.{key}", value, known[key].type)
    try:
        return cls.Args(**raw)
    except (TypeError, ValueError) as error:
        raise MethodConfigError(f"method {cls.name!r}: {error}") from error


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check scalar types (ints are accepted for floats); containers are checked by the
    method's own ``__post_init__``, which knows their meaning."""
    text = str(annotation)
    checks: dict[str, Callable[[Any], bool]] = {
        "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "bool": lambda v: isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
    }
    if text in checks and not checks[text](value):
        raise MethodConfigError(f"key {key!r} must be {text}, got {type(value).__name__} {value!r}")
    return float(value) if text == "float" else value
