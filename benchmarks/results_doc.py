"""Rewrite the generated tables of docs/results.md and docs/scale.md from the benchmark JSONs.

A generated block is the text between ``<!-- generated: NAME -->`` and ``<!-- end generated -->``;
it is replaced whole by the table that ``BLOCKS[NAME]`` renders from its JSON files in
``benchmarks/results/`` (or from a demo's ``report.json``). Text outside the blocks is never
touched, so the prose around a table is written by hand and the numbers come from the data.

    .venv/bin/python benchmarks/results_doc.py                       # rewrite the blocks
    .venv/bin/python benchmarks/results_doc.py --check               # exit 1 where a block differs
    .venv/bin/python benchmarks/results_doc.py --demo runs/demo/report.json --full runs/full/report.json

The blocks of a demo table (``demo-quick``, ``demo-full``, ``demo-big``) are rendered only when
their report is given (``--demo``, ``--full``, ``--big``); without it they are left as they are,
and ``--check`` says so.
So are the blocks in ``NOT_YET_MEASURED`` while their benchmark's JSON does not exist yet.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = [ROOT / "docs" / "results.md", ROOT / "docs" / "scale.md"]
BLOCK = re.compile(r"<!-- generated: (?P<name>[\w.-]+) -->\n(?P<body>.*?)<!-- end generated -->", re.S)
RECALLS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10")
RECALL_HEADER = [k.replace("_", " ") for k in RECALLS]
DEMO_COMMANDS = {
    "quick": "clipdistill demo --preset quick --out runs/demo",
    "full": "clipdistill demo --preset full --out runs/full",
    "big": "make install-big && clipdistill demo --preset big --out runs/big",
}


# --- small helpers ---------------------------------------------------------------------------
def machine(data: dict[str, Any]) -> str:
    """The machine a JSON records: ``_record.run_header``'s dict, or an older free-text line."""
    found = data.get("machine", "machine not recorded")
    if isinstance(found, dict):
        if "cpu" in found:  # a demo report
            return f"{found['cpu']}, {found['cores']} cores, torch {found['torch']}"
        return f"{found['platform']}, {found['cpus']} CPUs, Python {found['python']}"
    return str(found)


def caption(sources: list[tuple[str, dict[str, Any]]]) -> str:
    """The line above a table: which JSON it comes from, the machine and the date recorded there."""
    parts = [f"`{name}` ({machine(data)}; {data.get('date', 'date not recorded')})" for name, data in sources]
    return "Generated from " + "; ".join(parts) + "."


def table(header: list[str], rows: list[list[str]], right: int = 1) -> list[str]:
    """A markdown table; columns from ``right`` on are right-aligned."""
    align = ["---" if i < right else "---:" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"] + [
        "| " + " | ".join(row) + " |" for row in rows
    ]


def f1(value: float) -> str:
    return f"{value:.1f}"


def per_seed(values: list[float]) -> str:
    return " / ".join(f1(v) for v in values)


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.pstdev(values):.1f}" if len(values) > 1 else f1(values[0])


def teacher_text(spec: str, rsum: float) -> str:
    """ "Teacher test rsum R (`SPEC`)." (the spec left out where it names a folder outside the repository)."""
    where = spec.partition(":")[2] or spec
    return f"Teacher test rsum {rsum:.1f}" + ("." if where.startswith("/") else f" (`{spec}`).")


def args_text(args: Any) -> str:
    if isinstance(args, dict):
        return ", ".join(f"{k} {v}" for k, v in args.items()) or "defaults"
    return str(args)


# --- renderers: one per table kind; each returns the block's lines ---------------------------
def speedup(teacher: dict[str, float], student: dict[str, float], batch: int) -> float:
    """Teacher / student time per image + caption at ``batch`` (``eval/onnx_timing.speedup``)."""
    return (teacher[f"image_b{batch}"] + teacher[f"text_b{batch}"]) / (
        student[f"image_b{batch}"] + student[f"text_b{batch}"]
    )


def interval(student: dict[str, Any]) -> str:
    """`` [low, high]``: a student's 95% interval of its method's difference with scratch (paired
    bootstrap over the test queries), or nothing for a report without one."""
    if "vs_scratch" not in student:
        return ""
    low, high = student["vs_scratch"]["ci95"]
    return f" [{low:+.1f}, {high:+.1f}]"


