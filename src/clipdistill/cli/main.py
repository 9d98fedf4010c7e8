"""``clipdistill`` command line: one typer app, one sub-command per pipeline stage.

Commands only parse flags, build typed configs and call library functions; no library code
takes an ``args`` namespace. Known user errors (bad data, bad spec, missing packages) print
one clear line and exit with status 2 instead of a traceback (``cli/common.py``, which the
command modules share; they never import this module back).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from clipdistill.cli.cache_cmd import cache_app
from clipdistill.cli.common import (
    DataOpt,
    GroupByOpt,
    ImagesOpt,
    SplitSeedOpt,
    TestDataOpt,
    ValDataOpt,
    console,
    print_metrics,
    reports_user_errors,
    split_options,
)
from clipdistill.cli.deploy_cmd import embed_command, export_command, index_command, search_command
from clipdistill.cli.distill_cmd import demo_command, distill_command
from clipdistill.cli.fusion_cmd import train_fusion_command
from clipdistill.cli.serve_cmd import serve_command
from clipdistill.cli.train_cmd import train_command
from clipdistill.cli.wds_cmd import to_wds_command
from clipdistill.model_configs import preset_names

app = typer.Typer(
    name="clipdistill",
    help="Distil a large image-text model into a small dual-encoder student, evaluate it and serve it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Build and convert datasets.", no_args_is_help=True)
teacher_app = typer.Typer(help="Train the offline teacher.", no_args_is_help=True)
student_app = typer.Typer(help="Create student models from presets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(teacher_app, name="teacher")
app.add_typer(student_app, name="student")


@app.callback()
def _global_options(
    on_bad_sample: Annotated[
        str,
        typer.Option(
            "--on-bad-sample",
            help="What a bad image, caption or row does in any command that reads a dataset: 'error' stops "
            "naming file, place and reason; 'skip' drops it and reports counts and the first offenders.",
        ),
    ] = "error",
) -> None:
    """Distil a large image-text model into a small dual-encoder student, evaluate it and serve it."""
    from clipdistill.data.bad_samples import POLICIES, set_default_policy

    if on_bad_sample not in POLICIES:
        raise typer.BadParameter(f"{on_bad_sample!r}; valid: {', '.join(POLICIES)}", param_hint="--on-bad-sample")
    set_default_policy(on_bad_sample)


@data_app.command("build")
@reports_user_errors
def data_build(
    name: Annotated[str, typer.Argument(help="Builtin dataset to build: 'emoji'.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (dataset.json + images/).")],
    size: Annotated[int, typer.Option("--size", min=16, max=512, help="Image side in pixels.")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the concept split and captions.")] = 0,
) -> None:
    """Build a builtin dataset (Karpathy JSON + PNGs)."""
    from clipdistill.data.dataset import DatasetError

    if name != "emoji":
        raise DatasetError(f"unknown builtin dataset {name!r}; available: emoji")
    from clipdistill.data.emoji import build_emoji_dataset

    dataset = build_emoji_dataset(out, size=size, seed=seed)
    counts = dataset.split_counts()
    console.print(f"emoji dataset: {len(dataset)} images, {dataset.n_texts()} captions, splits {counts} -> {out}")


@teacher_app.command("train")
@reports_user_errors
def teacher_train(
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", help="Run folder for the teacher.")] = Path("runs/teacher"),
    images: ImagesOpt = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model", help="Architecture to train: lit:WEIGHTS or lit:WEIGHTS@SIZE, e.g. lit:efficientnet-lite2@260."
        ),
    ] = None,
    image_model: Annotated[
        str | None, typer.Option("--image-model", help="timm name of an image tower trained from scratch.")
    ] = None,
    frozen_stages: Annotated[
        int | None, typer.Option("--frozen-stages", min=0, help="Leading trunk stages kept frozen (with --model).")
    ] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1)] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=2)] = None,
    lr: Annotated[float | None, typer.Option("--lr")] = None,
    image_size: Annotated[int | None, typer.Option("--image-size", min=16)] = None,
    text_proj: Annotated[
        str | None, typer.Option("--text-proj", help="none (keep the text tower's space) | linear")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    max_seconds: Annotated[
        float | None, typer.Option("--max-seconds", help="Stop after the epoch that passes this.")
    ] = None,
) -> None:
    """Train the LiT teacher: an image tower against a frozen text tower (MiniLM-L6 or mpnet-base).

    By default the ImageNet EfficientNet-Lite0 trunk (``lit:efficientnet-lite0``, 224 px, stages
    0-4 frozen; ``train.lit.pretrained_teacher_config``); ``--image-model`` trains a timm trunk
    from scratch instead (``TeacherTrainConfig``'s budget). Options left out keep those
    defaults (chosen on the emoji set: docs/results.md, "Teacher"), so the CLI and the library
    never disagree.
    """
    from dataclasses import replace

    from clipdistill.data.loading import load_dataset
    from clipdistill.models.lit import LiTConfig
    from clipdistill.train.lit import (
        DEFAULT_TEACHER_SPEC,
        TeacherTrainConfig,
        pretrained_teacher_config,
        train_lit_teacher,
    )

    def given(**values: Any) -> dict[str, Any]:
        return {key: value for key, value in values.items() if value is not None}

    if model is not None and image_model is not None:
        raise typer.BadParameter("give --model (a pretrained trunk) or --image-model (from scratch), not both")
    dataset = load_dataset(data, images)
    if image_model is not None:  # a scratch trunk: TeacherTrainConfig's scratch budget
        defaults = replace(TeacherTrainConfig(), model=LiTConfig(image_model=image_model))
    else:
        defaults = pretrained_teacher_config(model or DEFAULT_TEACHER_SPEC)
    model_config = replace(
        defaults.model, **given(image_size=image_size, text_proj=text_proj, frozen_stages=frozen_stages)
    )
    config = replace(
        defaults,
        model=model_config,
        **given(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, max_seconds=max_seconds),
    )
    summary = train_lit_teacher(dataset, out, config)
    console.print(f"teacher saved to {out} (best epoch {summary['best_epoch']}, {summary['train_seconds']} s)")
    print_metrics("teacher, val split", summary["val"])
    if "test" in summary:
        print_metrics("teacher, test split", summary["test"])


@student_app.command("create")
@reports_user_errors
def student_create(
    out: Annotated[Path, typer.Option("--out", help="Output open_clip folder.")],
    preset: Annotated[
        str,
        typer.Option(
            "--preset",
            help=f"{' | '.join(preset_names())}, or the path of an open_clip model-config JSON file.",
        ),
    ] = "tiny",
    image_size: Annotated[int | None, typer.Option("--image-size")] = None,
) -> None:
    """Write a randomly initialised student as an open_clip folder (presets: clipdistill/model_configs/)."""
    from clipdistill.models.students import build_student, save_student, student_config

    student = build_student(student_config(preset, image_size=image_size))
    save_student(student, out)
    params = sum(p.numel() for p in student.parameters())
    console.print(f"student {preset!r} ({params / 1e6:.2f}M params) -> {out}  (load: local-dir:{out})")


@app.command("eval")
@reports_user_errors
def eval_command(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="Model spec (run:runs/teacher, local-dir:PATH, ...) or an ONNX export folder written by "
            "`clipdistill export` (PATH holding export.json, or onnx:PATH).",
        ),
    ],
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", help="metrics.json to write.")],
    images: ImagesOpt = None,
    split: Annotated[str, typer.Option("--split")] = "test",
    val_data: ValDataOpt = None,
    test_data: TestDataOpt = None,
    split_seed: SplitSeedOpt = 0,
    group_by: GroupByOpt = None,
    device: Annotated[str, typer.Option("--device", help="cpu | cuda | cuda:N (an ONNX export runs on cpu)")] = "cpu",
    precision: Annotated[
        str, typer.Option("--precision", help="Graphs of an ONNX export: fp32 | int8 (export --int8 writes both).")
    ] = "fp32",
    efficiency: Annotated[
        bool, typer.Option("--efficiency/--no-efficiency", help="Also measure params, FLOPs, latency, memory.")
    ] = True,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars on stderr.")] = True,
) -> None:
    """Recall@K both directions (+ params, FLOPs, latency) of a model or an ONNX export on a
    dataset split; a split the data lacks is carved from train (--split-seed, --group-by)."""
    from clipdistill.eval.evaluate import efficiency_summary, evaluate_model
    from clipdistill.io import atomic_write_json

    result = evaluate_model(
        model,
        data,
        split=split,
        images=images,
        device=device,
        efficiency=efficiency,
        splits=split_options(val_data, test_data, split_seed, group_by),
        precision=precision,
        progress=progress,
    )
    atomic_write_json(out, result)
    metric_keys = [k for k in result if "_R@" in k or k == "rsum"]
    backend = f"onnx {result['precision']}" if result["backend"] == "onnx" else "torch"
    print_metrics(
        f"{model} ({backend}) on {result['dataset']}:{split} ({result['n_images']} images, "
        f"{result['n_texts']} captions)",
        {k: result[k] for k in metric_keys},
    )
    cost = efficiency_summary(result)
    if cost:
        timer = "ONNX Runtime" if result["backend"] == "onnx" else "eager torch"
        print_metrics(f"cost per item (latency: {timer}, ms per image / caption)", cost, fmt=".3g")
    console.print(f"wrote {out}", highlight=False)


def _register_commands() -> None:
    """Commands that live in their own modules (kept small: one job each)."""
    app.command("distill")(reports_user_errors(distill_command))
    app.command("demo")(reports_user_errors(demo_command))
    app.command("train")(reports_user_errors(train_command))
    data_app.command("to-wds")(reports_user_errors(to_wds_command))
    teacher_app.command("train-fusion")(reports_user_errors(train_fusion_command))
    app.add_typer(cache_app, name="cache")
    app.command("export")(export_command)
    app.command("embed")(embed_command)
    app.command("index")(index_command)
    app.command("search")(search_command)
    app.command("serve")(serve_command)


_register_commands()


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="clipdistill")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
