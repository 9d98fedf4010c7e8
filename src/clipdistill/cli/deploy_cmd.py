"""``clipdistill export | embed | index | search``: the deploy stage's commands.

Plain functions registered by ``cli.main`` (kept here so the deploy stage owns its flags).
``search`` imports nothing from torch: it runs on a box with only onnxruntime + FAISS.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from clipdistill.cli.common import console, reports_user_errors
from clipdistill.export import OPTIONS, ExportTarget, get_target, list_targets

#: The flags whose use the command can see (the other options have defaults): one given to a
#: format that does not read it is refused rather than ignored.
_SEEN_OPTIONS = ("int8", "data")


def stage_printer(prefix: str = "export") -> Callable[[str], contextlib.AbstractContextManager[None]]:
    """A stage context for the export functions: a spinner on a terminal while the stage runs,
    then one line with its time on stderr (also in logs, where no spinner is drawn). Names are
    printed as written (no markup, no emoji codes)."""
    from rich.console import Console
    from rich.text import Text

    progress = Console(stderr=True, emoji=False, highlight=False, soft_wrap=True)

    @contextlib.contextmanager
    def stage(name: str) -> Iterator[None]:
        started = time.perf_counter()
        with progress.status(Text(f"{prefix}: {name} ...")):
            yield
        progress.print(Text(f"{prefix}: {name} ({time.perf_counter() - started:.1f} s)"))

    return stage


def format_help() -> str:
    """``--format``'s help, read from the export targets (the first is the default)."""
    names = list_targets()
    lines = [f"{name}{' (default)' if name == names[0] else ''}: {get_target(name).summary}" for name in names]
    return " | ".join(lines) + "."


def check_options(target: ExportTarget, given: dict[str, bool]) -> None:
    """Refuse options the target does not read (e.g. ``--int8`` for an open_clip folder), naming
    the formats that do."""
    from clipdistill.export.onnx import ExportConfigError

    refused = [name for name in _SEEN_OPTIONS if name not in target.options]
    if not any(given.get(name) for name in refused):
        return
    owners = [get_target(n).title for n in list_targets() if all(o in get_target(n).options for o in refused)]
    flags = " and ".join(f"--{name}" for name in refused)
    belong = "belong" if len(refused) > 1 else "belongs"
    takes = "takes neither" if len(refused) > 1 else "does not take it"
    where = " / ".join(owners) if owners else "other formats"
    raise ExportConfigError(f"{flags} {belong} to the {where} export; --format {target.name} {takes}")


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


@reports_user_errors
def export_command(
    model: Annotated[str, typer.Option("--model", help="Model spec, e.g. run:runs/student or local-dir:PATH.")],
    out: Annotated[Path, typer.Option("--out", help="Export folder (ONNX graphs, tokenizer, parity.json).")],
    int8: Annotated[bool, typer.Option("--int8", help="Also write dynamically quantised int8 graphs.")] = False,
    opset: Annotated[int, typer.Option("--opset", min=13, max=23, help="ONNX opset.")] = 17,
    data: Annotated[
        Path | None, typer.Option("--data", help="Dataset for the parity check (default: random inputs).")
    ] = None,
    images: Annotated[Path | None, typer.Option("--images", help="Image root for a Karpathy JSON or CSV.")] = None,
    split: Annotated[str, typer.Option("--split", help="Split of --data used for parity.")] = "test",
    exporter: Annotated[str, typer.Option("--exporter", help="torchscript (default) | dynamo")] = "torchscript",
    export_format: Annotated[str, typer.Option("--format", help=format_help())] = list_targets()[0],
) -> None:
    """Export both towers to ONNX (dynamic batch, encode + L2-normalise) with a parity report,
    or (``--format open_clip``) the model as a plain open_clip folder; the formats are the
    export targets (``clipdistill.export``)."""
    target = get_target(export_format)
    check_options(target, {"int8": int8, "data": data is not None})
    values = {"int8": int8, "opset": opset, "exporter": exporter, "data": data, "images": images, "split": split}
    options = {name: values[name] for name in OPTIONS if name in target.options}
    done = target.run(model, out, stage=stage_printer(), **options)
    _REPORTS.get(target.name, _report_other)(model, out, done)


def _report_onnx(model: str, out: Path, parity: dict[str, Any]) -> None:
    """The parity table (torch vs each ONNX variant) and where parity.json is."""
    from rich.table import Table

    table = Table(title=f"parity vs torch: {parity['inputs']}")
    for column in ("variant", "image max|Δ|", "image min cos", "text max|Δ|", "text min cos", "rsum", "size MB"):
        table.add_column(column, justify="right")
    files = parity["files"]
    for name in ("torch", "onnx_fp32", "onnx_int8"):
        if name not in parity:
            continue
        entry = parity[name]
        image, text = entry.get("image", {}), entry.get("text", {})
        suffix = {"onnx_fp32": ".onnx", "onnx_int8": ".int8.onnx"}.get(name)
        size = sum(files[f"{t}_encoder{suffix}"]["bytes"] for t in ("image", "text")) / 1e6 if suffix else None
        recall = entry.get("recall")
        table.add_row(
            name,
            _fmt(image.get("max_abs_diff"), 6) if image else "-",
            _fmt(image.get("min_cosine"), 5) if image else "-",
            _fmt(text.get("max_abs_diff"), 6) if text else "-",
            _fmt(text.get("min_cosine"), 5) if text else "-",
            _fmt(recall["rsum"], 2) if recall else "-",
            _fmt(size, 1),
        )
    from rich.console import Console

    Console().print(table)
    if parity["tokenizer_mismatched_captions"]:
        console.print(
            f"[yellow]warning:[/] served tokenizer differs on {parity['tokenizer_mismatched_captions']} captions"
        )
    console.print(f"exported {model} -> {out} (see {out / 'parity.json'})", highlight=False)


