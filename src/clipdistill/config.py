"""Training configuration: frozen dataclasses loaded from YAML with ``key=value`` overrides.

Like nanoGPT's config, every knob lives in one typed place; unlike a loose dict, an unknown
or mistyped key is an error that names the dotted key (``optim.lr``) and a close match.
Several YAML files may be given and are deep-merged in order (a base file plus a method
file), then ``--set`` overrides apply. The resolved config is saved with the run.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from clipdistill.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration key that is unknown, mistyped, or inconsistent; the message names it."""


@dataclass(frozen=True)
class DataConfig:
    path: str = ""
    images: str | None = None
    # Pixels the data is decoded at (each model resizes to its own size). None: the size the
    # teacher cache was built at (``teacher.cache``; its manifest records it), else 64.
    image_size: int | None = None
    # Splits for data that has none (an open_clip CSV): the val/test split given whole by a file,
    # or carved from train (seeded, by image or by the ``group_by`` column); data/splits.py. Every
    # command that reads a dataset (train, eval, distill) carves the same way from these keys.
    val_path: str | None = None
    test_path: str | None = None
    split_seed: int = 0
    group_by: str | None = None
    on_bad_sample: str = "error"  # error: stop at the first bad image/caption/row; skip: drop it, count it
    # true: decode every train/val image into memory once (small sets); false: decode each batch's
    # images when the step needs them (memory independent of the data set's size; data/pixels.py)
    preload: bool = True
    workers: int = 0  # with preload false: DataLoader processes decoding the next batches ahead

    def split_options(self) -> Any:
        """The :class:`~clipdistill.data.splits.SplitOptions` these keys give."""
        from clipdistill.data.splits import SplitOptions

        return SplitOptions.of(self)

    def __post_init__(self) -> None:
        if self.on_bad_sample not in ("error", "skip"):
            raise ConfigError(f"key 'data.on_bad_sample' has value {self.on_bad_sample!r}; valid: error, skip")
        if self.workers < 0:
            raise ConfigError(f"key 'data.workers' has value {self.workers!r}; it must be >= 0")
        if self.workers and self.preload:
            raise ConfigError(
                f"key 'data.workers' is {self.workers} but 'data.preload' is true (preloaded images need no "
                "decoding workers); set data.preload=false to decode per batch, or data.workers=0"
            )


@dataclass(frozen=True)
class StudentConfig:
    preset: str = "tiny"
    model_config: str | None = None  # an open_clip model-config JSON file; overrides `preset`
    # An open_clip-loadable model spec (local-dir:PATH, hf-hub:ORG/REPO, openclip:NAME@TAG) whose
    # architecture AND weights the student starts from (distilling from MobileCLIP/TinyCLIP
    # checkpoints); overrides `preset`, exclusive with `model_config`.
    init: str | None = None
    # The preset's input size in pixels (None: the preset's own). Training decodes images at
    # `data.image_size` and the student resizes to this, so teacher and student can see the
    # same picture at different resolutions (resolution is a distillation lever).
    image_size: int | None = None
    # The preset's shared embedding width (None: the preset's own). A student that inherits the
    # teacher's image tower (image_init: teacher) inherits its projection too, so its embedding
    # must be as wide as the teacher's (768 for an all-mpnet-base-v2 LiT teacher; lite0 has 384).
    embed_dim: int | None = None
    # Pretrained starting points for a preset's towers (models/student_towers.py). image_init:
    # random | imagenet (the ImageNet EfficientNet-Lite weights; a tf_efficientnet_lite trunk such
    # as preset lite0). text_init: random | teacher (TinyCLIP-style inheritance from the teacher's
    # MiniLM text tower; needs its WordPiece vocabulary, as preset lite0 has).
    image_init: str = "random"
    text_init: str = "random"
    # Leading image-trunk stages kept fixed during training (stem + blocks[:n], BatchNorm in eval;
    # a timm EfficientNet trunk such as preset lite0's). They get no gradient and their output is
    # computed once per image view in the process (models/trunk_split.py), so a step costs only
    # the upper stages; from the teacher's or ImageNet's trunk the low-level filters transfer.
    frozen_stages: int = 0

    def __post_init__(self) -> None:
        if self.frozen_stages < 0:
            raise ConfigError(f"key 'student.frozen_stages' must be >= 0, got {self.frozen_stages}")
        for key, value, verb, what in (
            ("image_size", self.image_size, "resizes", "size"),
            ("embed_dim", self.embed_dim, "widens", "width"),
        ):
            if value is not None and (self.init or self.model_config):
                raise ConfigError(
                    f"key 'student.{key}' ({value}) {verb} a preset; 'student.init'/'student.model_config' "
                    f"give their own {what}"
                )
        if self.embed_dim is not None and self.embed_dim < 1:
            raise ConfigError(f"key 'student.embed_dim' must be >= 1, got {self.embed_dim}")
        if self.image_size is not None and self.image_size < 16:
            raise ConfigError(f"key 'student.image_size' must be >= 16 pixels, got {self.image_size}")
        for key, value, valid in (
            ("image_init", self.image_init, ("random", "imagenet", "teacher")),
            ("text_init", self.text_init, ("random", "teacher")),
        ):
            if value not in valid:
                raise ConfigError(f"key 'student.{key}' has value {value!r}; valid: {', '.join(valid)}")
            if self.init and value != "random":
                raise ConfigError(
                    f"keys 'student.init' ({self.init}) and 'student.{key}' ({value}) both give the student's first "
                    f"weights; set one (student.init already loads a checkpoint's weights)"
                )
        if self.init and self.model_config:
            raise ConfigError(
                f"keys 'student.init' ({self.init}) and 'student.model_config' ({self.model_config}) both give the "
                "student's architecture; set one"
            )


