r"""How a ``clipdistill distill`` run's memory, disk and time grow with the number of images.

A user sizing a machine for a data set larger than the demo's needs to know which of a run's
costs grow with the data and by how much: the memos and caches keyed by image and caption rows,
the epochs, the run folder. This script runs the same job on the emoji set replicated 1, 2 and
4 times (``--factors``) and records, per factor:

- the data: images, captions (and how many distinct), train / val / test images;
- ``report.json``'s ``memory``: the run's peak resident memory, each stage's peak (data, teacher,
  fusion, cache, evaluation, students, efficiency, deploy) and each stage's wall seconds, and the
  report's ``wall_seconds``;
- the subprocess's own wall clock and its max RSS: ``ru_maxrss_mb`` from ``os.wait4`` on that
  child (its own), and ``children_maxrss_mb`` from ``resource.getrusage(RUSAGE_CHILDREN)`` after
  it exits (the largest of every child this script has waited for so far, so from the second
  factor on it may be an earlier run's). The run resets the kernel's high-water mark before each
  stage (``clipdistill/memory.py``), which can lower both figures below the run's real peak (a
  thread that exits records the mark of that moment, so they may also match it), so
  ``report.json``'s per-stage peaks are the ones to read; these two are kept as a cross-check;
- the run folder's disk use, in total and per top-level entry (sum of file sizes, each inode
  once, symlinks not followed, like ``du --apparent-size``).

Each factor is one fresh ``clipdistill distill`` process (the exact command is in the JSON), so
each run's peak memory is its own: the ``--preset`` (default ``quick``) with ``--methods``
(default ``clip,mcad``: ``mcad`` reads the fusion teacher, so the fusion stage and the cache's
fusion part run) and one seed.

The data is the builtin emoji set replicated with pixel variants, **not new concepts**, so it
measures cost, not recall. Copy 0 is the emoji set as built; copy j > 0 of every image is its
pixels rotated by 90°·j (and mirrored first from j = 4 on) and blended with a tint colour of its own
(``TINTS``), so every copy's pixels differ from every other copy's of the same image, background
included, and the runs' per-row memos and caches hold one row per copy. A copy keeps its source's
split (val and test grow with the factor too) and its captions name the variant ("..., rotated
90 degrees and tinted red"), so the distinct captions grow with the factor as well.

    PYTHONPATH=src .venv/bin/python benchmarks/growth.py --out benchmarks/results/growth.json
    PYTHONPATH=src .venv/bin/python benchmarks/growth.py --markdown benchmarks/results/growth.json
    .venv/bin/python benchmarks/results_doc.py    # writes the block into docs/results.md

A try (a few hundred base images, one epoch per stage; about 13 minutes on 2 busy cores):

    PYTHONPATH=src .venv/bin/python benchmarks/growth.py --factors 1,2 --base-images 300 --epochs 1 \
        --out /tmp/growth_try.json

``--base-images N`` keeps the first N emoji (in the build's order), each split given its share
and at least one image. ``--epochs N`` sets the teacher's, the fusion head's and the students'
epochs; ``--set KEY=VALUE`` passes any other run-config override (``clipdistill distill --set``).
``--work DIR`` keeps the emoji build, the scaled data sets and the run folders (default: a temp
dir, removed at the end); a rerun with the same ``--work`` reuses finished data sets but starts
every run afresh. ``--emoji DIR`` reads an existing emoji build instead of building one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _record import run_header

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
SPLITS = ("train", "val", "test")
# One tint per copy j > 0 (copy j takes TINTS[j - 1]): its name goes into the copy's captions.
TINTS = (
    ("red", (220, 40, 40)),
    ("orange", (240, 140, 20)),
    ("yellow", (225, 205, 30)),
    ("green", (40, 170, 60)),
    ("teal", (20, 160, 160)),
    ("blue", (40, 80, 220)),
    ("purple", (140, 50, 200)),
    ("pink", (230, 90, 170)),
    ("brown", (130, 80, 40)),
    ("grey", (120, 120, 120)),
    ("navy", (20, 30, 110)),
    ("olive", (110, 120, 20)),
)
MAX_FACTOR = len(TINTS) + 1
TINT_ALPHA = 0.35  # the tint's share of each pixel: white turns a clear colour, the glyph stays legible
SCALED_FORMAT = 1  # bump when the variants change, so an old --work folder's data sets are rebuilt


# --- the scaled data sets ---------------------------------------------------------------------
def variant_words(copy: int) -> str:
    """How copy ``copy`` differs from the image as built, in words for its captions ("" for copy 0)."""
    if copy == 0:
        return ""
    if not 0 < copy < MAX_FACTOR:
        raise ValueError(f"copy {copy} has no variant: factors go up to {MAX_FACTOR} (one tint per copy)")
    turn = 90 * (copy % 4)
    geometry = (["mirrored"] if copy >= 4 else []) + ([f"rotated {turn} degrees"] if turn else [])
    return " and ".join([*geometry, f"tinted {TINTS[copy - 1][0]}"])


def variant_image(image: Any, copy: int) -> Any:
    """Copy ``copy`` of a PIL image: mirrored from copy 4 on, rotated by 90°·copy, then blended with
    its own tint, which changes every pixel (the white background too), so no two copies of an
    image are the same pixels even where the glyph is symmetric."""
    from PIL import Image

    if copy == 0:
        return image
    variant_words(copy)  # the range check
    pixels = image.convert("RGB")
    if copy >= 4:
        pixels = pixels.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    turns = {1: Image.Transpose.ROTATE_90, 2: Image.Transpose.ROTATE_180, 3: Image.Transpose.ROTATE_270}
    if copy % 4:
        pixels = pixels.transpose(turns[copy % 4])
    return Image.blend(pixels, Image.new("RGB", pixels.size, TINTS[copy - 1][1]), TINT_ALPHA)


def first_images(images: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    """The first ``limit`` images in file order, each split given its share of ``limit`` (at least
    one, so a small try still has a val and a test split); all of them when ``limit`` is None."""
    if limit is None or limit >= len(images):
        return list(images)
    counts = Counter(image["split"] for image in images)
    if limit < len(counts):
        raise SystemExit(f"--base-images {limit}: needs at least one image per split ({len(counts)} splits)")
    quota = {split: max(1, round(limit * n / len(images))) for split, n in counts.items()}
    quota[max(counts, key=counts.__getitem__)] += limit - sum(quota.values())
    kept, taken = [], Counter()
    for image in images:
        if taken[image["split"]] < quota[image["split"]]:
            kept.append(image)
            taken[image["split"]] += 1
    return kept


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _file_name(filename: str, copy: int) -> str:
    path = Path(filename)
    return filename if copy == 0 else f"{path.stem}__v{copy}{path.suffix or '.png'}"


def scale_dataset(source_json: Path, out: Path, factor: int, base_images: int | None = None) -> dict[str, Any]:
    """Write ``out/dataset.json`` (Karpathy) + ``out/images/``: ``factor`` copies of the (first
    ``base_images``) images of ``source_json``, copy j > 0 a pixel variant (:func:`variant_image`)
    with the same split and captions naming the variant. Returns :func:`dataset_counts` of it.

    ``dataset.json`` is written last (atomically), so its presence means the set is complete; a
    finished set for the same source, factor and base images is reused as it is."""
    from PIL import Image

    from clipdistill.io import atomic_write_json

    source_json = Path(source_json)
    if not source_json.is_file():
        raise SystemExit(f"no dataset to scale: {source_json} does not exist")
    if not 1 <= factor <= MAX_FACTOR:
        raise SystemExit(f"factor {factor}: must be 1 to {MAX_FACTOR} (one tint colour per copy)")
    stamp = {"source": str(source_json.resolve()), "factor": factor, "base_images": base_images}
    stamp["format"] = SCALED_FORMAT
    target = out / "dataset.json"
    if target.is_file():
        done = json.loads(target.read_text(encoding="utf-8"))
        if done.get("scaled") == stamp:
            return dataset_counts(done)
    source = json.loads(source_json.read_text(encoding="utf-8"))
    base = first_images(source["images"], base_images)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    jobs: list[tuple[Path, Path, int]] = []
    sentid = 0
    for copy in range(factor):
        words = variant_words(copy)
        for item in base:
            origin = source_json.parent / item.get("filepath", "") / item["filename"]
            if not origin.is_file():
                raise SystemExit(f"{source_json}: image {origin} does not exist")
            name = _file_name(item["filename"], copy)
            jobs.append((origin, out / "images" / name, copy))
            image_id = str(item.get("image_id", item.get("imgid", Path(item["filename"]).stem)))
            imgid = len(images)
            sentences = []
            for sentence in item["sentences"]:
                raw = sentence["raw"] if copy == 0 else f"{sentence['raw']}, {words}"
                sentences.append({"sentid": sentid, "imgid": imgid, "raw": raw, "tokens": _tokens(raw)})
                sentid += 1
            images.append(
                {
                    **{k: v for k, v in item.items() if k not in ("sentences", "sentids")},
                    "imgid": imgid,
                    "image_id": image_id if copy == 0 else f"{image_id}__v{copy}",
                    "filename": name,
                    "filepath": "images",
                    "copy": copy,
                    "sentids": [s["sentid"] for s in sentences],
                    "sentences": sentences,
                }
            )

    def write(job: tuple[Path, Path, int]) -> None:
        origin, path, copy = job
        if copy == 0:
            shutil.copyfile(origin, path)
            return
        with Image.open(origin) as image:
            variant_image(image, copy).save(path)

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        list(pool.map(write, jobs))  # PNG compression releases the GIL
    doc = {"dataset": f"{source.get('dataset', 'dataset')} x{factor}", "scaled": stamp, "images": images}
    atomic_write_json(target, doc, indent=None)
    return dataset_counts(doc)


def dataset_counts(doc: dict[str, Any]) -> dict[str, Any]:
    """Images, captions, distinct captions and images per split of a Karpathy document."""
    captions = [s["raw"] for image in doc["images"] for s in image["sentences"]]
    splits = Counter(image["split"] for image in doc["images"])
    return {
        "images": len(doc["images"]),
        "captions": len(captions),
        "distinct_captions": len(set(captions)),
        "splits": {split: splits.get(split, 0) for split in sorted(splits, key=_split_order)},
    }


def _split_order(split: str) -> tuple[int, str]:
    return (SPLITS.index(split), split) if split in SPLITS else (len(SPLITS), split)


# --- what a run leaves -----------------------------------------------------------------------
def disk_use(folder: Path) -> dict[str, Any]:
    """``{"total_bytes", "entries": {top-level name: bytes}}``: the sum of file sizes under
    ``folder`` (apparent sizes; a hard-linked file counted once; symlinks not followed), in
    Python so it reads the same on every OS, not whatever ``du`` a machine has."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SystemExit(f"no run folder to measure: {folder} does not exist")
    seen: set[tuple[int, int]] = set()

    def tree_bytes(path: Path) -> int:
        if path.is_dir() and not path.is_symlink():
            files: Iterable[Path] = (Path(root) / name for root, _, names in os.walk(path) for name in names)
        else:
            files = [path]
        total = 0
        for file in files:
            info = file.lstat()
            if not stat.S_ISREG(info.st_mode) or (info.st_dev, info.st_ino) in seen:
                continue  # a symlink, a socket, or a hard link to a file already counted
            seen.add((info.st_dev, info.st_ino))
            total += info.st_size
        return total

    entries = {entry.name: tree_bytes(entry) for entry in sorted(folder.iterdir())}
    return {"total_bytes": sum(entries.values()), "entries": entries}