def render_demo(report: dict[str, Any], name: str) -> list[str]:
    """A demo report: per method (and per student size, with a ladder) test rsum (per seed,
    mean ± std), vs scratch on the same student, % of the teacher, val rsum, and the ONNX Runtime
    timing of the teacher and of each student network."""
    teacher = report["teacher"]
    teacher_rsum = teacher["metrics"]["rsum"]
    budget, eff, best = report["budget"], report.get("efficiency", {}), report["best_student"]
    labels: list[str | None] = list(budget.get("students") or [None])
    groups: dict[tuple[str | None, str], list[dict[str, Any]]] = {}
    for student in report["students"]:
        groups.setdefault((student.get("student"), student["method"]), []).append(student)

    def timing(entry: dict[str, Any]) -> list[str]:
        if "onnx_ms" not in entry:
            return ["", "", "", ""]
        ms = [entry["onnx_ms"][f"image_b{b}"] + entry["onnx_ms"][f"text_b{b}"] for b in (1, 64)]
        ratios = [speedup(teacher["onnx_ms"], entry["onnx_ms"], b) for b in (1, 64)]
        return [f"{ms[0]:.2f}", f"{ms[1]:.2f}", f"{ratios[0]:.1f}x", f"{ratios[1]:.1f}x"]

    ladder = labels != [None]
    rows = [["teacher", *([""] if ladder else []), f1(teacher_rsum), "", "", "", "", *timing(teacher)]]
    for label in labels:
        methods = [(method, runs) for (of, method), runs in groups.items() if of == label]
        scratch = statistics.mean(s["metrics"]["rsum"] for s in methods[0][1])
        for i, (method, runs) in enumerate(methods):
            test = [r["metrics"]["rsum"] for r in runs]
            shipped = method == best["method"] and label == best.get("student")
            rows.append(
                [
                    f"`{method}`" + (" (scratch)" if i == 0 else "") + (" (shipped)" if shipped else ""),
                    *([f"`{label}`"] if ladder else []),
                    per_seed(test),
                    mean_std(test),
                    "" if i == 0 else f"{statistics.mean(test) - scratch:+.1f}" + interval(runs[0]),
                    f"{statistics.mean(test) / teacher_rsum:.0%}",
                    f1(statistics.mean(r["val_rsum"] for r in runs)),
                    *(timing(runs[0]) if i == 0 else ["", "", "", ""]),
                ]
            )
    header = ["model", *(["student"] if ladder else []), "test rsum per seed", "mean ± std", "vs scratch"]
    header += ["% of teacher", "val rsum", "ms b1", "ms b64", "speed-up b1", "speed-up b64"]
    networks = (
        ", ".join(f"`{label}`" for label in labels)
        if ladder
        else f"`{budget['student']}` at {budget['student_image_size']} px"
    )
    shipped_on = f" on `{best['student']}`" if ladder else ""
    teacher_name = budget.get("teacher_model", teacher["spec"])  # the spec it was trained from
    lines = [
        f"Generated from `{name}` (`--preset {report['preset']}`; {machine(report)}; finished "
        f"{report.get('finished_utc', '?')} UTC, job {report.get('wall_seconds', 0) / 60:.0f} min). "
        f"Reproduce: `{DEMO_COMMANDS.get(report['preset'], 'clipdistill demo --preset ' + report['preset'])}`.",
        "",
        f"Test split: {report['n_images']} images, {report['n_texts']} captions. Teacher `{teacher_name}`. "
        f"Students: {networks}, {budget['epochs']} epochs, {budget['seeds']} seed(s). The shipped "
        f"student is `{best['method']}`{shipped_on} seed {best['seed']} (best {best['selected_by']}). Timing: "
        f"ONNX Runtime fp32, {eff.get('threads', '?')} threads, median of {eff.get('repeats', '?')}, ms per image + "
        f"caption (measured {eff.get('measured_utc', '?')} UTC); every student network is timed once."
        + (
            " vs scratch: mean difference over seeds with scratch on the same student [95% interval, paired "
            "bootstrap over the test queries]."
            if any("vs_scratch" in s for s in report["students"])
            else ""
        ),
        "",
        *table(header, rows, right=2 if ladder else 1),
    ]
    from clipdistill.report import fusion_gain_sentence, memory_sentence

    fusion_entry = report.get("fusion_teacher") or {}
    fusion = fusion_entry.get("rerank_test")
    if fusion:
        lines += [
            "",
            (
                f"Fusion teacher, re-ranking the dual teacher's top-{fusion['k']}: test t2i R@1 "
                f"{fusion['dual']['t2i_R@1']:.1f} -> {fusion['reranked']['t2i_R@1']:.1f}. "
                + fusion_gain_sentence(fusion_entry)
            ).rstrip(),
        ]
    if report.get("memory"):
        lines += ["", memory_sentence(report["memory"])]
    parity = (report.get("deploy") or {}).get("parity")
    if parity and "rsum" in parity:
        lines += [
            "",
            "Export of the shipped student, test rsum: "
            + ", ".join(f"{k} {v:.1f}" for k, v in parity["rsum"].items())
            + ".",
        ]
    return lines


