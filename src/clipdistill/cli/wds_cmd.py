"""``clipdistill data to-wds DATA --out DIR``: convert any readable dataset to webdataset shards."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clipdistill.cli.common import console


def to_wds_command(
    data: Annotated[Path, typer.Argument(help="Any dataset load_dataset reads (Karpathy, CSV, folder, wds).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder: 00000.tar, 00001.tar, ... + sizes.json.")],
    images: Annotated[Path | None, typer.Option("--images", help="Image root for a Karpathy JSON or CSV.")] = None,
    shard_size: Annotated[int, typer.Option("--shard-size", min=1, help="Samples per shard.")] = 1000,
    split: Annotated[
        list[str] | None, typer.Option("--split", help="Split(s) to write (repeatable; default: all).")
    ] = None,
) -> None:
    """Write tar shards (KEY.<image ext> + KEY.json with ids, split and captions) and sizes.json."""
    from clipdistill.data.dataset import SPLITS
    from clipdistill.data.loading import load_dataset
    from clipdistill.data.wds import write_wds

    dataset = load_dataset(data, images)
    sizes = write_wds(dataset, out, shard_size=shard_size, splits=tuple(split or SPLITS))
    console.print(f"{sum(sizes.values())} samples in {len(sizes)} shard(s) -> {out}")