@dataclass(frozen=True)
class TeacherConfig:
    spec: str | None = None  # model spec, e.g. run:runs/teacher or openclip:ViT-B-32@laion2b_s34b_b79k
    cache: str | None = None  # folder built by `clipdistill cache build`; online teacher when absent
    # Single-stream fusion teacher (fusion:PATH or blip-itm:ID) for the methods that read one.
    # With `cache`, the cache must hold its states (`clipdistill cache build --fusion SPEC`).
    fusion: str | None = None
    # A teacher without pretrained weights (openclip:NAME with no @TAG, an untrained lit: spec)
    # is refused unless this is true: a whole run on a random teacher is almost never meant.
    allow_random: bool = False


@dataclass(frozen=True)
class OptimConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    grad_clip: float = 1.0
    amp: bool = True  # mixed precision on GPU only; ignored on CPU
    # Peak lr of the method's scalars (learned temperatures, gates: train/schedule.py
    # student_groups). AdamW moves a scalar by about its lr per step, so at the weights' lr a
    # temperature cannot leave its initialisation in a short run; at 0.1 the quick preset's 44
    # steps (warm-up + cosine: about 22 full steps) can move a log-temperature by up to ~2.
    scalar_lr: float = 0.1

    def __post_init__(self) -> None:
        if not self.scalar_lr > 0:
            raise ConfigError(f"key 'optim.scalar_lr' must be > 0, got {self.scalar_lr!r}")


@dataclass(frozen=True)
class AugmentConfig:
    k: int = 1  # fixed augmentations per image (id 0 = the plain image); the cache replays them
    scale: tuple[float, float] = (0.8, 1.0)
    max_shift: float = 0.1
    seed: int = 0  # seeds the fixed augmentations, not the run: runs with other seeds share a cache


@dataclass(frozen=True)
class DistributedConfig:
    """Multi-process training (``torchrun --nproc_per_node N -m clipdistill.train``); ignored in
    a 1-process run. ``optim.batch_size`` stays the global batch: each process takes 1/N of it.
    See ``train/distributed.py`` for what the two gather settings compute."""

    backend: str = "auto"  # gloo on CPU, nccl on CUDA
    gather_with_grad: bool = True  # open_clip's --gather-with-grad
    local_loss: bool = False  # open_clip's --local-loss: loss over this process's query rows only


KEEP_CHECKPOINTS = ("latest", "all", "none")


def check_keep_checkpoints(value: str) -> None:
    """``keep_checkpoints`` (of a training run, or of every student of a ``distill`` run) is one of
    :data:`KEEP_CHECKPOINTS`."""
    if value not in KEEP_CHECKPOINTS:
        raise ConfigError(f"key 'keep_checkpoints' has value {value!r}; valid: {', '.join(KEEP_CHECKPOINTS)}")