def flat_figures(row: dict[str, Any]) -> dict[str, float]:
    """A result row's figures under one dotted name each: what :func:`growth_ratios` compares."""
    memory = row.get("memory") or {}
    figures: dict[str, float] = {
        "images": row["images"],
        "captions": row["captions"],
        "distinct_captions": row["distinct_captions"],
    }
    if "peak_rss_mb" in memory:
        figures["peak_rss_mb"] = memory["peak_rss_mb"]
    figures.update({f"stage_mb.{name}": mb for name, mb in memory.get("stages", {}).items()})
    seconds = memory.get("seconds", {})
    figures.update({f"stage_seconds.{name}": s for name, s in seconds.items()})
    if seconds:
        figures["stage_seconds_total"] = sum(seconds.values())
    for key in ("wall_seconds", "process_wall_s", "ru_maxrss_mb"):
        if row.get(key) is not None:
            figures[key] = row[key]
    if "disk" in row:
        figures["disk_bytes"] = row["disk"]["total_bytes"]
        figures.update({f"disk.{name}": size for name, size in row["disk"]["entries"].items()})
    return figures


def growth_ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How much each figure grows from the first row (the smallest factor) to the last:
    ``{"from_factor", "to_factor", "figures": {name: last / first}}``; a figure missing from
    either row, or zero in the first, is left out (no ratio to give)."""
    if len(rows) < 2:
        return {}
    first, last = flat_figures(rows[0]), flat_figures(rows[-1])
    figures = {name: round(last[name] / value, 3) for name, value in first.items() if value and name in last}
    return {"from_factor": rows[0]["factor"], "to_factor": rows[-1]["factor"], "figures": figures}


# --- one run per factor ----------------------------------------------------------------------
def clipdistill_command() -> list[str]:
    """The ``clipdistill`` entry point of this interpreter's environment, else the same app via ``-c``."""
    script = Path(sys.executable).parent / "clipdistill"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from clipdistill.cli.main import app; sys.exit(app())"]


