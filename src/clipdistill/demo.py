"""The main job, stage by stage, each stage skipped when its finished output exists.

data -> LiT teacher -> fusion teacher -> teacher cache -> one student per method and seed
(identical budgets) -> test-split evaluation + ONNX timing -> export of the best student -> embeddings ->
index -> report (``report.json``, ``report.md``, plots). Every stage writes its output with a
completion marker (a model file, ``summary.json``, ``export.json``, ``manifest.json``), so a
rerun after a crash, or with more methods or seeds, only does what is missing.

Layout of ``OUT``::

    data/                 the builtin emoji dataset (when no --data is given)
    teacher/  fusion/     the two teachers
    cache/                teacher outputs (+ fusion states) for the train split
    students/<method>-s<seed>/   normal training runs (+ test_metrics.json)
    export/  embeddings/  index/ the best student, deployed
    efficiency.json       teacher + students timed in ONNX Runtime (eval/demo_efficiency.py)
    report.json report.md pareto.png curves.png examples.png
"""

from __future__ import annotations

import datetime
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipdistill.errors import UserError
from clipdistill.io import atomic_write_json

# Which methods run, which get the fusion teacher and with which arguments is read from the
# methods' own metadata through the registry (``distill/registry.py``): every registered method
# by default, the fusion teacher for those that read it, and the arguments tuned on the val
# split (``DistillMethod.tuned``, chosen by benchmarks/methods.py) where a method has them; the
# methods' own defaults are the papers' values.


def __getattr__(name: str) -> Any:
    """``TUNED_METHOD_ARGS`` (per method: the tuned arguments the demo trains it with), read
    from the registry on first use: listing the methods imports torch, importing this module
    does not."""
    if name == "TUNED_METHOD_ARGS":
        from clipdistill.distill.methods import tuned_method_args

        return tuned_method_args()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class DemoPreset:
    """The budget of a demo run. ``quick`` is sized for ``make demo`` (20 minutes on 2 cores,
    install included); ``full`` is the budget behind the published table."""

    seeds: int
    student_epochs: int
    teacher_max_seconds: float | None  # None: TeacherTrainConfig's full budget
    fusion_max_seconds: float | None
    fusion_epochs: int
    teacher_epochs: int | None = None  # None: TeacherTrainConfig's default
    fusion_k_augmentations: int = 4  # replayed augmentations the fusion head trains on (encoding cost scales with it)
    fusion_negatives: int = 31  # hard negatives per caption's list (training cost scales with 1 + it)
    student_warmup_steps: int = 50  # lr warm-up; a short run needs a short one or it never reaches the peak lr
    batch_size: int = 128
    lr: float = 2e-3
    k_augmentations: int = 2
    image_size: int = 64  # decode size: the teacher cache, student training and the test split read this
    student: str = "tiny"
    index_factory: str = "HNSW32"
    # The teacher: a lit:WEIGHTS[@SIZE] spec (a pretrained trunk, models/lit.py) with its first
    # stages frozen, or None for LiTConfig's scratch default (tests use that: it trains in seconds).
    teacher_model: str | None = None
    teacher_frozen_stages: int = 0
    teacher_lr: float | None = None  # None: the teacher config's (scratch or pretrained_teacher_config)
    data_size: int = 64  # the builtin emoji set's render size (ignored with --data)
    student_image_size: int | None = None  # None: the student preset's own
    student_image_init: str = "random"  # student.image_init
    student_text_init: str = "random"  # student.text_init
    student_frozen_stages: int = 0  # student.frozen_stages


