"""A ladder of students in one run: the student variants a ``distill`` run trains every method
on, their labels and run folders, and the ``--students`` flag that lists them.

Why: a user choosing what to ship compares a family of student sizes (as TinyCLIP and
MobileCLIP publish them), each trained by every method under one budget. Separate runs would
train the teacher and build the cache once per size, and no report would set the sizes side
by side. So ``RunConfig.students`` lists variants, each a mapping of
:class:`~clipdistill.config.StudentConfig` keys over ``RunConfig.student`` (and an optional
``label``), and every method × seed trains on each one.

Without variants (None or empty) the run trains ``student`` alone into
``students/<method>-s<seed>`` and its report names no student: the layout published reports
and their readers rely on. With variants, each trains into ``students/<label>/<method>-s<seed>``
and every report row is keyed by (method, label) (``run_summary.py``).

This module reads no torch, so the run config validates a ladder when it is parsed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from clipdistill.config import ConfigError, StudentConfig, from_dict, to_dict

#: One folder name: what a label becomes under ``OUT/students/``.
LABEL_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+=-]*")
#: What a variant naming an architecture key drops from the base student: the keys that would
#: override it (``model_config`` and ``init`` win over ``preset``) or that it refuses (a
#: model-config file and a checkpoint bring their own input size; a checkpoint its own weights).
_REPLACES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "preset": ("model_config", "init"),
        "model_config": ("init", "image_size", "embed_dim"),
        "init": ("model_config", "image_size", "embed_dim", "image_init", "text_init"),
    }
)
#: Keys that may tell variants of one architecture and size apart, as they appear in a label.
_LABEL_KEYS: Mapping[str, str] = MappingProxyType(
    {"embed_dim": "dim", "image_init": "img", "text_init": "txt", "frozen_stages": "frozen"}
)
_DEFAULTS: Mapping[str, Any] = MappingProxyType(to_dict(StudentConfig()))


@dataclass(frozen=True)
class StudentVariant:
    """One student network a run trains every method on; ``label`` None is the run's single
    student (no ladder), whose folders and report rows carry no label."""

    label: str | None
    config: StudentConfig

    @property
    def students_dir(self) -> str:
        """Where its runs live, relative to ``OUT``: ``students`` or ``students/<label>``."""
        return "students" if self.label is None else f"students/{self.label}"

    def report_fields(self) -> dict[str, str]:
        """What each of its student entries in report.json gains: ``student`` (the label, the
        report's grouping key) and ``network_label`` (the frontier's name for its network)."""
        return {} if self.label is None else {"student": self.label, "network_label": self.label}


def student_name(config: StudentConfig) -> str:
    """The student as its config names it: the starting checkpoint, model-config file or preset
    (in that order of precedence, as the student is built)."""
    return config.init or config.model_config or config.preset


def student_variants(base: StudentConfig, entries: list[dict[str, Any]] | None) -> list[StudentVariant]:
    """The variants of a run: ``[StudentVariant(None, base)]`` without entries, else one per
    entry, its keys over ``base`` (an architecture key drops the base keys it conflicts with),
    checked as ``student`` is, with errors naming ``students[i].KEY``, and a label each: the
    entry's ``label``, or one derived from what differs: architecture and size (``lite0@64``),
    and where those repeat, the keys whose values differ (``lite0-img=imagenet``).
    Two variants with one label are refused (their runs would share folders)."""
    if not entries:
        return [StudentVariant(None, base)]
    configs = [_variant_config(base, entry, index) for index, entry in enumerate(entries)]
    derived = [_derived_label(config, []) for config in configs]
    if len(set(derived)) < len(derived):  # one architecture and size twice: say what else differs
        differing = [key for key in _LABEL_KEYS if len({getattr(config, key) for config in configs}) > 1]
        derived = [_derived_label(config, differing) for config in configs]
    variants: list[StudentVariant] = []
    for index, (entry, config) in enumerate(zip(entries, configs, strict=True)):
        label = entry.get("label")
        if label is None:
            label = derived[index]
        elif not isinstance(label, str) or not LABEL_PATTERN.fullmatch(label):
            raise ConfigError(
                f"key 'students[{index}].label' has value {label!r}; a label is one folder name: letters, digits "
                "and . _ @ + = - (not starting with a symbol)"
            )
        same = next((i for i, other in enumerate(variants) if other.label == label), None)
        if same is not None:
            raise ConfigError(
                f"keys 'students[{same}]' and 'students[{index}]' both get the label {label!r}; give one of them "
                "a 'label' (or drop the repeated student)"
            )
        variants.append(StudentVariant(label, config))
    return variants


def _variant_config(base: StudentConfig, entry: Any, index: int) -> StudentConfig:
    prefix = f"students[{index}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"key {prefix!r} must be a mapping of student keys, got {type(entry).__name__} {entry!r}")
    values = {key: value for key, value in entry.items() if key != "label"}
    merged = to_dict(base)
    for key in values:
        for dropped in _REPLACES.get(key, ()):
            merged[dropped] = _DEFAULTS[dropped]
    merged.update(values)
    try:
        config = from_dict(StudentConfig, merged, prefix=f"{prefix}.")
    except ConfigError as error:
        # StudentConfig's own checks name their keys 'student.KEY'; the value at fault is this entry's.
        raise ConfigError(str(error).replace("'student.", f"'{prefix}.")) from None
    if "preset" in values and config.model_config is None and config.init is None:
        check_preset(config.preset, f"key '{prefix}.preset'")
    return config


def check_preset(name: str, where: str) -> None:
    """Refuse an unknown student preset before any stage runs (the trainer would refuse it only
    when that student's turn came, after the teacher and the cache)."""
    from clipdistill.model_configs import preset_names
    from clipdistill.models.kinds import close_matches

    names = preset_names()
    if name not in names:
        hint = close_matches(name, names)
        raise ConfigError(
            f"{where}: unknown student preset {name!r}; valid: {', '.join(names)}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
        )


def _derived_label(config: StudentConfig, differing: list[str]) -> str:
    """``NAME[@SIZE]`` plus ``-dim=…``/``-img=…``/``-txt=…``/``-frozen=…`` for the ``differing`` keys; NAME
    is the preset, the model-config file's stem or the checkpoint's last path component."""
    if config.init:
        name = config.init.partition(":")[2].rstrip("/").rsplit("/", 1)[-1] or config.init
    elif config.model_config:
        name = Path(config.model_config).stem
    else:
        name = config.preset
    label = name + (f"@{config.image_size}" if config.image_size is not None else "")
    label += "".join(f"-{_LABEL_KEYS[key]}={getattr(config, key)}" for key in differing)
    label = re.sub(r"[^A-Za-z0-9._@+=-]", "-", label)
    return label if LABEL_PATTERN.fullmatch(label) else f"s{label}"


def parse_students(text: str, flag: str = "--students") -> list[dict[str, Any]]:
    """``--students lite0@64,lite0@96,my_student.json``: each item a ``PRESET[@SIZE]``, an open_clip
    model-config JSON file, or a checkpoint spec to start from (``SCHEMA:NAME``, as ``--student``
    takes), as ``students`` entries (``{preset, image_size}``, ``{model_config}``, ``{init}``)."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ConfigError(f"{flag} is empty; give e.g. {flag} lite0@64,lite0@96")
    entries: list[dict[str, Any]] = []
    for item in items:
        if item.endswith(".json"):
            if not Path(item).is_file():
                raise ConfigError(f"{flag} {item}: no such open_clip model-config file")
            entries.append({"model_config": item})
        elif ":" in item:
            from clipdistill.models.spec import parse_spec

            parse_spec(item)  # a typo in the schema fails here, naming the valid ones
            entries.append({"init": item})
        else:
            name, at, size = item.partition("@")
            check_preset(name, f"{flag} {item}")
            if not at:
                entries.append({"preset": name})
            elif size.isdigit():
                entries.append({"preset": name, "image_size": int(size)})
            else:
                raise ConfigError(f"{flag} {item}: the size after '@' must be a whole number of pixels, got {size!r}")
    return entries


def ladder_budget(variants: list[StudentVariant]) -> dict[str, list[str]]:
    """What report.json's ``budget`` gains with a ladder: ``students``, the labels in order."""
    labels = [variant.label for variant in variants if variant.label is not None]
    return {"students": labels} if labels else {}
