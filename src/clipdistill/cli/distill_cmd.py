"""``clipdistill distill`` (the main job: any teacher, any data) and ``clipdistill demo`` (the same
job with the builtin emoji data and a named preset).

Both resolve one :class:`~clipdistill.run_config.RunConfig` (preset, ``--config`` files, flags,
``--set``), write it to ``OUT/config.yaml`` and run every stage (``demo.run_distill``); they end
with the results table and the ``serve`` and ``search`` commands of what they built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from clipdistill.cli.common import (
    GroupByOpt,
    ImagesOpt,
    SplitSeedOpt,
    TestDataOpt,
    ValDataOpt,
    console,
    exit_stopped,
)
from clipdistill.run_config import preset_names

_PRESETS = " | ".join(preset_names())  # the YAML files shipped in clipdistill/presets/

OutOpt = Annotated[Path, typer.Option("--out", help="Run folder: every stage's output, config.yaml, report.")]
MethodsOpt = Annotated[
    str | None,
    typer.Option(
        "--methods",
        help="Comma-separated NAME or NAME:VARIANT (e.g. clip,conaclip,dcd:tuned); default: every method.",
    ),
]
SeedsOpt = Annotated[int | None, typer.Option("--seeds", min=1, help="Seeds per method (default: the preset's).")]
StudentsOpt = Annotated[
    str | None,
    typer.Option(
        "--students",
        help="A ladder of students, comma-separated PRESET[@SIZE] or open_clip model-config JSON files "
        "(e.g. lite0@64,lite0@96,lite0@128): every method and seed trains on each, into students/<label>/.",
    ),
]


def _student_values(student: str) -> dict[str, Any]:
    """``--student``: a preset name, an open_clip model-config JSON file, or a checkpoint spec to
    start from; it replaces the preset's whole student section."""
    if ":" in student:
        from clipdistill.models.spec import parse_spec

        parse_spec(student)  # a typo in the schema fails here, naming the valid ones
        return {"init": student}
    if student.endswith(".json"):
        if not Path(student).is_file():
            raise FileNotFoundError(f"--student {student}: no such open_clip model-config file")
        return {"model_config": student}
    return {"preset": student}


def _flag_values(**flags: Any) -> dict[str, Any]:
    """The flags given, as a nested mapping over the run config's keys (flags left out: absent)."""
    values: dict[str, Any] = {}

    def put(dotted: str, value: Any) -> None:
        if value is None:
            return
        *parents, last = dotted.split(".")
        node = values
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = str(value) if isinstance(value, Path) else value

    for dotted, value in flags.items():
        put(dotted.replace("__", "."), value)
    return values


def _run(config: Any, out: Path, preset: str) -> None:
    from clipdistill.demo import run_distill
    from clipdistill.train.state import TrainingStopped

    try:
        report = run_distill(config, out, preset=preset)
    except TrainingStopped as stopped:  # SIGTERM/Ctrl-C during a student: its checkpoint is saved
        exit_stopped(stopped, f"stopped: {stopped}; rerun the same command to continue")
    print_run_summary(report, out)


def distill_command(
    out: OutOpt = Path("runs/distill"),
    teacher: Annotated[
        str | None,
        typer.Option(
            "--teacher",
            help="Teacher spec: openclip:NAME@TAG, local-dir:PATH, hf-hub:ORG/REPO, hf:ID, run:PATH; "
            "lit:TRUNK or lit:TRUNK@SIZE trains that LiT teacher on the data first (default: lit:efficientnet-lite0).",
        ),
    ] = None,
    fusion: Annotated[
        str | None,
        typer.Option(
            "--fusion",
            help="Fusion teacher for mcad/dcd: fusion:PATH, blip-itm:ID, none, or auto (trained on a lit: teacher).",
        ),
    ] = None,
    student: Annotated[
        str | None,
        typer.Option(
            "--student",
            help="A student preset (see `clipdistill student create --help`), an open_clip model-config JSON "
            "file, or a checkpoint spec to start from (local-dir:PATH, hf-hub:..., openclip:NAME@TAG).",
        ),
    ] = None,
    students: StudentsOpt = None,
    methods: MethodsOpt = None,
    seeds: SeedsOpt = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data", help="Dataset: Karpathy JSON, open_clip CSV/TSV, image+txt folder, shards (default: emoji)."
        ),
    ] = None,
    images: ImagesOpt = None,
    val_data: ValDataOpt = None,
    test_data: TestDataOpt = None,
    split_seed: Annotated[
        int | None, typer.Option("--split-seed", help="Seed of the splits carved from train (default 0).")
    ] = None,
    group_by: GroupByOpt = None,
    preset: Annotated[
        str, typer.Option("--preset", help=f"The run preset the config starts from ({_PRESETS}).")
    ] = "quick",
    config: Annotated[
        list[Path] | None, typer.Option("--config", help="A run config YAML (e.g. an earlier OUT/config.yaml).")
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a run-config key, e.g. --set optim.epochs=4 (repeatable)."),
    ] = None,
    allow_random_teacher: Annotated[
        bool,
        typer.Option("--allow-random-teacher", help="Accept a teacher without pretrained weights (tests only)."),
    ] = False,
    print_config: Annotated[
        bool, typer.Option("--print-config", help="Print the resolved run config as YAML and exit.")
    ] = False,
) -> None:
    """The main job: your teacher and your data -> a small student, evaluated, exported, indexed.

    Stages: data (splits carved when missing) -> teacher (a lit: one trained first) -> fusion
    teacher -> teacher cache -> one student per method and seed (on each --students variant) ->
    test evaluation + ONNX timing -> export + index of the best student (by val) -> report.
    Finished stages are skipped, so a rerun resumes. The resolved config is written to
    OUT/config.yaml; `--config OUT/config.yaml` reruns it.
    """
    from clipdistill.run_config import resolve_run_config, run_config_yaml
    from clipdistill.student_ladder import parse_students

    values = _flag_values(
        students=None if students is None else parse_students(students),
        teacher__spec=teacher,
        teacher__allow_random=True if allow_random_teacher else None,
        fusion__spec=fusion,
        seeds=seeds,
        methods=methods,
        data__path=data,
        data__images=images,
        data__val_path=val_data,
        data__test_path=test_data,
        data__split_seed=split_seed,
        data__group_by=group_by,
    )
    replaced = ()
    if student is not None:  # a student given on the command line replaces the preset's whole student
        values["student"], replaced = _student_values(student), ("student",)
    resolved = resolve_run_config(
        preset=preset, configs=list(config or []), values=values, overrides=overrides, replace=replaced
    )
    if print_config:
        typer.echo(run_config_yaml(resolved), nl=False)
        return
    _run(resolved, out, preset)