# The teacher and student every preset distils (issue 17, measured in docs/results.md): the
# ImageNet EfficientNet-Lite0 trunk at its native 224 px, stages 0-4 frozen, aligned to frozen
# MiniLM (test rsum 223.5 after 4 epochs on the 128 px emoji set, against 157.3 for the old
# scratch resnet10t); the student is the same trunk at 96 px starting from the teacher's own
# image tower, with a 2-layer text tower inherited from MiniLM (test rsum 189.0 after 2
# conaclip epochs, against 136.3 from ImageNet weights and 113.6 at 64 px). Its stem and stages
# 0-4 stay frozen (student.frozen_stages 5): 3 seeds on the quick budget, val rsum conaclip
# 158.6 vs 148.1 fully trained, clip 113.1 vs 91.0, at half the step time (test: conaclip 171.7
# vs 181.6, clip 126.3 vs 97.2; docs/results.md).
_PRETRAINED = {  # the teacher keys equal train.lit's DEFAULT_TEACHER_SPEC/_FROZEN_STAGES, PRETRAINED_LR (tested)
    "teacher_model": "lit:efficientnet-lite0",
    "teacher_frozen_stages": 5,
    "teacher_lr": 2e-3,
    "data_size": 128,  # Noto's bitmaps are 136 x 128: the teacher upsamples, the student downsamples
    "image_size": 128,
    "student": "lite0",
    "student_image_size": 96,
    "student_image_init": "teacher",
    "student_text_init": "teacher",
    "student_frozen_stages": 5,
}

PRESETS: dict[str, DemoPreset] = {
    # quick: budgets in epochs, not seconds, so a loaded machine takes longer instead of
    # shipping a weaker teacher. Sized for `make demo` on 2 cores: teacher 4 epochs, fusion head
    # 1 epoch (a pass over the captions: 226 steps) of 15 negatives on 1 augmentation (2 gave the
    # same val re-ranking, R@1 17.9 vs 18.1, and cost one more view to encode), students 2 epochs
    # (warm-up 10 of their 44 steps).
    "quick": DemoPreset(
        seeds=1,
        student_epochs=2,
        student_warmup_steps=10,
        teacher_max_seconds=None,
        fusion_max_seconds=None,
        fusion_epochs=1,
        teacher_epochs=4,
        fusion_k_augmentations=1,
        fusion_negatives=15,
        **_PRETRAINED,
    ),
    # full: a longer teacher (8 epochs), its fusion head (3 epochs), 3 seeds of 4 student epochs.
    "full": DemoPreset(
        seeds=3,
        student_epochs=4,
        teacher_max_seconds=None,
        fusion_max_seconds=None,
        fusion_epochs=3,
        teacher_epochs=8,
        **_PRETRAINED,
    ),
}


class DemoError(UserError, ValueError):
    """A bad demo request (unknown preset or method, a dataset without the needed splits)."""


def parse_methods(methods: str | None) -> list[str]:
    """``"a,b"`` -> validated list (default: every registered method); names are checked
    against the registry."""
    from clipdistill.distill.methods import get_method, list_methods

    names = list_methods() if not methods else [m.strip() for m in methods.split(",") if m.strip()]
    if not names:
        raise DemoError(f"--methods is empty; give e.g. --methods {','.join(list_methods()[:2])}")
    for name in names:
        get_method(name)  # close-match error for a typo
    if len(set(names)) != len(names):
        raise DemoError(f"--methods lists a method twice: {','.join(names)}")
    return names


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


_STARTED = [time.perf_counter()]  # reset by run_demo; stage lines show time since the start


def _say(message: str) -> None:
    from rich.console import Console

    elapsed = time.perf_counter() - _STARTED[0]
    Console(stderr=True, soft_wrap=True).print(f"[bold cyan]demo[/] [{elapsed:6.1f} s] {message}", highlight=False)


def _stage(name: str, done: bool) -> bool:
    """Announce a stage; returns whether it must run."""
    _say(f"{name}: {'done already, skipped' if done else 'running'}")
    return not done