def render_frontier(report: dict[str, Any], name: str) -> list[str]:
    """A demo report's ``frontier``: every point's test rsum and ONNX cost, whether it is on the
    frontier, and the cheap alternative (teacher at a smaller input, scratch) that beats a student."""
    from clipdistill.eval.frontier import frontier_lines

    table_lines = [line for line in frontier_lines(report["frontier"]) if line.startswith("|")]
    return [f"Generated from `{name}` (`--preset {report['preset']}`; {machine(report)}).", "", *table_lines]


def render_methods_seeds(name: str, data: dict[str, Any]) -> list[str]:
    """``methods.py`` runs over seeds: test (and val) rsum per seed, mean ± std, vs ``clip``."""
    methods = data["methods"]
    with_val = any("val_rsum" in m for m in methods.values())
    scratch = statistics.mean(r["rsum"] for r in methods["clip"]["runs"]) if "clip" in methods else None
    rows = []
    for method, entry in methods.items():
        test = [r["rsum"] for r in entry["runs"]]
        row = [f"`{method}`", args_text(data["chosen_weights"].get(method, {}))]
        if with_val:
            val = entry.get("val_rsum", [])
            row.append(f"{per_seed(val)} ({statistics.mean(val):.1f})" if val else "")
        delta = "" if scratch is None or method == "clip" else f"{statistics.mean(test) - scratch:+.1f}"
        row += [per_seed(test), mean_std(test), delta, f"{statistics.median(entry['train_seconds']):.0f}"]
        rows.append(row)
    header = ["method", "arguments"] + (["val rsum per seed (mean)"] if with_val else [])
    header += ["test rsum per seed", "mean ± std", "vs `clip`", "train s / run (median)"]
    teacher = teacher_text(data["teacher"]["spec"], data["teacher"]["test"]["rsum"])
    return [caption([(name, data)]), "", teacher, "", *table(header, rows, right=len(header) - 4)]


def render_methods_sweep(sources: list[tuple[str, dict[str, Any]]], swept: dict[str, str] | None = None) -> list[str]:
    """``methods.py``'s val sweeps: each setting's val rsum (and, where recorded, per seed and test).
    A sweep of one number records no name: ``swept`` gives it per method, else the method's one
    chosen weight names it."""
    per_seed_cols = any(
        "val_rsum_per_seed" in s for _, data in sources for entries in data["sweeps_on_val"].values() for s in entries
    )
    rows = []
    for _, data in sources:
        for method, entries in data["sweeps_on_val"].items():
            chosen = data["chosen_weights"].get(method, {})
            for entry in entries:
                value = entry["value"]
                if not isinstance(value, dict):
                    param = (swept or {}).get(method) or (next(iter(chosen)) if len(chosen) == 1 else "value")
                    value = {param: value}
                picked = all(chosen.get(k) == v for k, v in value.items())
                row = [f"`{method}`", args_text(value) + (" (chosen)" if picked else "")]
                if per_seed_cols:
                    test = entry.get("test_rsum_per_seed", [])
                    row += [per_seed(entry.get("val_rsum_per_seed", [])), f1(entry["val_rsum"]), per_seed(test)]
                    row.append(f1(statistics.mean(test)) if test else "")
                else:
                    row.append(f1(entry["val_rsum"]))
                rows.append(row)
        clip = data["methods"].get("clip")
        if clip and "val_rsum" in clip and per_seed_cols:
            test = [r["rsum"] for r in clip["runs"]]
            val = clip["val_rsum"]
            rows.append(
                [
                    "`clip` (scratch)",
                    "",
                    per_seed(val),
                    f1(statistics.mean(val)),
                    per_seed(test),
                    f1(statistics.mean(test)),
                ]
            )
    header = ["method", "setting"]
    header += ["val rsum per seed", "val mean", "test rsum per seed", "test mean"] if per_seed_cols else ["val rsum"]
    return [caption(sources), "", *table(header, rows, right=2)]