def run_command(data_json: Path, run_dir: Path, preset: str, methods: str, overrides: Iterable[str]) -> list[str]:
    command = [*clipdistill_command(), "distill", "--data", str(data_json), "--preset", preset]
    command += ["--methods", methods, "--seeds", "1", "--out", str(run_dir)]
    for override in overrides:
        command += ["--set", override]
    return command


def run_once(command: list[str], run_dir: Path, log: Path) -> dict[str, Any]:
    """Run one job in a fresh process; its wall clock, ``ru_maxrss`` and what ``report.json`` says."""
    import resource

    if run_dir.exists():
        shutil.rmtree(run_dir)  # a finished stage would be skipped: every run starts from nothing
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage, not every child's
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"run failed (exit {process.returncode}), log {log}:\n{tail}")
    report_path = run_dir / "report.json"
    if not report_path.is_file():
        raise SystemExit(f"run finished without a report: {report_path} does not exist (log {log})")
    report = json.loads(report_path.read_text(encoding="utf-8"))
    scale = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0  # ru_maxrss: bytes on macOS, kB on Linux
    return {
        "memory": report.get("memory"),
        "wall_seconds": report.get("wall_seconds"),
        "process_wall_s": round(seconds, 1),
        "ru_maxrss_mb": round(usage.ru_maxrss / scale, 1),
        "children_maxrss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / scale, 1),
        "disk": disk_use(run_dir),
    }