# --- stages ------------------------------------------------------------------------------------
def _dataset(
    out: Path, data: str | Path | None, images: str | Path | None, splits: Any, preset: DemoPreset
) -> tuple[Any, str, str | None]:
    from clipdistill.data.splits import SplitOptions, make_splits

    if data is None and splits is not None and (splits.val_data or splits.test_data):
        raise DemoError("--val-data/--test-data need --data (the train file) too")
    if data is None:
        from clipdistill.data.emoji import build_emoji_dataset

        _stage("data (builtin emoji)", (out / "data" / "dataset.json").is_file())
        dataset = build_emoji_dataset(out / "data", size=preset.data_size)  # skips rendering when complete
        data_path, images_root = str(out / "data"), None
    else:
        _stage(f"data ({data})", True)
        dataset, data_path, record = make_splits(out / "data", data, images, splits or SplitOptions())
        images_root = None if record is not None or images is None else str(images)  # the split file is absolute
    missing = {"train", "val", "test"} - set(dataset.split_counts())
    if missing:
        raise DemoError(f"{data_path}: the demo needs train, val and test splits; missing {', '.join(sorted(missing))}")
    return dataset, data_path, images_root


def _teacher(out: Path, dataset: Any, preset: DemoPreset) -> str:
    from dataclasses import replace

    from clipdistill.models.lit import MODEL_FILE
    from clipdistill.train.lit import TeacherTrainConfig, pretrained_teacher_config, train_lit_teacher

    teacher_dir = out / "teacher"
    if _stage("teacher (LiT)", (teacher_dir / MODEL_FILE).is_file() and (teacher_dir / "train_summary.json").is_file()):
        if preset.teacher_model is None:
            config = TeacherTrainConfig()  # LiTConfig's scratch default
        else:
            config = pretrained_teacher_config(preset.teacher_model, preset.teacher_frozen_stages)
        budget = {"epochs": preset.teacher_epochs, "lr": preset.teacher_lr}
        config = replace(
            config,
            max_seconds=preset.teacher_max_seconds,
            decode_size=preset.image_size,  # the cache's pixels: its frozen rows are reused (encoding_memo)
            **{key: value for key, value in budget.items() if value is not None},
        )
        train_lit_teacher(dataset, teacher_dir, config)
    return f"run:{teacher_dir}"


def _fusion(out: Path, dataset: Any, teacher_spec: str, preset: DemoPreset) -> str:
    from clipdistill.train.fusion import FusionTrainConfig, train_fusion_teacher

    fusion_dir = out / "fusion"
    if _stage("fusion teacher", (fusion_dir / "train_summary.json").is_file()):
        config = FusionTrainConfig(
            epochs=preset.fusion_epochs,
            max_seconds=preset.fusion_max_seconds,
            k_augmentations=preset.fusion_k_augmentations,
            negatives=preset.fusion_negatives,
            image_size=preset.image_size,  # as the teacher and the cache decode (encoding_memo reuses rows)
        )
        train_fusion_teacher(teacher_spec, dataset, fusion_dir, config)
    return f"fusion:{fusion_dir}"


def _cache(out: Path, dataset: Any, teacher_spec: str, fusion_spec: str | None, preset: DemoPreset) -> str:
    from clipdistill.distill.cache import build_cache

    _stage("teacher cache", (out / "cache" / "manifest.json").is_file())
    path = build_cache(  # reuses a finished cache built for exactly this request, else (re)builds
        teacher_spec,
        dataset,
        out / "cache",
        k_augmentations=preset.k_augmentations,
        image_size=preset.image_size,
        fusion=fusion_spec,
    )
    return str(path)


