"""``clipdistill train CONFIG... [--set key=value] [--resume latest]``.

The same function backs ``python -m clipdistill.train`` so ``torchrun`` can launch it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer


def train_command(
    configs: Annotated[list[Path], typer.Argument(help="YAML config file(s), deep-merged in order.")],
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a key, e.g. --set optim.lr=1e-3 (repeatable).")
    ] = None,
    resume: Annotated[
        str | None, typer.Option("--resume", help="'latest' (this run's last checkpoint) or a checkpoint path.")
    ] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Train a student with the configured distillation method."""
    from clipdistill.cli.main import console, print_metrics
    from clipdistill.config import load_config
    from clipdistill.train.trainer import train

    config = load_config(configs, overrides or [])
    summary = train(config, resume=resume, progress=progress)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return
    console.print(
        f"{config.method}: best epoch {summary['best_epoch']}, {summary['train_seconds']} s of training; "
        f"student saved as {summary['model']}"
    )
    print_metrics(f"{config.name} ({config.method}), val split", summary["val"])