def demo_command(
    out: OutOpt = Path("runs/demo"),
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Dataset (Karpathy, CSV/TSV, folder, shards; default: builtin emoji)."),
    ] = None,
    images: ImagesOpt = None,
    val_data: ValDataOpt = None,
    test_data: TestDataOpt = None,
    split_seed: SplitSeedOpt = 0,
    group_by: GroupByOpt = None,
    preset: Annotated[str, typer.Option("--preset", help=_PRESETS)] = "quick",
    methods: MethodsOpt = None,
    seeds: SeedsOpt = None,
    students: StudentsOpt = None,
) -> None:
    """The main job with the builtin emoji data and the offline LiT teacher: `distill` with a
    preset's defaults. Finished stages are skipped, so a rerun resumes where a run stopped."""
    from clipdistill.cli.common import split_options
    from clipdistill.demo import run_demo
    from clipdistill.train.state import TrainingStopped

    splits = split_options(val_data, test_data, split_seed, group_by)
    try:
        report = run_demo(
            out, data=data, images=images, preset=preset, methods=methods, seeds=seeds, splits=splits, students=students
        )
    except TrainingStopped as stopped:  # SIGTERM/Ctrl-C during a student: its checkpoint is saved
        exit_stopped(stopped, f"demo stopped: {stopped}; rerun the same demo command to continue")
    print_run_summary(report, out)


def print_run_summary(report: dict[str, Any], out: Path) -> None:
    """The terminal's last word: the table and the commands that use the result."""
    from rich.markup import escape
    from rich.table import Table

    from clipdistill.report import latency_source, method_rows, pair_ms
    from clipdistill.run_summary import row_label

    source, _ = latency_source(report)  # report.md's latency: ONNX Runtime, or eager torch for an older run
    latency = "ms b1 (ONNX)" if source == "onnx" else "latency ms (eager torch)"
    table = Table(title=f"{report['dataset']} test split ({report['n_images']} images, {report['n_texts']} captions)")
    for column in ("model", "t2i R@1", "t2i R@10", "i2t R@1", "i2t R@10", "rsum", latency, "params M"):
        table.add_column(column, justify="right")

    def add(label: str, entry: dict[str, Any], rsum: str) -> None:
        m = entry["metrics"]
        table.add_row(
            escape(label),  # "clip [lite0@64]" is a name, not markup
            *(f"{m[k]:.1f}" for k in ("t2i_R@1", "t2i_R@10", "i2t_R@1", "i2t_R@10")),
            rsum,
            f"{pair_ms(entry, source):.2f}",
            f"{entry['params']['total'] / 1e6:.2f}",
        )

    add("teacher", report["teacher"], f"{report['teacher']['metrics']['rsum']:.1f}")
    for row in method_rows(report):  # the report.md rows: means over seeds, shared latency
        spread = f" ± {row['rsum_std']:.1f}" if row["n_seeds"] > 1 else ""
        add(row_label(row), row, f"{row['metrics']['rsum']:.1f}{spread}")
    Console(emoji=False).print(table)
    best, deploy = report["best_student"], report["deploy"]
    shipped = f"best student: {row_label(best)} (seed {best['seed']}, by {best['selected_by']})"
    console.print(shipped, highlight=False, markup=False)  # "clip [lite0@64]" is a name, not markup
    console.print(f"report: {out / 'report.md'}   config: {out / 'config.yaml'}", highlight=False)
    console.print(f"serve it:  clipdistill serve {deploy['index']}", highlight=False, markup=False)
    query = "a red heart" if report["dataset"] == "emoji" else "YOUR QUERY"
    console.print(f'search it: clipdistill search {deploy["index"]} "{query}" -k 5', highlight=False, markup=False)