def markdown(path: Path) -> list[str]:
    """docs/results.md's generated ``growth`` block from a result JSON, rendered by
    ``benchmarks/results_doc.py``'s own renderer."""
    import results_doc

    if not path.is_file():
        raise SystemExit(f"no growth result to render: {path} does not exist")
    data = json.loads(path.read_text(encoding="utf-8"))
    return ["<!-- generated: growth -->", *results_doc.render_growth(str(path), data), "<!-- end generated -->"]


def _factors(text: str) -> list[int]:
    factors = [int(part) for part in text.split(",") if part.strip()]
    if not factors or factors != sorted(set(factors)) or not all(1 <= f <= MAX_FACTOR for f in factors):
        raise argparse.ArgumentTypeError(f"{text!r}: increasing distinct factors from 1 to {MAX_FACTOR}, e.g. 1,2,4")
    return factors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--factors", type=_factors, default=[1, 2, 4], help="copies of the emoji set (default 1,2,4)")
    parser.add_argument("--preset", default="quick", help="run preset: quick, full or a YAML file (default quick)")
    parser.add_argument("--methods", default="clip,mcad", help="methods of each run (default clip,mcad)")
    parser.add_argument("--base-images", type=int, help="keep the first N emoji only (each split its share)")
    parser.add_argument("--epochs", type=int, help="teacher, fusion and student epochs (default: the preset's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--emoji", type=Path, help="an emoji build to read (default: build one in --work)")
    parser.add_argument("--work", type=Path, help="folder for the data sets and runs (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "growth.json")
    parser.add_argument("--markdown", type=Path, metavar="JSON", help="print the generated block and exit")
    args = parser.parse_args(argv)
    if args.markdown:
        print("\n".join(markdown(args.markdown)))
        return
    if args.base_images is not None and args.base_images < 1:
        parser.error("--base-images must be at least 1")
    overrides = list(args.overrides)
    if args.epochs is not None:
        overrides = [f"{key}={args.epochs}" for key in ("teacher.epochs", "fusion.epochs", "optim.epochs")] + overrides

    from clipdistill.io import atomic_write_json
    from clipdistill.run_config import resolve_run_config

    config = resolve_run_config(preset=args.preset, overrides=overrides)
    with tempfile.TemporaryDirectory(prefix="growth-") as tmp:
        work = (args.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        if args.emoji is not None:
            emoji_json = args.emoji / "dataset.json"
            if not emoji_json.is_file():
                raise SystemExit(f"--emoji {args.emoji}: no emoji build there ({emoji_json} does not exist)")
        else:
            from clipdistill.data.emoji import build_emoji_dataset

            print(f"building the emoji set at {config.data.emoji_size} px in {work / 'emoji'}", flush=True)
            build_emoji_dataset(work / "emoji", size=config.data.emoji_size, progress=False)
            emoji_json = work / "emoji" / "dataset.json"
        result: dict[str, Any] = {
            **run_header("growth"),
            "complete": False,
            "dataset": {
                "source": "emoji",
                "emoji_json": str(emoji_json),
                "emoji_size": config.data.emoji_size,
                "base_images": args.base_images,
                "copies": "copy 0 as built; copy j > 0 rotated 90°·j (mirrored from j = 4), tinted; captions say so",
                "tints": [name for name, _ in TINTS],
            },
            "settings": {
                "preset": args.preset,
                "methods": args.methods.split(","),
                "seeds": 1,
                "overrides": overrides,
                "factors": args.factors,
                "budget": {
                    "teacher_epochs": config.teacher.epochs,
                    "fusion_epochs": config.fusion.epochs,
                    "student_epochs": config.optim.epochs,
                },
            },
            "rows": [],
        }
        for factor in args.factors:
            data = work / f"data_x{factor}"
            print(f"factor {factor}: writing the data set in {data}", flush=True)
            counts = scale_dataset(emoji_json, data, factor, args.base_images)
            run_dir = work / f"run_x{factor}"
            command = run_command(data / "dataset.json", run_dir, args.preset, args.methods, overrides)
            print(f"factor {factor}: {counts['images']} images; {shlex.join(command)}", flush=True)
            measured = run_once(command, run_dir, work / f"run_x{factor}.log")
            row = {"factor": factor, **counts, "command": shlex.join(command), **measured}
            result["rows"].append(row)
            result["ratios"] = growth_ratios(result["rows"])
            atomic_write_json(args.out, result)  # after every factor: a failed later run keeps the earlier ones
            memory = measured["memory"] or {}
            print(
                f"factor {factor}: peak {memory.get('peak_rss_mb', 0):.0f} MiB, "
                f"{measured['process_wall_s']:.0f} s, disk {measured['disk']['total_bytes'] / 1e6:.1f} MB",
                flush=True,
            )
        result["complete"] = True
        atomic_write_json(args.out, result)
    import results_doc

    print("\n".join(results_doc.render_growth(str(args.out), result)))


if __name__ == "__main__":
    main()