def _student_config(
    out: Path, method: str, seed: int, preset: DemoPreset, data: str, images: str | None, teacher: dict[str, Any]
) -> Any:
    from clipdistill.config import TrainConfig, from_dict
    from clipdistill.data.bad_samples import default_policy
    from clipdistill.distill.methods import get_method

    method_cls = get_method(method)
    fusion = teacher.get("fusion") if "fusion" in method_cls.teachers() else None
    return from_dict(
        TrainConfig,
        {
            "name": f"{method}-s{seed}",
            "out_dir": str(out / "students"),
            "method": method,
            "method_args": dict(method_cls.tuned.values) if method_cls.tuned is not None else {},
            "seed": seed,
            "data": {
                "path": data,
                "images": images,
                "image_size": preset.image_size,
                "on_bad_sample": default_policy(),  # `clipdistill --on-bad-sample skip demo`
            },
            "student": {
                "preset": preset.student,
                "image_size": preset.student_image_size,
                "image_init": preset.student_image_init,
                "text_init": preset.student_text_init,
                "frozen_stages": preset.student_frozen_stages,
            },
            "teacher": {"spec": teacher["spec"], "cache": teacher["cache"], "fusion": fusion},
            "augment": {"k": preset.k_augmentations},
            "optim": {
                "epochs": preset.student_epochs,
                "batch_size": preset.batch_size,
                "lr": preset.lr,
                "warmup_steps": preset.student_warmup_steps,
            },
        },
    )


def _train_student(config: Any) -> dict[str, Any]:
    from clipdistill.train.trainer import train

    summary_path = config.run_dir / "summary.json"
    if not _stage(f"student {config.name}", summary_path.is_file()):
        return _read_json(summary_path)
    resume = "latest" if (config.run_dir / "checkpoints" / "latest.pt").is_file() else None
    return train(config, resume=resume)


def _test_metrics(spec: str, test: Any, pixels: Any) -> dict[str, Any]:
    """Recall@K of ``spec`` on the test split (no efficiency figures)."""
    from clipdistill.eval.evaluate import evaluate_loaded
    from clipdistill.models.teachers import load_model

    return evaluate_loaded(load_model(spec), test, pixels=pixels, efficiency=False)


def _evaluate(
    spec: str,
    test: Any,
    pixels: Any,
    path: Path,
    metrics: dict[str, Any] | None = None,
    same_network: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Test metrics + eager efficiency of ``spec``, memoised in ``path``.

    ``metrics``: its recall, computed already (the teacher's, inside the encoding memo where its
    training had just encoded the test rows: a second pass of the 224 px trunk cost 20 s).
    ``same_network``: an earlier result of the identical network (every demo student is one
    network: training-only modules are dropped), whose efficiency figures are reused instead of
    timed again. Eager latency takes 3 repeats: the report's speed-up comes from the ONNX Runtime
    stage (eval/demo_efficiency.py, 30 interleaved repeats) and eager figures are a cross-check."""
    from clipdistill.eval.efficiency import tower_efficiency
    from clipdistill.models.teachers import load_model

    if path.is_file():
        return _read_json(path)
    result = dict(metrics) if metrics is not None else _test_metrics(spec, test, pixels)
    if same_network is not None:
        result.update({key: same_network[key] for key in ("params", "flops", "latency_ms", "peak_mem_mb")})
    else:
        model = load_model(spec)
        device = str(next(model.parameters()).device)
        result.update(tower_efficiency(model, device=device, repeats=3, warmup=1))
    atomic_write_json(path, result)
    return result


def _entry(result: dict[str, Any]) -> dict[str, Any]:
    from clipdistill.eval.retrieval import METRIC_KEYS

    return {
        "params": result["params"],
        "flops": result["flops"],
        "metrics": {k: result[k] for k in METRIC_KEYS},
        "latency_ms": result["latency_ms"],
        "peak_mem_mb": result["peak_mem_mb"],
    }


def _summary(students: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for method in dict.fromkeys(s["method"] for s in students):
        values = [s["metrics"]["rsum"] for s in students if s["method"] == method]
        rows.append(
            {
                "method": method,
                "rsum_mean": statistics.mean(values),
                "rsum_std": statistics.pstdev(values) if len(values) > 1 else 0.0,
                "n_seeds": len(values),
            }
        )
    return rows


def _best_student(students: list[dict[str, Any]]) -> dict[str, Any]:
    """The student to ship: best mean **val** rsum over its seeds (test stays untouched by the
    choice), then its best seed on val."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for student in students:
        by_method.setdefault(student["method"], []).append(student)
    method = max(by_method, key=lambda m: statistics.mean(s["val_rsum"] for s in by_method[m]))
    return max(by_method[method], key=lambda s: s["val_rsum"])


def _deploy(out: Path, spec: str, data: str, images: str | None, factory: str) -> dict[str, Any]:
    from clipdistill.serve.embed import embed_dataset
    from clipdistill.serve.export import export_model, read_parity
    from clipdistill.serve.index import build_index

    export_dir, emb_dir, index_dir = out / "export", out / "embeddings", out / "index"
    exported = export_dir / "export.json"
    if exported.is_file() and _read_json(exported).get("source", {}).get("spec") not in (None, spec):
        _say(f"export: {export_dir} holds another model; re-exporting {spec}")
        for stale in (export_dir / "export.json", emb_dir / "embeddings.json", index_dir / "manifest.json"):
            stale.unlink(missing_ok=True)
    if _stage(f"export {spec}", exported.is_file()):
        export_model(spec, export_dir, int8=True, data=data, images=images, split="test")
    if _stage("embeddings (test split)", (emb_dir / "embeddings.json").is_file()):
        embed_dataset(export_dir, data, emb_dir, images=images, split="test")
    if _stage(f"index ({factory})", (index_dir / "manifest.json").is_file()):
        build_index(emb_dir, index_dir, factory=factory)
    return {"spec": spec, "export": str(export_dir), "index": str(index_dir), "parity": read_parity(export_dir)}


# --- the job -----------------------------------------------------------------------------------
def run_demo(
    out: str | Path,
    *,
    data: str | Path | None = None,
    images: str | Path | None = None,
    preset: str | DemoPreset = "quick",
    methods: str | None = None,
    seeds: int | None = None,
    splits: Any = None,
) -> dict[str, Any]:
    """Run every stage (skipping finished ones) and write the report; returns ``report.json``.

    ``preset`` is a name from :data:`PRESETS` or a :class:`DemoPreset` (tests and sweeps);
    ``splits`` (:class:`~clipdistill.data.splits.SplitOptions`) says how a ``data`` without
    train/val/test gets them (val/test files, or carved from train with a seed)."""
    from clipdistill.data.images import load_image_tensor
    from clipdistill.distill.methods import fusion_methods
    from clipdistill.models.encoding_memo import clear_encoding_memos, encoding_memo
    from clipdistill.report import write_report

    if isinstance(preset, DemoPreset):
        settings, preset = preset, "custom"
    elif preset in PRESETS:
        settings = PRESETS[preset]
    else:
        raise DemoError(f"unknown demo preset {preset!r}; valid: {', '.join(PRESETS)}")
    names = parse_methods(methods)
    n_seeds = settings.seeds if seeds is None else seeds
    if n_seeds < 1:
        raise DemoError(f"--seeds must be >= 1, got {n_seeds}")
    started = _STARTED[0] = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    dataset, data_path, images_root = _dataset(out, data, images, splits, settings)
    with encoding_memo():  # the three stages encode the same captions and images with the same frozen towers
        teacher_spec = _teacher(out, dataset, settings)
        fusion_spec = _fusion(out, dataset, teacher_spec, settings) if set(names) & set(fusion_methods()) else None
        cache = _cache(out, dataset, teacher_spec, fusion_spec, settings)
        test = dataset.split("test")
        pixels = load_image_tensor(test.image_paths(), settings.image_size)
        teacher_path = out / "teacher" / "test_metrics.json"
        teacher_metrics = None if teacher_path.is_file() else _test_metrics(teacher_spec, test, pixels)
    clear_encoding_memos()
    teacher = {"spec": teacher_spec, "cache": cache, "fusion": fusion_spec}

    runs = []
    for method in names:
        for seed in range(n_seeds):
            config = _student_config(out, method, seed, settings, data_path, images_root, teacher)
            runs.append((config, _train_student(config)))

    _say("evaluating teacher and students on the test split")
    teacher_result = _evaluate(teacher_spec, test, pixels, teacher_path, metrics=teacher_metrics)
    students: list[dict[str, Any]] = []
    first_student: dict[str, Any] | None = None
    for config, summary in runs:
        path = config.run_dir / "test_metrics.json"
        result = _evaluate(summary["model"], test, pixels, path, same_network=first_student)
        first_student = first_student or result
        students.append(
            {
                "method": config.method,
                "method_args": dict(config.method_args),
                "seed": config.seed,
                "spec": summary["model"],
                "run_dir": str(config.run_dir),
                **_entry(result),
                "train_seconds": summary["train_seconds"],
                "val_rsum": summary["val"]["rsum"],
            }
        )

    report: dict[str, Any] = {
        "dataset": dataset.name,
        "split": "test",
        "n_images": len(test),
        "n_texts": test.n_texts(),
        "preset": preset,
        "budget": {
            "student": settings.student,
            "epochs": settings.student_epochs,
            "batch_size": settings.batch_size,
            "lr": settings.lr,
            "k_augmentations": settings.k_augmentations,
            "image_size": settings.image_size,
            "student_image_size": settings.student_image_size,
            "image_init": settings.student_image_init,
            "text_init": settings.student_text_init,
            "teacher_model": settings.teacher_model,
            "seeds": n_seeds,
        },
        "teacher": {
            "spec": teacher_spec,
            **_entry(teacher_result),
            "train_seconds": _read_json(out / "teacher" / "train_summary.json")["train_seconds"],
        },
        "fusion_teacher": _fusion_entry(out, fusion_spec),
        "students": students,
        "summary": _summary(students),
    }
    from clipdistill.eval.demo_efficiency import add_onnx_efficiency  # OUT/efficiency.json, memoised

    add_onnx_efficiency(out, report, stage=_stage, say=_say)  # onnx_ms etc. under teacher + students
    best = _best_student(students)
    report["best_student"] = {"method": best["method"], "seed": best["seed"], "selected_by": "val rsum"}
    report["deploy"] = _deploy(out, best["spec"], data_path, images_root, settings.index_factory)
    if data is not None and (out / "data" / "splits.json").is_file() and data_path == str(out / "data"):
        report["splits"] = _read_json(out / "data" / "splits.json")  # how train/val/test were made
    if dataset.skipped is not None and dataset.skipped.samples:
        report["bad_samples"] = dataset.skipped.summary()
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    report["machine"] = _machine()
    report["finished_utc"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    atomic_write_json(out / "report.json", report)
    _say("writing report.md and plots")
    write_report(out, report, dataset)
    _say("done")
    return report


def _machine() -> dict[str, Any]:
    """Where the numbers were measured (latencies and wall time mean little without it)."""
    import os
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        lines = cpuinfo.read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        cpu = names[0] if names else cpu
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return {"cpu": cpu, "cores": len(affinity), "torch": torch.__version__, "python": platform.python_version()}


def _fusion_entry(out: Path, fusion_spec: str | None) -> dict[str, Any] | None:
    """What the fusion teacher adds: its test-split re-ranking of the dual teacher's top-k."""
    if fusion_spec is None:
        return None
    summary = _read_json(out / "fusion" / "train_summary.json")
    from clipdistill.eval.efficiency import count_parameters
    from clipdistill.models.fusion import load_fusion_encoder

    encoder = load_fusion_encoder(out / "fusion", with_dual=False)
    return {
        "spec": fusion_spec,
        "params": count_parameters(encoder),
        "rerank_test": summary.get("test"),
        "train_seconds": summary.get("train_seconds"),
    }