def _report_open_clip(model: str, out: Path, done: dict[str, Any]) -> None:
    """What was written and how closely open_clip alone reproduces it."""
    check = done["check"]
    what = "LiT teacher written" if done["kind"] == "lit" else "open_clip folder copied"
    console.print(
        f"exported {model} -> {out} ({what}; open_clip reproduces it: min cosine image "
        f"{check['image_min_cosine']:.6f}, text {check['text_min_cosine']:.6f}); load it with "
        f"open_clip.create_model_and_transforms('local-dir:{out}') or clipdistill's local-dir:{out}",
        highlight=False,
        markup=False,
    )


def _report_other(model: str, out: Path, done: dict[str, Any]) -> None:
    """A target without its own summary: where it was written."""
    console.print(f"exported {model} -> {out}", highlight=False, markup=False)


#: How each target's result is shown; a target without an entry gets one line.
_REPORTS: dict[str, Callable[[str, Path, dict[str, Any]], None]] = {
    "onnx": _report_onnx,
    "open_clip": _report_open_clip,
}


@reports_user_errors
def embed_command(
    model: Annotated[str, typer.Option("--model", help="Export folder (ONNX, recommended) or a model spec (torch).")],
    data: Annotated[Path, typer.Option("--data", help="Dataset: folder with dataset.json, Karpathy JSON, CSV/TSV.")],
    out: Annotated[Path, typer.Option("--out", help="Embedding folder (img_emb/, text_emb/, metadata.parquet).")],
    images: Annotated[Path | None, typer.Option("--images", help="Image root for a Karpathy JSON or CSV.")] = None,
    split: Annotated[str, typer.Option("--split", help="train | val | test | all")] = "test",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 128,
    shard_size: Annotated[int, typer.Option("--shard-size", min=1, help="Images per resumable shard.")] = 4096,
    device: Annotated[str, typer.Option("--device", help="Torch device for a model spec.")] = "cpu",
) -> None:
    """Embed a dataset split (resumable per shard; finished shards are not recomputed)."""
    from clipdistill.sharded import embed_sharded

    manifest = embed_sharded(  # split by rank under torchrun, else the plain embed
        model, data, out, images=images, split=split, shard_size=shard_size, batch_size=batch_size, device=device
    )
    console.print(
        f"embedded {manifest['count']} images (dim {manifest['embed_dim']}, {len(manifest['shards'])} shards, "
        f"{manifest['skipped_shards']} already done) with {manifest['model']['backend']} -> {out}",
        highlight=False,
    )


@reports_user_errors
def index_command(
    emb_dir: Annotated[Path, typer.Argument(help="Embedding folder written by `clipdistill embed`.")],
    out: Annotated[Path, typer.Option("--out", help="Index folder (self-contained: index, encoders, thumbnails).")],
    factory: Annotated[str, typer.Option("--factory", help="FAISS factory: Flat | HNSW32 | IVF{n},PQ{m} | ...")] = (
        "HNSW32"
    ),
    encoders: Annotated[
        Path | None, typer.Option("--encoders", help="Export folder to bundle (default: the one used to embed).")
    ] = None,
    ef_search: Annotated[int, typer.Option("--ef-search", min=1, help="HNSW efSearch.")] = 64,
    ef_construction: Annotated[int, typer.Option("--ef-construction", min=1, help="HNSW efConstruction.")] = 80,
    nprobe: Annotated[int, typer.Option("--nprobe", min=1, help="IVF lists probed per query.")] = 16,
) -> None:
    """Build an inner-product FAISS index with a manifest, bundled encoders and thumbnails."""
    from clipdistill.serve.index import build_index

    manifest = build_index(
        emb_dir,
        out,
        factory=factory,
        encoders=encoders,
        ef_search=ef_search,
        ef_construction=ef_construction,
        nprobe=nprobe,
    )
    console.print(
        f"index {manifest['factory']} over {manifest['count']} vectors (dim {manifest['dim']}, "
        f"{manifest['model']['spec']}) built in {manifest['build_params']['build_seconds']} s -> {out}",
        highlight=False,
    )


@reports_user_errors
def search_command(
    index_dir: Annotated[Path, typer.Argument(help="Index folder written by `clipdistill index`.")],
    query: Annotated[str | None, typer.Argument(help="Text query.")] = None,
    image: Annotated[Path | None, typer.Option("--image", help="Query by this image instead of text.")] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, max=1000, help="Number of results.")] = 10,
    variant: Annotated[str, typer.Option("--variant", help="Query encoders: fp32 | int8")] = "fp32",
    encoders: Annotated[
        Path | None, typer.Option("--encoders", help="Use this export folder instead of the bundled encoders.")
    ] = None,
) -> None:
    """Search an index by text (text->image) or by --image (image->image); prints a table."""
    from rich.console import Console
    from rich.table import Table

    from clipdistill.serve.search import QueryError, Searcher

    if (query is None) == (image is None):
        raise QueryError("give a text QUERY or --image PATH (exactly one)")
    searcher = Searcher.open(index_dir, encoders=encoders, variant=variant)
    hits = searcher.search(text=query, image=image, k=k)
    title = f"{query!r}" if query is not None else f"image {image}"
    table = Table(title=f"top {len(hits)} for {title} ({searcher.count} indexed, {searcher.manifest['factory']})")
    for column, justify in (("#", "right"), ("score", "right"), ("id", "left"), ("caption", "left"), ("path", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for rank, hit in enumerate(hits, start=1):
        table.add_row(str(rank), f"{hit['score']:.4f}", hit["id"], hit["caption"], hit["path"])
    Console(width=160).print(table)