def render_methods_recall(sources: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Several ``methods.py`` JSONs of one setup: per method the six recalls (mean over seeds),
    rsum mean ± std, vs ``clip`` and the weights chosen on val; teacher and ``clip`` from the first."""
    first = sources[0][1]
    scratch = statistics.mean(r["rsum"] for r in first["methods"]["clip"]["runs"])
    teacher = first["teacher"]["test"]
    rows = [["teacher", "", *(f1(teacher[k]) for k in RECALLS), f1(teacher["rsum"]), ""]]
    seen = set()
    for _, data in sources:
        for method, entry in data["methods"].items():
            if method in seen:
                continue
            seen.add(method)
            means = [f1(statistics.mean(r[k] for r in entry["runs"])) for k in RECALLS]
            test = [r["rsum"] for r in entry["runs"]]
            delta = "" if method == "clip" else f"{statistics.mean(test) - scratch:+.1f}"
            weights = args_text(data["chosen_weights"].get(method, {}))
            rows.append([f"`{method}`", weights, *means, mean_std(test), delta])
    header = ["model", "weights chosen on val", *RECALL_HEADER, "rsum (mean ± std)", "vs `clip`"]
    return [caption(sources), "", *table(header, rows, right=2)]


def render_conaclip_ablation(name: str, data: dict[str, Any]) -> list[str]:
    rows = [[graph, *(f1(m[k]) for k in RECALLS), f1(m["rsum"])] for graph, m in data["conaclip_ablation"].items()]
    return [caption([(name, data)]), "", *table(["graph", *RECALL_HEADER, "rsum"], rows)]


def render_student_init(name: str, data: dict[str, Any]) -> list[str]:
    teacher = data["teacher"]["test_rsum"]
    rows = []
    for start, entry in data["starts"].items():
        mean, std = entry["test_rsum_mean_std"]
        val = entry["val_rsum"]
        rows.append(
            [
                start,
                per_seed(entry["test_rsum"]),
                f"{mean:.1f} ± {std:.1f}",
                f"{mean / teacher:.0%}",
                f"{per_seed(val)} ({statistics.mean(val):.1f})",
                f"{statistics.mean(entry['train_seconds']):.0f}",
            ]
        )
    header = ["image / text tower from", "test rsum per seed", "mean ± std", "% of teacher", "val rsum per seed (mean)"]
    header.append("train s / run")
    budget = data["budget"]
    line = (
        f"`{data['method']}`, `{budget['student']}` at {budget['student_image_size']} px, {budget['epochs']} epochs, "
        f"{budget['seeds']} seeds. " + teacher_text(data["teacher"]["spec"], teacher)
    )
    return [caption([(name, data)]), "", line, "", *table(header, rows, right=2)]


def render_dcd_terms(name: str, data: dict[str, Any]) -> list[str]:
    rows = []
    for variant, entry in data["variants"].items():
        mean, std = entry["test_rsum_mean_std"]
        rows.append(
            [
                variant,
                args_text(entry["method_args"]),
                per_seed(entry["val_rsum"]),
                per_seed(entry["test_rsum"]),
                f"{mean:.1f} ± {std:.1f}",
            ]
        )
    return [
        caption([(name, data)]),
        "",
        *table(
            ["variant", "`dcd` arguments", "val rsum per seed", "test rsum per seed", "test mean ± std"], rows, right=4
        ),
    ]


def render_trunk_latency(name: str, data: dict[str, Any]) -> list[str]:
    rows = [[trunk, f1(t["mflops"]), f"{t['ms_b1']:.2f}", f"{t['ms_b64']:.2f}"] for trunk, t in data["trunks"].items()]
    head = f"ONNX Runtime fp32, {data['threads']} threads, median of {data['repeats']}, ms per image."
    return [caption([(name, data)]), "", head, "", *table(["trunk @ px", "MFLOPs", "ms b1", "ms b64"], rows)]


def render_trunk_speedups(name: str, data: dict[str, Any]) -> list[str]:
    """Teacher x student speed-ups (image + caption, with the demo's captions), b1 and b64."""
    pairs = [key.split(" / ") for key in data["speedups"]]
    teachers = list(dict.fromkeys(t for t, _ in pairs))
    students = list(dict.fromkeys(s for _, s in pairs))
    rows = []
    for teacher in teachers:
        cells = []
        for student in students:
            ratio = data["speedups"].get(f"{teacher} / {student}")
            cells.append(f"{ratio['b1']:.2f}x, {ratio['b64']:.2f}x" if ratio else "")
        rows.append([teacher, *cells])
    cap = data["caption_ms"]
    head = (
        f"Image + caption, teacher / student, at batch 1 and 64; captions as `{cap['report']}` timed them "
        f"(teacher {cap['teacher']['text_b1']:.2f} / {cap['teacher']['text_b64']:.2f} ms, "
        f"student {cap['student']['text_b1']:.2f} / {cap['student']['text_b64']:.2f} ms at b1 / b64)."
    )
    return [caption([(name, data)]), "", head, "", *table(["teacher \\ student", *students], rows, right=99)]


def render_val_test(sources: list[tuple[str, dict[str, Any]]]) -> list[str]:
    rows = []
    for name, data in sources:
        pairs, wins = data["same_seed_pairs"], data["same_seed_pairs_val_picks_test_winner"]
        tests = [r["test_rsum"] for r in data["runs"]]
        rows.append(
            [
                f"`{Path(name).name}`",
                str(len(data["runs"])),
                f"{min(tests):.0f}-{max(tests):.0f}",
                f"{data['pearson']:.2f}",
                f"{data['spearman']:.2f}",
                f"{wins} of {pairs} ({wins / pairs:.0%})",
            ]
        )
    header = [
        "runs",
        "distinct runs",
        "test rsum range",
        "Pearson",
        "Spearman",
        "same-seed pairs where val picks the test winner",
    ]
    return [caption(sources), "", *table(header, rows)]


def render_export_latency(name: str, data: dict[str, Any]) -> list[str]:
    rows = [
        [r["tower"], str(r["batch"]), f"{r['torch_ms']:.2f}", f"{r['onnx_fp32_ms']:.2f}", f"{r['onnx_int8_ms']:.2f}"]
        for r in data["latency_ms"]
    ]
    head = f"`{data['model']}`, torch {data['torch']}, {data['threads']} threads, median ms per call (the whole batch)."
    return [
        caption([(name, data)]),
        "",
        head,
        "",
        *table(["tower", "batch", "torch eager", "ONNX fp32", "ONNX int8"], rows),
    ]


def render_export_parity(name: str, data: dict[str, Any]) -> list[str]:
    size, cos, rsum = data["bytes"], data["min_cosine"], data["rsum"]
    rows = [
        [
            "torch",
            f1(size["torch_params"]["image"] / 1e6),
            f1(size["torch_params"]["text"] / 1e6),
            "1",
            "1",
            f"{rsum['torch']:.2f}",
        ]
    ]
    for key, label in (("fp32", "onnx_fp32"), ("int8", "onnx_int8")):
        rows.append(
            [
                f"ONNX {key}",
                f1(size[key]["image"] / 1e6),
                f1(size[key]["text"] / 1e6),
                f"{cos[label]['image']:.5f}",
                f"{cos[label]['text']:.5f}",
                f"{rsum[label]:.2f}",
            ]
        )
    head = f"Parity on {data['parity_inputs']}."
    header = ["variant", "image MB", "text MB", "image min cos", "text min cos", "test rsum"]
    return [caption([(name, data)]), "", head, "", *table(header, rows)]


def render_index(name: str, data: dict[str, Any]) -> list[str]:
    rows = []
    for r in data["rows"]:
        params = ", ".join(f"{k} {v}" for k, v in r["params"].items())
        rows.append(
            [
                r["data"],
                r["factory"],
                params,
                f"{r['build_s']:.2f}",
                f1(r["memory_mb"]),
                f"{r['qps']:.0f}",
                f"{r['speedup_vs_flat']:.1f}x",
                f"{r['recall@10']:.3f}",
            ]
        )
    syn = data["synthetic"]
    head = (
        f"Synthetic: {syn['n']:,} vectors, {syn['dim']} dims, {syn['clusters']} clusters; {syn['queries']} queries, "
        f"k = 10; real: `{data['real']}`; FAISS {data['faiss']}, {data['threads']} threads."
    )
    header = ["data", "factory", "search params", "build s", "memory MB", "QPS", "vs Flat", "recall@10"]
    return [caption([(name, data)]), "", head, "", *table(header, rows, right=3)]


def render_load(name: str, data: dict[str, Any]) -> list[str]:
    rows = []
    for level in data["levels"]:
        for kind in ("all", "text", "image"):
            q = level[kind]
            server = level["server"]
            stages = (
                ""
                if kind == "all"
                else f"{server[f'{kind}_encode_mean_ms']:.1f} / {server[f'{kind}_search_mean_ms']:.1f}"
            )
            rows.append(
                [
                    str(level["concurrency"]),
                    kind,
                    str(q["requests"]),
                    str(q["errors"]),
                    f1(level["qps"]) if kind == "all" else "",
                    f1(q["p50_ms"]),
                    f1(q["p95_ms"]),
                    f1(q["p99_ms"]),
                    stages,
                ]
            )
    index = data["index"]
    head = (
        f"Index: {index['count']:,} items (`{index['dataset']}`), {index['factory']}; queries {data['mix']}; "
        f"load average before / after {data['load_average_1_5_15_before'][0]} / {data['load_average_1_5_15_after'][0]}."
    )
    header = [
        "concurrency",
        "queries",
        "requests",
        "errors",
        "QPS",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "server encode / search ms",
    ]
    return [caption([(name, data)]), "", head, "", *table(header, rows, right=2)]


def render_cache_cost(name: str, data: dict[str, Any]) -> list[str]:
    rows = [
        [setup, f1(r["epoch_s"]), f"{r['data_s']:.2f}", f1(r["compute_s"]), f"{r['ratio_vs_alone']:.2f}"]
        for setup, r in data["rows"].items()
    ]
    head = f"Batch {data['batch_size']}, {data['k_aug']} augmentations, teacher `{data['teacher']}`."
    header = ["setup", "s / epoch", "data s", "compute s", "x student alone"]
    return [caption([(name, data)]), "", head, "", *table(header, rows)]


def render_scale(sources: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Throughput at 1 and 2 processes, one column pair per JSON (thread settings differ)."""
    units = {"cache": "teacher rows/s", "train": "samples/s", "embed": "images/s"}
    header, columns = ["task", "unit"], []
    for _, data in sources:
        threads = data["settings"]["threads_per_process"]
        label = "1 thread each" if threads == 1 else "cores split"
        for n in data["settings"]["processes"]:
            header.append(f"{n} process{'es' if n > 1 else ''} ({label})")
            columns.append((data, n))
    rows = []
    for task, unit in units.items():
        row = [task, unit]
        for data, n in columns:
            rate = data["results"][f"{task}@{n}"]["per_second"]
            base = data["results"][f"{task}@1"]["per_second"]
            row.append(f1(rate) + (f" ({rate / base:.2f}x)" if n > 1 else ""))
        rows.append(row)
    return [caption(sources), "", *table(header, rows, right=2)]


def render_lines(key: str) -> Callable[[str, dict[str, Any]], list[str]]:
    """A benchmark that writes its own markdown lines (``table``, ``projection``) into its JSON."""

    def render(name: str, data: dict[str, Any]) -> list[str]:
        return [caption([(name, data)]), "", *data[key]]

    return render


def render_serve_memory(name: str, data: dict[str, Any]) -> list[str]:
    rows = []
    for r in data["rows"]:
        codes = sorted(set(r["statuses"]))
        rows.append(
            [
                r["config"],
                str(r["queries"]),
                ", ".join(map(str, codes)),
                f"{r['idle_rss_bytes'] / 2**20:.0f}",
                f"{r['peak_increase_bytes'] / 2**20:.0f}",
                f"{max(r['latency_s']):.1f}",
            ]
        )
    image = data["image"]
    head = (
        f"{data['rows'][0]['queries']} concurrent queries, each a {image['side']} px {image['format']} "
        f"({image['bytes']:,} bytes); target: {data['target']}."
    )
    header = ["server", "queries", "statuses", "idle RSS MB", "peak RSS increase MB", "slowest answer s"]
    return [caption([(name, data)]), "", head, "", *table(header, rows)]


def render_growth(name: str, data: dict[str, Any]) -> list[str]:
    """``growth.py``: per copy factor of the emoji set, the run's peak memory and largest stage,
    the stages' summed seconds, the job's wall clock and the run folder's disk use; then one
    sentence of how much each grows from the smallest factor to the largest."""
    settings, budget = data["settings"], data["settings"]["budget"]
    rows = []
    for r in data["rows"]:
        memory = r.get("memory") or {}
        stages = memory.get("stages") or {}
        largest = max(stages, key=stages.__getitem__) if stages else None
        splits = " / ".join(f"{r['splits'].get(split, 0):,}" for split in ("train", "val", "test"))
        rows.append(
            [
                f"x{r['factor']}",
                f"{r['images']:,} ({splits})",
                f"{r['captions']:,} ({r['distinct_captions']:,})",
                f"{memory['peak_rss_mb']:.0f}" if "peak_rss_mb" in memory else "",
                f"{largest} {stages[largest]:.0f}" if largest else "",
                f"{sum((memory.get('seconds') or {}).values()):.0f}" if memory.get("seconds") else "",
                f"{r['process_wall_s']:.0f}",
                f"{r['disk']['total_bytes'] / 1e6:.1f}",
            ]
        )
    base = data["dataset"].get("base_images")
    epochs = " / ".join(str(budget[k]) for k in ("teacher_epochs", "fusion_epochs", "student_epochs"))
    head = (
        f"`--preset {settings['preset']}`, methods {', '.join(f'`{m}`' for m in settings['methods'])}, "
        f"{settings['seeds']} seed; epochs teacher / fusion / students {epochs}"
        + (f"; overrides {', '.join(f'`{o}`' for o in settings['overrides'])}" if settings["overrides"] else "")
        + f". The first copy is {'the first ' + format(base, ',') + ' images of ' if base else ''}the emoji set, "
        "the others pixel variants of it (same concepts). Memory: `report.json`'s peaks (MiB); "
        "seconds: the stages' own, summed, and the whole `clipdistill distill` process; disk: the run folder."
        + ("" if data.get("complete", True) else " Incomplete: the benchmark stopped after the last row.")
    )
    header = ["copies", "images (train / val / test)", "captions (distinct)", "peak MiB", "largest stage MiB"]
    header += ["stage s (sum)", "job wall s", "disk MB"]
    lines = [caption([(name, data)]), "", head, "", *table(header, rows)]
    ratios = data.get("ratios") or {}
    if ratios:
        lines += ["", growth_sentence(ratios, data["rows"])]
    return lines


def growth_sentence(ratios: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """``growth.py``'s ratios (last factor over first) in one sentence, each with the stage or
    run-folder entry that added the most (a ratio alone would name a stage of 0.1 s that took 0.4)."""
    figures = ratios["figures"]
    first, last = rows[0], rows[-1]

    def memory(row: dict[str, Any], key: str) -> dict[str, float]:
        return (row.get("memory") or {}).get(key) or {}

    def most_added(before: dict[str, float], after: dict[str, float], unit: str, scale: float = 1.0) -> str:
        if not after:
            return ""
        top = max(after, key=lambda k: after[k] - before.get(k, 0.0))
        grown = f", {after[top] / before[top]:.1f}x" if before.get(top) else ""
        return f" (most added: {top} {(after[top] - before.get(top, 0.0)) / scale:+.0f} {unit}{grown})"

    parts = []
    if "peak_rss_mb" in figures:
        added = most_added(memory(first, "stages"), memory(last, "stages"), "MiB")
        parts.append(f"peak memory grows {figures['peak_rss_mb']:.1f}x{added}")
    if "stage_seconds_total" in figures:
        added = most_added(memory(first, "seconds"), memory(last, "seconds"), "s")
        parts.append(f"the stages' summed time {figures['stage_seconds_total']:.1f}x{added}")
    if "process_wall_s" in figures:
        parts.append(f"the job's wall clock {figures['process_wall_s']:.1f}x")
    if "disk_bytes" in figures:
        added = most_added(first["disk"]["entries"], last["disk"]["entries"], "MB", 1e6)
        parts.append(f"the run folder {figures['disk_bytes']:.1f}x{added}")
    listed = ", ".join(parts[:-1]) + f" and {parts[-1]}" if len(parts) > 1 else "".join(parts)
    return (
        f"From x{ratios['from_factor']} to x{ratios['to_factor']} ({figures['images']:.1f}x the images, "
        f"{figures.get('distinct_captions', 0):.1f}x the distinct captions): {listed}."
    )


# --- which block is which ---------------------------------------------------------------------
def single(
    render: Callable[[str, dict[str, Any]], list[str]],
) -> Callable[[list[tuple[str, dict[str, Any]]]], list[str]]:
    return lambda sources: render(*sources[0])


W_ALIGN = {"comkd": "w_align"}
BLOCKS: dict[str, tuple[list[str], Callable[[list[tuple[str, dict[str, Any]]]], list[str]]]] = {
    "demo-quick": (["@demo"], single(lambda name, report: render_demo(report, name))),
    "demo-full": (["@full"], single(lambda name, report: render_demo(report, name))),
    "demo-big": (["@big"], single(lambda name, report: render_demo(report, name))),
    "demo-big-frontier": (["@big"], single(lambda name, report: render_frontier(report, name))),
    "methods-quick-lite0": (["methods_quick_lite0.json"], single(render_methods_seeds)),
    "methods-seeds-xeon": (["methods_seeds_xeon.json"], single(render_methods_seeds)),
    "methods-seeds-amd": (["methods_seeds_amd.json"], single(render_methods_seeds)),
    "methods-sweep-dcd-comkd": (["methods_sweep_dcd_comkd.json"], render_methods_sweep),
    "methods-dcd-teacher-scale": (["methods_dcd_teacher_scale.json"], render_methods_sweep),
    "methods-comkd-text-refine": (["methods_comkd_text_refine.json"], render_methods_sweep),
    "methods-dcd-lite0": (["methods_dcd_lite0.json"], render_methods_sweep),
    "methods-comkd-lite0": (["methods_comkd_lite0.json"], partial(render_methods_sweep, swept=W_ALIGN)),
    "methods-tiny": (
        ["methods.json", "methods_mcad.json", "methods_dcd.json", "methods_dcd-per-sample.json", "methods_comkd.json"],
        render_methods_recall,
    ),
    "methods-tiny-sweeps": (
        ["methods.json", "methods_mcad.json", "methods_dcd.json", "methods_comkd.json"],
        partial(render_methods_sweep, swept=W_ALIGN),
    ),
    "conaclip-ablation": (["methods.json"], single(render_conaclip_ablation)),
    "dcd-terms": (["dcd_terms.json"], single(render_dcd_terms)),
    "student-init": (["student_init.json"], single(render_student_init)),
    "image-trunk-latency": (["image_trunk_latency.json"], single(render_trunk_latency)),
    "image-trunk-speedups": (["image_trunk_latency.json"], single(render_trunk_speedups)),
    "val-test-agreement": (["val_test_agreement.json", "val_test_agreement_with_init.json"], render_val_test),
    "export-latency": (["export.json"], single(render_export_latency)),
    "export-parity": (["export.json"], single(render_export_parity)),
    "index": (["index.json"], single(render_index)),
    "index-200k": (["index_200k.json"], single(render_index)),
    "load": (["load.json"], single(render_load)),
    "serve-memory": (["serve_memory.json"], single(render_serve_memory)),
    "cache-cost": (["cache_cost.json"], single(render_cache_cost)),
    "scale": (["scale_1thread.json", "scale.json"], render_scale),
    "scale-projection": (["scale_1thread.json"], single(render_lines("projection"))),
    "data-loading": (["data_loading.json"], single(render_lines("table"))),
    "growth": (["growth.json"], single(render_growth)),
}
# Blocks whose benchmark takes long enough that its doc section comes before its first result:
# skipped, and said so, while their JSON does not exist; any other missing JSON is an error.
NOT_YET_MEASURED = {"growth"}


def render_block(name: str, results: Path, reports: dict[str, Path | None]) -> str | None:
    """The block's new body, or None when it needs a demo report that was not given or is in
    ``NOT_YET_MEASURED`` and its JSON does not exist yet."""
    if name not in BLOCKS:
        raise SystemExit(f"unknown generated block {name!r} (known: {', '.join(BLOCKS)})")
    files, render = BLOCKS[name]
    sources = []
    for file in files:
        if file.startswith("@"):
            path = reports.get(file[1:])
            if path is None:
                return None
            label = str(path)
        else:
            path = results / file
            label = f"benchmarks/results/{file}"
            if name in NOT_YET_MEASURED and not path.is_file():
                return None
        sources.append((label, json.loads(path.read_text(encoding="utf-8"))))
    return "\n".join(render(sources)) + "\n"


def rewrite(text: str, results: Path, reports: dict[str, Path | None]) -> tuple[str, list[str], list[str]]:
    """``text`` with every block re-rendered; the names of blocks that changed and of those skipped."""
    changed: list[str] = []
    skipped: list[str] = []

    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        body = render_block(name, results, reports)
        if body is None:
            skipped.append(name)
            return match[0]
        if body != match["body"]:
            changed.append(name)
        return f"<!-- generated: {name} -->\n{body}<!-- end generated -->"

    return BLOCK.sub(replace, text), changed, skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--check", action="store_true", help="exit 1 where a block differs from its data; write nothing"
    )
    parser.add_argument("--demo", type=Path, help="report.json of a quick demo (block demo-quick)")
    parser.add_argument("--full", type=Path, help="report.json of a full-preset demo (block demo-full)")
    parser.add_argument("--big", type=Path, help="report.json of a big-preset demo (demo-big, demo-big-frontier)")
    parser.add_argument(
        "--doc",
        type=Path,
        action="append",
        help="markdown file(s) to rewrite (default: docs/results.md, docs/scale.md)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the benchmark JSONs")
    args = parser.parse_args(argv)
    reports = {"demo": args.demo, "full": args.full, "big": args.big}
    stale = []
    for doc in args.doc or DOCS:
        text = doc.read_text(encoding="utf-8")
        label = doc.resolve().relative_to(ROOT) if doc.resolve().is_relative_to(ROOT) else doc
        new, changed, skipped = rewrite(text, args.results, reports)
        for name in skipped:
            first = BLOCKS[name][0][0]
            why = (
                f"it needs a demo report (--{first.lstrip('@')} REPORT)"
                if first.startswith("@")
                else f"{args.results / first} does not exist yet"
            )
            print(f"{label}: block {name} skipped: {why}; left as it is")
        for name in changed:
            print(f"{label}: block {name} {'differs from its data' if args.check else 'rewritten'}")
        if changed and args.check:
            stale.append(doc)
        elif changed:
            doc.write_text(new, encoding="utf-8")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
