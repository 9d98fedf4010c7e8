"""What a ``clipdistill distill`` run is, in one typed config: teacher, fusion teacher, cache,
student, methods and their arguments, budget, export and index.

A run is resolved in layers, each a deep-merged mapping checked against :class:`RunConfig`
(unknown keys and wrong types name the dotted key, as the training config does):

1. the code's defaults (the dataclasses below, and for ``None`` values the defaults of the stage
   that reads them: the LiT trainer, the fusion trainer, the method's own arguments);
2. a preset, a YAML file shipped in ``clipdistill/presets/`` (``quick``, ``full``) holding only
   what differs from those defaults;
3. ``--config FILE.yaml`` files, in order;
4. the command's flags (``--teacher``, ``--student``, ``--students``, ``--methods``, ``--data``, ...);
5. ``--set key=value`` overrides.

The resolved config is written to ``OUT/config.yaml`` and is complete, so
``clipdistill distill --config OUT/config.yaml --out NEW`` runs the same job again.

Methods are named ``NAME`` or ``NAME:VARIANT``. A method's variants live in its own class:
``paper`` (its paper's arguments, the defaults of its ``Args``) and, where a val sweep chose
otherwise, ``tuned`` (``DistillMethod.tuned``); ``registry.method_variants`` lists them. A
plain name trains ``default_variant``, which falls back to ``paper`` for a method without that
variant; ``method_args`` adds per-method overrides on top of the variant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from clipdistill.config import (
    AugmentConfig,
    ConfigError,
    OptimConfig,
    StudentConfig,
    apply_override,
    check_keep_checkpoints,
    deep_merge,
    from_dict,
    read_yaml,
    to_dict,
)
from clipdistill.student_ladder import student_variants

#: The teacher a run trains when none is given: the ImageNet EfficientNet-Lite0 trunk aligned to
#: frozen all-MiniLM-L6-v2 on the run's own data (``lit:`` = "train this LiT teacher first").
DEFAULT_TEACHER = "lit:efficientnet-lite0"
FUSION_CHOICES = ("auto", "none")


@dataclass(frozen=True)
class RunDataConfig:
    """The data a run reads; ``path`` None is the builtin emoji set (rendered at ``emoji_size``)."""

    path: str | None = None
    images: str | None = None
    val_path: str | None = None  # a file that is the val split whole (``path`` is then train)
    test_path: str | None = None  # a file that is the test split whole
    split_seed: int = 0  # seed of the splits carved from train when the data has none
    group_by: str | None = None  # a column whose groups a carved split keeps whole
    emoji_size: int = 64  # render size of the builtin emoji set (ignored with ``path``)


@dataclass(frozen=True)
class RunTeacherConfig:
    """The dual teacher. A ``lit:`` spec is trained on the run's data first (its budget below, each
    ``None`` the LiT trainer's default for that architecture, ``train/lit.py``); any other spec
    (``openclip:NAME@TAG``, ``local-dir:``, ``hf-hub:``, ``hf:``, ``run:``) is used as it is."""

    spec: str = DEFAULT_TEACHER
    allow_random: bool = False  # accept a teacher without pretrained weights (tests; almost never meant)
    epochs: int | None = None
    lr: float | None = None
    frozen_stages: int | None = None
    # ``linear``: a trainable map on the frozen text tower's sentence features (LiTConfig.text_proj);
    # ``none`` keeps the tower's own space. ``None`` = the architecture's default (``none``).
    text_proj: str | None = None
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.text_proj not in (None, "none", "linear"):
            raise ConfigError(f"key 'teacher.text_proj' must be none or linear, got {self.text_proj!r}")


@dataclass(frozen=True)
class RunFusionConfig:
    """The single-stream fusion teacher that ``mcad`` and ``dcd`` read. ``auto``: trained on the
    run's LiT teacher when a method reads one (budget below, ``None`` = the fusion trainer's
    default, ``train/fusion.py``); ``none``: no fusion teacher; otherwise a fusion spec
    (``fusion:PATH``, ``blip-itm:ID``)."""

    spec: str = "auto"
    epochs: int | None = None
    max_seconds: float | None = None
    k_augmentations: int | None = None
    negatives: int | None = None


@dataclass(frozen=True)
class RunCacheConfig:
    """The teacher cache. ``image_size`` is the size every stage decodes the data at (the LiT
    teacher's training, the fusion teacher, the cache, the students and the test split), so the
    frozen towers' rows computed for one stage serve the next; each model resizes to its own input."""

    image_size: int = 64


@dataclass(frozen=True)
class RunEvalConfig:
    """The test split's efficiency stage: teacher and one student per network, exported to ONNX
    and timed interleaved in one process (``eval/demo_efficiency.py``)."""

    onnx_repeats: int = 30  # timed calls per graph and batch size; the median is reported
    onnx_threads: int | None = None  # ONNX Runtime intra-op threads; None: the cores this process may use
    # The teacher also read at these smaller inputs, without retraining: the cheapest alternative
    # to a student, on the report's quality/cost frontier (sizes at or above its own are skipped;
    # a teacher with a fixed input size, such as a ViT, gets none). Each size is one more graph in
    # the efficiency stage's interleaved timing, whose sessions are all alive at once.
    teacher_image_sizes: list[int] = field(default_factory=lambda: [128, 96])

    def __post_init__(self) -> None:
        small = [size for size in self.teacher_image_sizes if size < 32]
        if small:
            raise ConfigError(f"key 'eval.teacher_image_sizes': sizes must be >= 32 px, got {small}")


@dataclass(frozen=True)
class RunExportConfig:
    int8: bool = True  # also write the int8 graphs (dynamic quantisation) beside fp32


@dataclass(frozen=True)
class RunIndexConfig:
    factory: str = "HNSW32"  # a FAISS index factory string over the test images


@dataclass(frozen=True)
class RunConfig:
    """A whole distillation run (see the module docstring for how it is resolved)."""

    data: RunDataConfig = field(default_factory=RunDataConfig)
    teacher: RunTeacherConfig = field(default_factory=RunTeacherConfig)
    fusion: RunFusionConfig = field(default_factory=RunFusionConfig)
    cache: RunCacheConfig = field(default_factory=RunCacheConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    # A ladder of students (student_ladder.py): each entry a mapping of `student` keys over it,
    # plus an optional `label` (else derived: lite0@64). Every method x seed trains on each, with
    # the same budget, into students/<label>/. None or empty: `student` alone, in students/.
    students: list[dict[str, Any]] | None = None
    methods: list[str] | None = None  # None: every registered method, in registration order
    default_variant: str = "paper"  # the variant a method named without one trains
    method_args: dict[str, dict[str, Any]] = field(default_factory=dict)  # per method, over its variant
    seeds: int = 1
    # What each finished student keeps of its checkpoints besides its model folder (TrainConfig's
    # keep_checkpoints): none by default, as a finished student's model and summary are all the
    # run reads again; "latest" or "all" to fine-tune on from the optimiser state.
    keep_checkpoints: str = "none"
    # Where the teacher cache is built and the students train (cpu, cuda, cuda:N; an absent device
    # is an error). The offline LiT teacher and its fusion head train on the CPU.
    device: str = "cpu"
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    eval: RunEvalConfig = field(default_factory=RunEvalConfig)
    export: RunExportConfig = field(default_factory=RunExportConfig)
    index: RunIndexConfig = field(default_factory=RunIndexConfig)

    def __post_init__(self) -> None:
        check_keep_checkpoints(self.keep_checkpoints)
        if self.seeds < 1:
            raise ConfigError(f"key 'seeds' must be >= 1, got {self.seeds}")
        if self.methods is not None and not self.methods:
            raise ConfigError("key 'methods' is empty; leave it out for every method, or list some")
        student_variants(self.student, self.students)  # each entry checked as `student` is, and labelled


def preset_names() -> list[str]:
    """The presets shipped in the package (``clipdistill/presets/*.yaml``)."""
    folder = resources.files("clipdistill") / "presets"
    return sorted(entry.name.removesuffix(".yaml") for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def preset_path(name: str) -> Path:
    """The YAML file of preset ``name`` (a shipped preset, or a path to a YAML file of one's
    own); an unknown name lists the valid ones."""
    if name.endswith((".yaml", ".yml")):
        return Path(name)  # read_yaml names the file if it does not exist
    names = preset_names()
    if name not in names:
        from clipdistill.models.spec import close_matches

        hint = close_matches(name, names)
        raise ConfigError(
            f"unknown preset {name!r}; valid: {', '.join(names)}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
        )
    return Path(str(resources.files("clipdistill") / "presets" / f"{name}.yaml"))


def _list_value(raw: Any) -> Any:
    """YAML reads ``a,b`` as one string; the methods key takes a list or a comma-separated string."""
    if isinstance(raw, str):
        return [item.strip() for item in raw.split(",") if item.strip()]
    return raw


def resolve_run_config(
    *,
    preset: str | None = "quick",
    configs: list[str | Path] | None = None,
    values: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    replace: tuple[str, ...] = (),
) -> RunConfig:
    """Resolve the layers in order (module docstring): ``preset`` (None: the code's defaults
    alone), ``configs`` files, ``values`` (the command's flags, as a nested mapping) and
    ``overrides`` (``key=value``). The sections named in ``replace`` are taken whole from
    ``values`` instead of merged (``--student`` names another student: the preset's initialisation
    and input size were for its own)."""
    raw: dict[str, Any] = {}
    layers = ([preset_path(preset)] if preset is not None else []) + list(configs or [])
    for path in layers:
        raw = deep_merge(raw, read_yaml(path))
    values = dict(values or {})
    for section in replace:
        if section in values:
            raw[section] = values.pop(section)
    raw = deep_merge(raw, values)
    for override in overrides or []:
        raw = apply_override(raw, override)
    if "methods" in raw:
        raw["methods"] = _list_value(raw["methods"])
    return from_dict(RunConfig, raw)


def run_config_dict(config: RunConfig) -> dict[str, Any]:
    """The resolved config as plain data (what ``OUT/config.yaml`` and ``report.json`` hold)."""
    return to_dict(config)


def run_config_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(run_config_dict(config), sort_keys=False, allow_unicode=True)


def differing_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs (a rerun in the same folder)."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += differing_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys
