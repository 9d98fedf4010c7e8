"""The main job (``clipdistill distill``; ``clipdistill demo`` with the emoji defaults), stage by
stage, each stage skipped when its finished output exists.

config -> data (splits carved when missing) -> teacher (a ``lit:`` one trained first) -> fusion
teacher -> teacher cache -> one student per method entry and seed (identical budgets), on
each student variant of a ladder (``students``, student_ladder.py) ->
test-split evaluation + ONNX timing -> export of the best student -> embeddings -> index ->
report (``report.json``, ``report.md``, plots). Every stage writes its output with a completion
marker (a model file, ``summary.json``, ``export.json``, ``manifest.json``), so a rerun after a
crash, or with more methods or seeds, only does what is missing.

Layout of ``OUT``::

    config.yaml           the resolved run config (``--config OUT/config.yaml`` reruns the job)
    data/                 the builtin emoji dataset, or the user's data with its splits
    teacher/  fusion/     the trained teachers (a given teacher is used where it is)
    cache/                teacher outputs (+ fusion states) for the train split
    students/<method>[-<variant>]-s<seed>/   normal training runs (+ test_metrics.json)
    students/<label>/<method>[-<variant>]-s<seed>/   the same, per student variant of a ladder
    export/  embeddings/  index/ the best student, deployed
    efficiency.json       teacher + students timed in ONNX Runtime (eval/demo_efficiency.py)
    report.json report.md pareto.png curves.png examples.png
"""

from __future__ import annotations

import datetime
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipdistill.errors import UserError
from clipdistill.io import atomic_write_json, atomic_write_text
from clipdistill.run_config import RunConfig, RunDataConfig, differing_keys, run_config_dict, run_config_yaml
from clipdistill.run_summary import add_vs_scratch, best_student, method_summary, shipped
from clipdistill.student_ladder import StudentVariant, ladder_budget, parse_students, student_name, student_variants

if TYPE_CHECKING:
    from clipdistill.models.encoding_memo import EncodingMemo


class DemoError(UserError, ValueError):
    """A bad run request (unknown preset or method, a dataset without the needed splits, a method
    whose teacher the run cannot give)."""


def parse_methods(methods: str | list[str] | None) -> list[str]:
    """``"a,b:tuned"`` or a list -> validated entries (default: every registered method); each
    ``NAME[:VARIANT]`` is checked against the registry (close-match errors, unknown variants)."""
    from clipdistill.distill.methods import list_methods, resolve_method_entry

    if methods is None:
        return list_methods()
    entries = methods.split(",") if isinstance(methods, str) else list(methods)
    names = [entry.strip() for entry in entries if entry.strip()]
    if not names:
        raise DemoError(f"--methods is empty; give e.g. --methods {','.join(list_methods()[:2])}")
    for name in names:
        resolve_method_entry(name)  # close-match error for a typo, the variants for a bad variant
    if len(set(names)) != len(names):
        raise DemoError(f"--methods lists a method twice: {','.join(names)}")
    return names


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


_STARTED = [time.perf_counter()]  # reset by run_demo; stage lines show time since the start


def _say(message: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    elapsed = time.perf_counter() - _STARTED[0]
    line = f"[bold cyan]distill[/] [{elapsed:6.1f} s] {escape(message)}"  # paths and names print as written
    Console(stderr=True, soft_wrap=True, emoji=False).print(line, highlight=False)


def _stage(name: str, done: bool) -> bool:
    """Announce a stage; returns whether it must run."""
    _say(f"{name}: {'done already, skipped' if done else 'running'}")
    return not done


# --- stages ------------------------------------------------------------------------------------
def _dataset(out: Path, data: RunDataConfig) -> tuple[Any, str, str | None]:
    from clipdistill.data.splits import SplitOptions, make_splits

    if data.path is None and (data.val_path or data.test_path):
        raise DemoError("--val-data/--test-data need --data (the train file) too")
    if data.path is None:
        from clipdistill.data.emoji import build_emoji_dataset

        _stage("data (builtin emoji)", (out / "data" / "dataset.json").is_file())
        dataset = build_emoji_dataset(out / "data", size=data.emoji_size)  # skips rendering when complete
        data_path, images_root = str(out / "data"), None
    else:
        _stage(f"data ({data.path})", True)
        dataset, data_path, record = make_splits(out / "data", data.path, data.images, SplitOptions.of(data))
        images_root = (
            None if record is not None or data.images is None else str(data.images)
        )  # the split file is absolute
    missing = {"train", "val", "test"} - set(dataset.split_counts())
    if missing:
        raise DemoError(f"{data_path}: a run needs train, val and test splits; missing {', '.join(sorted(missing))}")
    return dataset, data_path, images_root


def trains_teacher(spec: str) -> bool:
    """A ``lit:`` teacher is an architecture to train on the run's data first; any other spec is a
    trained model used as it is."""
    from clipdistill.models.spec import parse_spec

    return parse_spec(spec).schema == "lit"


def _teacher(out: Path, dataset: Any, config: RunConfig, rows: EncodingMemo) -> str:
    from clipdistill.models.lit import MODEL_FILE
    from clipdistill.train.lit import run_teacher_train_config, train_lit_teacher

    teacher = config.teacher
    if not trains_teacher(teacher.spec):
        _stage(f"teacher ({teacher.spec}, trained already)", True)
        return teacher.spec
    teacher_dir = out / "teacher"
    if _stage(
        f"teacher ({teacher.spec}, trained on the data)",
        (teacher_dir / MODEL_FILE).is_file() and (teacher_dir / "train_summary.json").is_file(),
    ):
        # decoded at the cache's size: its frozen rows serve the later stages (EncodingMemo)
        train_config = run_teacher_train_config(teacher, decode_size=config.cache.image_size)
        train_lit_teacher(dataset, teacher_dir, train_config, encoding_memo=rows)
    return f"run:{teacher_dir}"


def _fusion_plan(config: RunConfig, names: list[str]) -> str | None:
    """What the fusion teacher is: ``"train"`` (``auto`` with a LiT teacher and a method that reads
    one), a given spec, or None. A method that needs one and gets none is refused here, before any
    stage runs, with what to give."""
    from clipdistill.distill.methods import fusion_methods, get_method, resolve_method_entry

    readers = [name for name in names if resolve_method_entry(name)[0] in fusion_methods()]
    spec = config.fusion.spec
    if spec == "auto":
        plan = "train" if readers and trains_teacher(config.teacher.spec) else None
    elif spec == "none":
        plan = None
    else:
        from clipdistill.models.spec import parse_fusion_spec

        plan = str(parse_fusion_spec(spec))
    if plan is None:
        from clipdistill.distill.base import TEACHER_OF_NEED

        needing = [
            name
            for name in readers
            if any(TEACHER_OF_NEED[need] == "fusion" for need in get_method(resolve_method_entry(name)[0]).needs)
        ]
        if needing:
            why = "fusion is 'none'" if spec == "none" else "only a lit: teacher gets one trained (fusion 'auto')"
            raise DemoError(
                f"method(s) {', '.join(needing)} need a fusion teacher, and this run has none ({why}); "
                "give --fusion fusion:PATH (a `clipdistill teacher train-fusion` folder) or blip-itm:ID, "
                "or leave those methods out"
            )
    return plan


def _fusion(out: Path, dataset: Any, teacher_spec: str, config: RunConfig, rows: EncodingMemo) -> str:
    from clipdistill.train.fusion import FusionTrainConfig, train_fusion_teacher

    fusion_dir = out / "fusion"
    if _stage("fusion teacher", (fusion_dir / "train_summary.json").is_file()):
        fusion = config.fusion
        budget = {
            "epochs": fusion.epochs,
            "max_seconds": fusion.max_seconds,
            "k_augmentations": fusion.k_augmentations,
            "negatives": fusion.negatives,
        }
        train_config = FusionTrainConfig(
            image_size=config.cache.image_size,  # as the teacher and the cache decode (the EncodingMemo reuses rows)
            **{key: value for key, value in budget.items() if value is not None},
        )
        train_fusion_teacher(teacher_spec, dataset, fusion_dir, train_config, encoding_memo=rows)
    return f"fusion:{fusion_dir}"


def _cache(
    out: Path, dataset: Any, teacher_spec: str, fusion_spec: str | None, config: RunConfig, rows: EncodingMemo
) -> str:
    from clipdistill.distill.cache import build_cache

    _stage("teacher cache", (out / "cache" / "manifest.json").is_file())
    path = build_cache(  # reuses a finished cache built for exactly this request, else (re)builds
        teacher_spec,
        dataset,
        out / "cache",
        k_augmentations=config.augment.k,
        image_size=config.cache.image_size,
        seed=config.augment.seed,
        aug_scale=config.augment.scale,
        aug_max_shift=config.augment.max_shift,
        fusion=fusion_spec,
        device=config.device,
        allow_random_teacher=config.teacher.allow_random,
        encoding_memo=rows,
    )
    return str(path)


@dataclass(frozen=True)
class MethodRun:
    """One row of the run: a method entry resolved to its variant and arguments."""

    entry: str  # as the user wrote it: NAME or NAME:VARIANT
    method: str
    variant: str
    args: dict[str, Any]

    @property
    def folder(self) -> str:
        """``students/<folder>-s<seed>``: the method's name, plus the variant when it was named."""
        return self.entry.replace(":", "-")


def method_runs(config: RunConfig, names: list[str]) -> list[MethodRun]:
    """Each entry's variant (``default_variant`` for a plain name) and arguments: the variant's
    values with ``method_args[NAME]`` over them."""
    from clipdistill.distill.methods import resolve_method_entry

    runs = []
    for entry in names:
        method, variant, values = resolve_method_entry(entry, config.default_variant)
        runs.append(MethodRun(entry, method, variant, {**values, **config.method_args.get(method, {})}))
    unknown = set(config.method_args) - {run.method for run in runs}
    if unknown:
        raise DemoError(f"key 'method_args' names {', '.join(sorted(unknown))}, which this run does not train")
    return runs


def _student_config(
    out: Path,
    variant: StudentVariant,
    run: MethodRun,
    seed: int,
    config: RunConfig,
    data: str,
    images: str | None,
    teacher: dict[str, Any],
) -> Any:
    from clipdistill.config import TrainConfig, from_dict, to_dict
    from clipdistill.data.bad_samples import default_policy
    from clipdistill.distill.methods import get_method

    fusion = teacher.get("fusion") if "fusion" in get_method(run.method).teachers() else None
    return from_dict(
        TrainConfig,
        {
            "name": f"{run.folder}-s{seed}",
            "out_dir": str(out / variant.students_dir),
            "method": run.method,
            "method_args": dict(run.args),
            "seed": seed,
            "device": config.device,
            "keep_checkpoints": config.keep_checkpoints,
            "data": {
                "path": data,
                "images": images,
                "image_size": config.cache.image_size,
                "on_bad_sample": default_policy(),  # `clipdistill --on-bad-sample skip distill`
            },
            "student": to_dict(variant.config),
            "teacher": {
                "spec": teacher["spec"],
                "cache": teacher["cache"],
                "fusion": fusion,
                "allow_random": config.teacher.allow_random,
            },
            "augment": to_dict(config.augment),
            "optim": to_dict(config.optim),
        },
    )


def _train_student(config: Any, rows: EncodingMemo) -> dict[str, Any]:
    from clipdistill.train.trainer import train

    summary_path = config.run_dir / "summary.json"
    if not _stage(f"student {config.name}", summary_path.is_file()):
        return _read_json(summary_path)
    resume = "latest" if (config.run_dir / "checkpoints" / "latest.pt").is_file() else None
    return train(config, resume=resume, encoding_memo=rows)


def _test_metrics(
    spec: str, test: Any, pixels: Any, rows: EncodingMemo | None = None, *, ranks: bool = False
) -> dict[str, Any]:
    """Recall@K of ``spec`` on the test split (no efficiency figures); ``rows``: frozen towers'
    rows computed by earlier stages; ``ranks``: every query's rank too (the paired bootstrap)."""
    from clipdistill.eval.evaluate import evaluate_loaded
    from clipdistill.models.encoding_memo import attach_encoding_memo
    from clipdistill.models.teachers import load_model

    model = load_model(spec)
    if rows is not None:
        attach_encoding_memo(model, rows)
    return evaluate_loaded(model, test, pixels=pixels, efficiency=False, ranks=ranks)


def _evaluate(
    spec: str,
    test: Any,
    pixels: Any,
    path: Path,
    metrics: dict[str, Any] | None = None,
    same_network: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Test metrics + eager efficiency of ``spec``, memoised in ``path``.

    ``metrics``: its recall, computed already (the teacher's, by the evaluation stage through an
    encoding memo as its training's own test evaluation is, so the two agree).
    ``same_network``: an earlier result of the identical network (every demo student is one
    network: training-only modules are dropped), whose efficiency figures are reused instead of
    timed again. Eager latency takes 3 repeats: the report's speed-up comes from the ONNX Runtime
    stage (eval/demo_efficiency.py, 30 interleaved repeats) and eager figures are a cross-check."""
    from clipdistill.eval.efficiency import tower_efficiency
    from clipdistill.models.teachers import load_model

    if path.is_file():
        return _read_json(path)
    result = dict(metrics) if metrics is not None else _test_metrics(spec, test, pixels, ranks=True)
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


def _deploy(out: Path, spec: str, data: str, images: str | None, config: RunConfig) -> dict[str, Any]:
    from clipdistill.export.onnx import export_model, read_parity
    from clipdistill.serve.embed import embed_dataset
    from clipdistill.serve.index import build_index

    export_dir, emb_dir, index_dir = out / "export", out / "embeddings", out / "index"
    exported = export_dir / "export.json"
    if exported.is_file() and _read_json(exported).get("source", {}).get("spec") not in (None, spec):
        _say(f"export: {export_dir} holds another model; re-exporting {spec}")
        for stale in (export_dir / "export.json", emb_dir / "embeddings.json", index_dir / "manifest.json"):
            stale.unlink(missing_ok=True)
    if _stage(f"export {spec}", exported.is_file()):
        export_model(spec, export_dir, int8=config.export.int8, data=data, images=images, split="test")
    if _stage("embeddings (test split)", (emb_dir / "embeddings.json").is_file()):
        embed_dataset(export_dir, data, emb_dir, images=images, split="test")
    factory = config.index.factory
    if _stage(f"index ({factory})", (index_dir / "manifest.json").is_file()):
        build_index(emb_dir, index_dir, factory=factory)
    return {"spec": spec, "export": str(export_dir), "index": str(index_dir), "parity": read_parity(export_dir)}


# --- the job -----------------------------------------------------------------------------------
def run_demo(
    out: str | Path,
    *,
    data: str | Path | None = None,
    images: str | Path | None = None,
    preset: str | RunConfig = "quick",
    methods: str | None = None,
    seeds: int | None = None,
    splits: Any = None,
    students: str | None = None,
) -> dict[str, Any]:
    """``clipdistill demo``: :func:`run_distill` with a preset (a name or a :class:`RunConfig`,
    for tests and sweeps), the builtin emoji data unless ``data`` is given, and the demo's flags
    (``splits``: :class:`~clipdistill.data.splits.SplitOptions` for a ``data`` without splits;
    ``students``: a ladder, ``lite0@64,lite0@96``)."""
    from clipdistill.run_config import resolve_run_config

    values: dict[str, Any] = {"data": {}}
    if data is not None:
        values["data"] = {"path": str(data), "images": None if images is None else str(images)}
    if splits is not None:  # without data: _dataset refuses split files with no train file
        values["data"].update(
            val_path=None if splits.val_data is None else str(splits.val_data),
            test_path=None if splits.test_data is None else str(splits.test_data),
            split_seed=splits.seed,
            group_by=splits.group_by,
        )
    if methods is not None:
        values["methods"] = parse_methods(methods)
    if seeds is not None:
        values["seeds"] = seeds
    if students is not None:
        values["students"] = parse_students(students)
    if isinstance(preset, RunConfig):
        from clipdistill.config import deep_merge, from_dict

        config, name = from_dict(RunConfig, deep_merge(run_config_dict(preset), values)), "custom"
    else:
        config, name = resolve_run_config(preset=preset, values=values), preset
    return run_distill(config, out, preset=name)


def run_distill(config: RunConfig, out: str | Path, *, preset: str = "custom") -> dict[str, Any]:
    """Run every stage of ``config`` (skipping finished ones) into ``out`` and write the report;
    returns ``report.json``. The resolved config is written first to ``OUT/config.yaml``, which
    reproduces the run (``clipdistill distill --config OUT/config.yaml --out NEW``)."""
    from dataclasses import replace

    from clipdistill.data.images import load_image_tensor
    from clipdistill.eval.frontier import frontier_points, teacher_smaller_inputs
    from clipdistill.memory import StagePeaks
    from clipdistill.models.encoding_memo import EncodingMemo
    from clipdistill.report import markdown, write_plots

    names = parse_methods(config.methods)
    config = replace(config, methods=names)  # the list it trains, written out: a new method later changes nothing
    runs_of = method_runs(config, names)
    variants = student_variants(config.student, config.students)
    fusion_plan = _fusion_plan(config, names)
    _check_teacher(config)
    started = _STARTED[0] = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_config(out, config)

    peaks = StagePeaks()  # report.json's "memory": each stage's peak resident memory
    with peaks.stage("data"):
        dataset, data_path, images_root = _dataset(out, config.data)
    image_size = config.cache.image_size
    # The teacher, fusion and cache stages encode the same captions and images with the same
    # frozen towers: one memo carries the rows from each to the next, and is dropped after them.
    teacher_rows = EncodingMemo()
    with peaks.stage("teacher"):
        teacher_spec = _teacher(out, dataset, config, teacher_rows)
    fusion_spec: str | None = fusion_plan
    if fusion_plan == "train":
        with peaks.stage("fusion"):
            fusion_spec = _fusion(out, dataset, teacher_spec, config, teacher_rows)
    with peaks.stage("cache"):
        cache = _cache(out, dataset, teacher_spec, fusion_spec, config, teacher_rows)
    # Dropped before evaluation: it reads only the test images, whose rows are cheaper to compute
    # again than the train split's rows are to keep (1.5 GB on the emoji set at 224 px).
    teacher_rows.clear()
    test = dataset.split("test")
    with peaks.stage("evaluation"):
        pixels = load_image_tensor(test.image_paths(), image_size)
        teacher_path = out / "teacher" / "test_metrics.json"
        teacher_path.parent.mkdir(parents=True, exist_ok=True)
        # A fresh memo: the same memoised path (ONNX Runtime frozen stages) as the teacher's own test
        # evaluation after training, so the report gives the recall its training reported.
        fresh = EncodingMemo()
        teacher_metrics = None if teacher_path.is_file() else _test_metrics(teacher_spec, test, pixels, fresh)
        fresh.clear()
        teacher_result = _evaluate(teacher_spec, test, pixels, teacher_path, metrics=teacher_metrics)
        smaller_inputs = teacher_smaller_inputs(
            teacher_spec, test, pixels, config.eval.teacher_image_sizes, teacher_path.parent, say=_say
        )
    teacher = {"spec": teacher_spec, "cache": cache, "fusion": fusion_spec}

    # Every student starts from the same frozen trunk stages and the fusion methods score the
    # same batches: their exact rows and grids are shared through one memo.
    student_rows = EncodingMemo()
    runs = []
    for variant in variants:
        for run in runs_of:
            for seed in range(config.seeds):
                train_config = _student_config(out, variant, run, seed, config, data_path, images_root, teacher)
                with peaks.stage("students"):
                    runs.append((variant, run, train_config, _train_student(train_config, student_rows)))
        student_rows.clear()  # another variant's network or input size gives other rows

    _say("evaluating the students on the test split")
    students: list[dict[str, Any]] = []
    test_ranks: list[dict[str, Any] | None] = []
    first_student: dict[str | None, dict[str, Any]] = {}  # per variant: one network, timed once
    for variant, run, train_config, summary in runs:
        path = train_config.run_dir / "test_metrics.json"
        with peaks.stage("evaluation"):
            result = _evaluate(summary["model"], test, pixels, path, same_network=first_student.get(variant.label))
        first_student.setdefault(variant.label, result)
        test_ranks.append(result.get("ranks"))
        students.append(
            {
                "method": run.entry,
                **variant.report_fields(),  # with a ladder: its label, as the report and the frontier group
                "variant": run.variant,
                "method_args": dict(train_config.method_args),
                "seed": train_config.seed,
                "spec": summary["model"],
                "run_dir": str(train_config.run_dir),
                **_entry(result),
                "train_seconds": summary["train_seconds"],
                "val_rsum": summary["val"]["rsum"],
                "terms": summary.get("terms", {}),  # each loss term's gradient against the task term's
            }
        )
    add_vs_scratch(students, test_ranks)

    teacher_summary = out / "teacher" / "train_summary.json"
    report: dict[str, Any] = {
        "dataset": dataset.name,
        "split": "test",
        "n_images": len(test),
        "n_texts": test.n_texts(),
        "preset": preset,
        "budget": {
            "student": student_name(config.student),
            "epochs": config.optim.epochs,
            "batch_size": config.optim.batch_size,
            "lr": config.optim.lr,
            "k_augmentations": config.augment.k,
            "image_size": image_size,
            "student_image_size": config.student.image_size,
            "image_init": config.student.image_init,
            "text_init": config.student.text_init,
            "teacher_model": config.teacher.spec,
            "seeds": config.seeds,
            **ladder_budget(variants),
        },
        "teacher": {
            "spec": teacher_spec,
            **_entry(teacher_result),
            "train_seconds": _read_json(teacher_summary)["train_seconds"]
            if trains_teacher(config.teacher.spec)
            else None,
            "smaller_inputs": smaller_inputs,  # the teacher read at smaller inputs, not retrained
        },
        "fusion_teacher": _fusion_entry(out, fusion_spec, trained=fusion_plan == "train"),
        "students": students,
        "summary": method_summary(students),
    }
    from clipdistill.eval.demo_efficiency import add_onnx_efficiency  # OUT/efficiency.json, memoised

    with peaks.stage("efficiency"):
        add_onnx_efficiency(  # onnx_ms etc. under teacher + students
            out, report, repeats=config.eval.onnx_repeats, threads=config.eval.onnx_threads, stage=_stage, say=_say
        )
    report["frontier"] = frontier_points(report)  # what each point costs and keeps; what beats a student
    best = best_student(students)
    report["best_student"] = shipped(best)
    with peaks.stage("deploy"):
        report["deploy"] = _deploy(out, best["spec"], data_path, images_root, config)
    if config.data.path is not None and (out / "data" / "splits.json").is_file() and data_path == str(out / "data"):
        report["splits"] = _read_json(out / "data" / "splits.json")  # how train/val/test were made
    if dataset.skipped is not None and dataset.skipped.samples:
        report["bad_samples"] = dataset.skipped.summary()
    report["config"] = run_config_dict(config)
    _say("writing report.md and plots")
    with peaks.stage("report"):  # the example figure runs every model it shows: measured too
        write_plots(out, report, dataset)
    report["memory"] = peaks.report()
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    report["machine"] = _machine()
    report["finished_utc"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", markdown(report))
    _say("done")
    return report


def _write_config(out: Path, config: RunConfig) -> None:
    """``OUT/config.yaml``; a rerun into the same folder with another config says which keys
    changed (finished stages are still skipped by their outputs, as for any rerun)."""
    import yaml

    path = out / "config.yaml"
    if path.is_file():
        old = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        changed = differing_keys(old, run_config_dict(config))
        if changed:
            _say(f"{path} held another config (changed: {', '.join(changed)}); finished stages are kept")
    atomic_write_text(path, run_config_yaml(config))


def _check_teacher(config: RunConfig) -> None:
    """A given teacher without pretrained weights (``openclip:NAME`` with no ``@TAG``) is refused
    before any stage, unless the config says ``teacher.allow_random``; read from the spec alone."""
    from clipdistill.models.teachers import check_teacher_weights

    if not trains_teacher(config.teacher.spec):
        check_teacher_weights(config.teacher.spec, allow_random=config.teacher.allow_random)


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


def _fusion_entry(out: Path, fusion_spec: str | None, *, trained: bool) -> dict[str, Any] | None:
    """What the fusion teacher adds: its val- and test-split re-ranking of the dual teacher's
    top-k, each with its R@1 gain's 95% interval (for a fusion teacher the run trained; a given
    one is named only)."""
    if fusion_spec is None:
        return None
    if not trained:
        return {"spec": fusion_spec}
    summary = _read_json(out / "fusion" / "train_summary.json")
    from clipdistill.eval.efficiency import count_parameters
    from clipdistill.models.fusion import load_fusion_encoder

    encoder = load_fusion_encoder(out / "fusion", with_dual=False)
    return {
        "spec": fusion_spec,
        "params": count_parameters(encoder),
        "rerank_val": summary.get("val"),
        "rerank_test": summary.get("test"),
        "train_seconds": summary.get("train_seconds"),
    }
