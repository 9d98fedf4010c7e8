"""``clipdistill train CONFIG... [--set key=value] [--resume latest]``.

The same function backs ``python -m clipdistill.train`` so ``torchrun`` can launch it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from clipdistill.cli.common import (
    GroupByOpt,
    TestDataOpt,
    ValDataOpt,
    console,
    exit_stopped,
    print_metrics,
)


def train_command(
    configs: Annotated[list[Path], typer.Argument(help="YAML config file(s), deep-merged in order.")],
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a key, e.g. --set optim.lr=1e-3 (repeatable).")
    ] = None,
    resume: Annotated[
        str | None, typer.Option("--resume", help="'latest' (this run's last checkpoint) or a checkpoint path.")
    ] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    on_bad_sample: Annotated[
        str | None,
        typer.Option("--on-bad-sample", help="error | skip (sets key data.on_bad_sample; default: the config's)."),
    ] = None,
    val_data: ValDataOpt = None,
    test_data: TestDataOpt = None,
    split_seed: Annotated[
        int | None, typer.Option("--split-seed", help="Seed of the splits carved from train (key data.split_seed).")
    ] = None,
    group_by: GroupByOpt = None,
) -> None:
    """Train a student with the configured distillation method.

    Data without train/val splits (an open_clip CSV) gets them carved as `distill` and `eval`
    carve them (--val-data/--test-data give a split whole; --split-seed, --group-by)."""
    from clipdistill.config import load_config
    from clipdistill.data.bad_samples import default_policy
    from clipdistill.train.trainer import train

    policy = on_bad_sample or (default_policy() if default_policy() != "error" else None)
    policy_override = [f"data.on_bad_sample={policy}"] if policy else []
    split_flags = {"val_path": val_data, "test_path": test_data, "split_seed": split_seed, "group_by": group_by}
    split_overrides = [f"data.{key}={value}" for key, value in split_flags.items() if value is not None]
    config = load_config(configs, (overrides or []) + policy_override + split_overrides)  # flags win over --set
    from clipdistill.train.state import TrainingStopped

    try:
        summary = train(config, resume=resume, progress=progress)
    except TrainingStopped as stopped:
        exit_stopped(stopped, str(stopped))
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return
    console.print(
        f"{config.method}: best epoch {summary['best_epoch']}, {summary['train_seconds']} s of training; "
        f"student saved as {summary['model']}"
    )
    print_metrics(f"{config.name} ({config.method}), val split", summary["val"])
    if "bad_samples" in summary:
        bad = summary["bad_samples"]
        console.print(
            f"skipped {bad['skipped_images']} image(s), {bad['skipped_captions']} caption(s) as bad; "
            f"all listed in {config.run_dir / 'bad_samples.json'}",
            highlight=False,
        )