@dataclass(frozen=True)
class TrainConfig:
    name: str = "run"
    out_dir: str = "runs"
    method: str = "clip"
    method_args: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    device: str = "cpu"
    log_every: int = 10  # steps between log.jsonl lines
    save_every: int = 0  # steps between `latest` checkpoints; 0 = at the end of each epoch only
    # What a finished run keeps of checkpoints/ besides its model folder: "latest" (enough to
    # extend it with more epochs), "all" (also best.pt and latest.prev.pt) or "none" (the model
    # only). Each checkpoint holds the optimiser state, about three times the model's size.
    keep_checkpoints: str = "latest"
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        check_keep_checkpoints(self.keep_checkpoints)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation))


def check_value(key: str, value: Any, annotation: Any) -> Any:
    """Validate ``value`` against a (resolved) type annotation; return it, normalised.

    The one type checker of the project's configs: the training config's keys and a method's
    own ``method_args`` (``distill/base.py`` ``build_method_args``) both go through it."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return check_value(key, value, option)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"key {key!r}: invalid value {value!r}")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"key {key!r} must be a mapping, got {type(value).__name__} {value!r}")
        return from_dict(annotation, value, prefix=f"{key}.")
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"key {key!r} must be a list of {len(args)} values, got {value!r}")
        return tuple(check_value(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"key {key!r} must be a list, got {type(value).__name__} {value!r}")
        return [check_value(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"key {key!r} must be a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"key {key!r} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"key {key!r} must be an integer, got {type(value).__name__} {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads `1e-4` as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"key {key!r} must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"key {key!r} must be a string, got {type(value).__name__} {value!r}")
        return value
    if annotation is Any:
        return value
    raise ConfigError(f"key {key!r}: unsupported config type {_type_name(annotation)}")


def from_dict(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types name the dotted key."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in known:
            hint = difflib.get_close_matches(str(key), sorted(known), n=1)
            raise ConfigError(
                f"unknown config key {prefix + str(key)!r}"
                + (f" (did you mean {prefix + hint[0]!r}?)" if hint else f"; valid: {', '.join(sorted(known))}")
            )
        values[key] = check_value(prefix + key, value, hints[key])
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML/JSON."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_override(raw: dict[str, Any], override: str) -> dict[str, Any]:
    """Apply ``a.b.c=value``; the value is parsed as YAML (so ``1e-3``, ``true``, ``[1, 2]`` work)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key=value (e.g. optim.lr=1e-3)")
    dotted, _, text = override.partition("=")
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {override!r} has an empty key segment")
    value = yaml.safe_load(text) if text.strip() else ""
    nested: dict[str, Any] = value
    for key in reversed(keys):
        nested = {key: nested}
    return deep_merge(raw, nested)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {error}") from error
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
    return loaded


def load_config(paths: list[str | Path] | str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Deep-merge the YAML files in order, apply overrides, validate into a :class:`TrainConfig`."""
    raw: dict[str, Any] = {}
    for path in [paths] if isinstance(paths, str | Path) else paths:
        raw = deep_merge(raw, read_yaml(path))
    for override in overrides or []:
        raw = apply_override(raw, override)
    config = from_dict(TrainConfig, raw)
    if not config.data.path:
        raise ConfigError("key 'data.path' is required (a dataset folder, Karpathy JSON or CSV)")
    return config


DEFAULT_IMAGE_SIZE = 64


def with_derived_image_size(config: TrainConfig) -> TrainConfig:
    """``config`` with ``data.image_size`` filled in when it was left out: the teacher cache's
    (its manifest records the size it was built at, so the user never repeats it), else
    :data:`DEFAULT_IMAGE_SIZE`. The concrete value is what the run saves and compares on resume."""
    if config.data.image_size is not None:
        return config
    size = DEFAULT_IMAGE_SIZE
    if config.teacher.cache:
        from clipdistill.distill.cache.manifest import read_manifest

        size = int(read_manifest(config.teacher.cache)["preprocessing"]["image_size"])
    return dataclasses.replace(config, data=dataclasses.replace(config.data, image_size=size))


def save_config(config: TrainConfig, path: str | Path) -> None:
    from clipdistill.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))
