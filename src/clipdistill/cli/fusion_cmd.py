"""``clipdistill teacher train-fusion``: train the single-stream fusion teacher over a dual teacher.

Kept out of ``cli/main.py`` so the fusion stage owns its flags; ``main`` registers it under the
``teacher`` group (with the shared user-error handling, which covers ``FusionError``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from clipdistill.cli.common import console, print_metrics


def train_fusion_command(
    teacher: Annotated[str, typer.Option("--teacher", help="The dual teacher, e.g. run:runs/teacher.")],
    data: Annotated[Path, typer.Option("--data", help="Dataset: folder with dataset.json, Karpathy JSON, CSV/TSV.")],
    out: Annotated[Path, typer.Option("--out", help="Folder of the fusion teacher (load it as fusion:OUT).")] = Path(
        "runs/fusion"
    ),
    images: Annotated[
        Path | None, typer.Option("--images", help="Image root for a Karpathy JSON or CSV (default: its folder).")
    ] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1)] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=2)] = None,
    lr: Annotated[float | None, typer.Option("--lr")] = None,
    width: Annotated[int | None, typer.Option("--width", min=1, help="Width of the cross-attention head.")] = None,
    negatives: Annotated[
        int | None, typer.Option("--negatives", min=1, help="Hard negatives per positive and direction.")
    ] = None,
    mine_top: Annotated[
        int | None, typer.Option("--mine-top", min=1, help="Negatives are drawn from each query's dual top-N.")
    ] = None,
    k_aug: Annotated[int | None, typer.Option("--k-aug", min=1, help="Replayed augmentations per image.")] = None,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    max_seconds: Annotated[
        float | None,
        typer.Option("--max-seconds", help="Wall-clock budget (s), encoding included; stops at the first step past it"),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="cpu | cuda | cuda:N")] = "cpu",
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    allow_random_teacher: Annotated[
        bool,
        typer.Option(
            "--allow-random-teacher",
            help="Accept a dual teacher without trained weights (openclip:NAME with no @TAG, lit:...): for tests only.",
        ),
    ] = False,
) -> None:
    """Train a fusion teacher (cross-attention over the dual teacher's tokens, ITM on mined hard negatives).

    Options left out keep the defaults of ``FusionTrainConfig``. Prints the re-ranking result:
    text→image recall of the dual teacher and of its top-16 re-ranked by the fusion teacher.
    """
    from dataclasses import replace

    from clipdistill.data.loading import load_dataset
    from clipdistill.models.teachers import check_teacher_weights
    from clipdistill.train.fusion import FusionTrainConfig, train_fusion_teacher

    check_teacher_weights(teacher, allow_random=allow_random_teacher)  # a typo or random weights fail before the data

    def given(**values: Any) -> dict[str, Any]:
        return {key: value for key, value in values.items() if value is not None}

    config = replace(
        FusionTrainConfig(),
        **given(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            width=width,
            negatives=negatives,
            mine_top=mine_top,
            k_augmentations=k_aug,
            seed=seed,
            max_seconds=max_seconds,
        ),
    )
    dataset = load_dataset(data, images)
    summary = train_fusion_teacher(
        teacher, dataset, out, config, device=device, progress=progress, allow_random_teacher=allow_random_teacher
    )
    console.print(
        f"fusion teacher saved as fusion:{out} (best epoch {summary['best_epoch']}, {summary['train_seconds']} s)",
        highlight=False,
        markup=False,
    )
    for split in ("val", "test"):
        if split in summary:
            result = summary[split]
            print_metrics(f"{split}: dual teacher, text->image", result["dual"])
            print_metrics(f"{split}: dual top-{result['k']} re-ranked by the fusion teacher", result["reranked"])
            low, high = result["gain_R@1_ci95"]
            console.print(
                f"{split}: R@1 gain {result['gain_R@1']:+.1f} (95% interval over the caption queries "
                f"{low:+.1f} to {high:+.1f})",
                highlight=False,
                markup=False,
            )
