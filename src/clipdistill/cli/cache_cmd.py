"""``clipdistill cache``: build a teacher cache and show what an existing one was built for.

Kept out of ``cli/main.py`` so the cache stage owns its flags; ``main`` registers ``cache_app``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clipdistill.cli.common import console, reports_user_errors

cache_app = typer.Typer(help="Compute teacher outputs once and store them for training.", no_args_is_help=True)


@cache_app.callback()
def _cache_group() -> None:
    """Compute teacher outputs once and store them for training."""


def _summary(out: Path) -> str:
    from clipdistill.distill.cache import read_manifest

    manifest = read_manifest(out)
    counts, prep, teacher = manifest["counts"], manifest["preprocessing"], manifest["teacher"]
    tokens = " + token features" if manifest.get("token_features") else ""
    if manifest.get("fusion"):
        tokens += f" + fusion states of {manifest['fusion']['spec']}"
    return (
        f"teacher cache: {teacher['spec']} (dim {teacher['embed_dim']}) on {manifest['dataset']['name']}: "
        f"{counts['images']} images x k={prep['k_augmentations']} ({counts['image_rows']} rows), "
        f"{counts['captions']} captions, image size {prep['image_size']}, seed {prep['seed']}{tokens} -> {out}"
    )


@cache_app.command("build")
@reports_user_errors
def cache_build(
    teacher: Annotated[str, typer.Option("--teacher", help="Teacher spec, e.g. run:runs/teacher.")],
    data: Annotated[Path, typer.Option("--data", help="Dataset: folder with dataset.json, Karpathy JSON, CSV/TSV.")],
    out: Annotated[Path, typer.Option("--out", help="Cache folder (shards + manifest.json).")],
    images: Annotated[
        Path | None, typer.Option("--images", help="Image root for a Karpathy JSON or CSV (default: its folder).")
    ] = None,
    split: Annotated[str, typer.Option("--split")] = "train",
    k_aug: Annotated[int, typer.Option("--k-aug", min=1, help="Fixed augmentations per image (0 = plain).")] = 1,
    image_size: Annotated[
        int | None, typer.Option("--image-size", min=8, help="Decode size (default: the teacher's input size).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the replayed augmentations.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 256,
    shard_size: Annotated[
        int, typer.Option("--shard-size", min=1, help="Rows per shard (the unit a torchrun process builds).")
    ] = 4096,
    device: Annotated[str, typer.Option("--device", help="cpu | cuda | cuda:N")] = "cpu",
    token_features: Annotated[
        bool, typer.Option("--token-features", help="Also store token features (teachers that provide them).")
    ] = False,
    fusion: Annotated[
        str | None,
        typer.Option("--fusion", help="Also store this fusion teacher's per-item states (fusion:PATH, blip-itm:ID)."),
    ] = None,
    allow_random_teacher: Annotated[
        bool,
        typer.Option(
            "--allow-random-teacher",
            help="Accept a teacher without trained weights (openclip:NAME with no @TAG, lit:...): for tests only.",
        ),
    ] = False,
) -> None:
    """Compute the teacher's embeddings for every image x augmentation and caption of a split.

    Resumes an interrupted build and does nothing when the cache is already complete.
    """
    from clipdistill.data.loading import load_dataset
    from clipdistill.device import resolve_device
    from clipdistill.models.teachers import check_teacher_weights
    from clipdistill.sharded import build_cache_sharded

    check_teacher_weights(teacher, allow_random=allow_random_teacher)  # a typo or random weights fail before the data
    if fusion:
        from clipdistill.models.spec import parse_fusion_spec

        parse_fusion_spec(fusion)
    resolved = resolve_device(device)
    dataset = load_dataset(data, images)
    build_cache_sharded(  # split by rank under torchrun, else the plain build
        teacher,
        dataset,
        out,
        split=split,
        k_augmentations=k_aug,
        image_size=image_size,
        seed=seed,
        batch_size=batch_size,
        shard_size=shard_size,
        device=resolved,
        token_features=token_features,
        fusion=fusion,
        allow_random_teacher=allow_random_teacher,
    )
    console.print(_summary(out), highlight=False, markup=False, soft_wrap=True)


@cache_app.command("info")
@reports_user_errors
def cache_info(out: Annotated[Path, typer.Argument(help="Cache folder.")]) -> None:
    """Print what a cache was built for (teacher, dataset, preprocessing, counts)."""

    console.print(_summary(out), highlight=False, markup=False, soft_wrap=True)
