"""The demo's human-readable output: ``report.md`` and its three plots, from ``report.json``.

Kept apart from the stages (``demo.py``) so a report can be redrawn from a finished run
without training anything: ``write_report(out, json.load(report.json), dataset)``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from clipdistill.eval.frontier import frontier_lines
from clipdistill.io import atomic_path, atomic_write_text
from clipdistill.run_summary import row_key, row_label

EXAMPLE_QUERIES = 4
TOP = 5
#: Images per call when the example figure embeds the test split: the teacher runs eagerly at its
#: full input there, and at 256 images of 224 px its activations took 3 GB (the run's peak).
EXAMPLE_BATCH = 32


def method_line(method: str) -> str:
    """A method's line in ``report.md``: its registered summary (``DistillMethod.summary``)."""
    from clipdistill.distill.methods import get_method

    return get_method(method.partition(":")[0]).summary  # a row is NAME or NAME:VARIANT


def scratch_method() -> str | None:
    """The baseline every student is compared with (``DistillMethod.baseline``)."""
    from clipdistill.distill.methods import baseline_method

    return baseline_method()


def latency_source(report: dict[str, Any]) -> tuple[str, list[str]]:
    """Which latency the report shows: ``("onnx", [])`` when the teacher and every student carry
    ``onnx_ms`` (the demo's ONNX Runtime stage, ``eval/demo_efficiency.py``), else
    ``("eager", [entries without it])``: a report.json from before that stage still renders,
    with its eager-torch ``latency_ms`` labelled as such."""
    entries = [("teacher", report["teacher"])] + [(f"{row_label(s)}-s{s['seed']}", s) for s in report["students"]]
    missing = [name for name, entry in entries if "onnx_ms" not in entry]
    return ("eager", missing) if missing else ("onnx", [])


def pair_ms(entry: dict[str, Any], source: str, batch: int = 1) -> float:
    """Milliseconds per image + caption at ``batch`` (per item: batch time / batch), the cost of
    a query plus an item; ``source`` "onnx" reads ``onnx_ms``, "eager" the eager ``latency_ms``."""
    times = entry["onnx_ms"] if source == "onnx" else entry["latency_ms"]
    return times[f"image_b{batch}"] + times[f"text_b{batch}"]


def _weights(row: dict[str, Any]) -> str:
    """The variant and the non-default method weights a student was trained with."""
    args = row.get("method_args") or {}
    variant = row.get("variant")
    if variant is None:  # reports written before variants were recorded: their weights were the val-tuned ones
        return f"; weights {', '.join(f'{k}={v}' for k, v in args.items())} (tuned on val)" if args else ""
    weights = f": {', '.join(f'{k}={v}' for k, v in args.items())}" if args else ""
    off = [key for key, value in args.items() if key.startswith("w_") and value == 0]
    switched_off = f" (switched off: {', '.join(off)})" if off else ""
    return f"; variant `{variant}`{weights}{switched_off}"


def _network_key(entry: dict[str, Any]) -> str:
    """Identifies a network by its parameter and FLOP counts: equal counts, same computation."""
    return json.dumps([entry["params"], entry.get("flops")], sort_keys=True)


def shared_latency(students: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per network: the median of every student's latency measurements for it.

    Students of every method share one network (training-only modules are dropped), so their
    speed is the same and the differences between their single measurements are timing noise;
    the median over all of them is the better estimate for each. (The demo times one student per
    network and gives the others its figures; a report.json from an older clipdistill may hold
    one measurement per student.)"""
    groups: dict[str, list[dict[str, float]]] = {}
    for student in students:
        groups.setdefault(_network_key(student), []).append(student["latency_ms"])
    return {key: {field: statistics.median(m[field] for m in ms) for field in ms[0]} for key, ms in groups.items()}


def method_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method (per method and student variant with a ladder): metrics averaged over
    seeds, size of the first seed (same network), eager latency the median over every student
    with that network (see :func:`shared_latency`); ``onnx_ms`` is the first seed's too, already
    one measurement per network (``eval/demo_efficiency.py``)."""
    latency = shared_latency(report["students"])
    rows = []
    for summary in report["summary"]:
        runs = [s for s in report["students"] if row_key(s) == row_key(summary)]
        metrics = {k: statistics.mean(r["metrics"][k] for r in runs) for k in runs[0]["metrics"]}
        rows.append(
            {
                **runs[0],
                "metrics": metrics,
                "latency_ms": latency[_network_key(runs[0])],
                "rsum_std": summary["rsum_std"],
                "n_seeds": summary["n_seeds"],
            }
        )
    return rows


def _latency_line(report: dict[str, Any], source: str, missing: list[str]) -> str:
    """How the latency columns were measured, in the words the numbers deserve."""
    if source == "onnx":
        eff = report.get("efficiency")
        if not eff:  # the figures mean little without how they were measured
            raise ValueError("report.json has onnx_ms but no 'efficiency' (threads, repeats, matmul peak)")
        return (
            "Latency: ONNX Runtime fp32 on CPU"
            + (f" ({eff['runtime']})" if "runtime" in eff else "")
            + f", {eff['threads']} thread(s); teacher and students "
            f"exported and timed in one process, interleaved, median of {eff['repeats']} repeats; "
            "milliseconds per image + caption at batch 1 (`ms b1`) and per image + caption at batch 64 "
            "(`ms b64`: batch time / 64); speed-up = teacher / student (image + caption). Students of one network "
            f"share one timing. fp32 matmul peak in the same run: {eff['matmul_peak_gflops']} GFLOP/s"
            + (f", measured {eff['measured_utc']} UTC." if "measured_utc" in eff else ".")
        )
    return (
        f"Latency: eager torch (this report.json has no ONNX Runtime timing, `onnx_ms`, for {', '.join(missing)}: "
        "a run from before it was measured), CPU, batch 1, milliseconds per image + per caption; the students "
        "share one network, so theirs is the median over all their runs."
    )


def _student_start(budget: dict[str, Any]) -> str:
    """ " at 96 px, image tower from the teacher, text tower from the teacher" (older reports: "")."""
    parts = [f"at {budget['student_image_size']} px"] if budget.get("student_image_size") else []
    names = {"teacher": "the teacher", "imagenet": "ImageNet", "random": "random init"}
    for tower in ("image", "text"):
        if budget.get(f"{tower}_init"):
            parts.append(f"{tower} tower from {names.get(budget[f'{tower}_init'], budget[f'{tower}_init'])}")
    return " " + ", ".join(parts) if parts else ""


def results_table(report: dict[str, Any]) -> str:
    """The methods × metrics table with its budget line (``report.md`` and the README use it).

    Latency and speed-up come from ``onnx_ms`` (batch 1 and 64, ONNX Runtime); a report without
    it (an older run) gets the eager-torch columns, labelled so (:func:`latency_source`)."""
    teacher = report["teacher"]
    rows = method_rows(report)
    baseline = scratch_method()
    scratch = {r.get("student"): r for r in rows if r["method"] == baseline}  # per student variant
    ladder = len({r.get("student") for r in rows}) > 1  # a student column only when there is a choice
    budget = report["budget"]
    labels = budget.get("students")
    students = (
        ", ".join(f"`{x}`" for x in labels) if labels else f"`{budget['student']}` preset{_student_start(budget)}"
    )
    source, missing = latency_source(report)
    machine = report.get("machine")
    measured = (
        f" Measured on {machine['cpu']} ({machine['cores']} cores), torch {machine['torch']}, "
        f"finished {report.get('finished_utc', '?')} UTC."
        if machine
        else ""
    )
    if source == "onnx":
        header = "| ms b1 | ms b64 | speed-up b1 | speed-up b64 |"
        n_columns = 14 + ladder
    else:
        header = "| latency ms (eager torch) | speed-up (eager torch) |"
        n_columns = 12 + ladder
    lines = [
        f"Test split: {report['n_images']} images, {report['n_texts']} captions (concepts unseen in training). "
        f"Students: {students}, {budget['epochs']} epochs, "
        f"batch {budget['batch_size']}, "
        f"lr {budget['lr']}, {budget['k_augmentations']} replayed augmentations, {budget['seeds']} seed(s), "
        "identical for every method. "
        + (
            "vs scratch: the mean test rsum difference with the scratch baseline over seeds, [its 95% interval "
            "by a paired bootstrap over the test queries]. "
            if any("vs_scratch" in row for row in rows)
            else ""
        )
        + _latency_line(report, source, missing)
        + measured,
        "",
        "| model "
        + ("| student " if ladder else "")
        + "| i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | rsum | vs scratch | params (M) "
        + header,
        "|" + "---|" * n_columns,
    ]

    def timing(entry: dict[str, Any]) -> str:
        if source == "onnx":
            from clipdistill.eval.onnx_timing import speedup

            ms = [f"{pair_ms(entry, source, batch):.2f}" for batch in (1, 64)]
            ratios = [f"{speedup(teacher['onnx_ms'], entry['onnx_ms'], batch):.1f}x" for batch in (1, 64)]
            return " | ".join(ms + ratios)
        return f"{pair_ms(entry, source):.2f} | {pair_ms(teacher, source) / pair_ms(entry, source):.1f}x"

    def row(label: str, entry: dict[str, Any], spread: str = "") -> str:
        m = entry["metrics"]
        cells = [f"{m[k]:.1f}" for k in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10")]
        base = None if entry is teacher else scratch.get(entry.get("student"))  # scratch on the same variant
        delta = "" if base is None else f"{m['rsum'] - base['metrics']['rsum']:+.1f}"
        if "vs_scratch" in entry:  # with its 95% interval (paired bootstrap over the test queries)
            low, high = entry["vs_scratch"]["ci95"]
            delta += f" [{low:+.1f}, {high:+.1f}]"
        student = (f" `{entry['student']}` |" if "student" in entry else "  |") if ladder else ""
        return (
            f"| {label} |{student} {' | '.join(cells)} | {m['rsum']:.1f}{spread} | {delta} | "
            f"{entry['params']['total'] / 1e6:.2f} | {timing(entry)} |"
        )

    lines.append(row(f"teacher `{teacher['spec']}`", teacher))
    for entry in rows:
        spread = f" ± {entry['rsum_std']:.1f}" if entry["n_seeds"] > 1 else ""
        lines.append(row(f"`{entry['method']}`", entry, spread))
    return "\n".join(lines) + "\n"


def markdown(report: dict[str, Any]) -> str:
    """``report.md``: the table, the method lines, the fusion re-ranking, the plots, how to serve."""
    rows = method_rows(report)
    per_method = {r["method"]: r for r in rows}.values()  # a method trains every student variant alike
    best = report["best_student"]
    lines = [
        f"# clipdistill demo: {report['dataset']} ({report['preset']} preset)",
        "",
        results_table(report).rstrip("\n"),
        "",
        f"Shipped: `{row_label(best)}` (seed {best['seed']}), chosen by {best['selected_by']}, "
        "so the test numbers above stay an honest estimate.",
        "",
        "## Methods",
        *[f"- `{r['method']}`: {method_line(r['method'])}{_weights(r)}" for r in per_method],
    ]
    lines += term_lines(report)
    fusion = report.get("fusion_teacher")
    if fusion and fusion.get("rerank_test"):
        rerank = fusion["rerank_test"]
        sentence = (
            f"`{fusion['spec']}` ({fusion['params'] / 1e6:.2f}M parameters on top of the dual teacher) re-ranks "
            f"the dual teacher's top-{rerank['k']} per caption: test t2i R@1 "
            f"{rerank['dual']['t2i_R@1']:.1f} -> {rerank['reranked']['t2i_R@1']:.1f} "
            f"(R@5 {rerank['dual']['t2i_R@5']:.1f} -> {rerank['reranked']['t2i_R@5']:.1f}). "
        )
        lines += ["", "## Fusion teacher", (sentence + fusion_gain_sentence(fusion)).rstrip()]
    lines += efficiency_lines(report, rows)
    lines += frontier_lines(report.get("frontier") or [])
    deploy = report["deploy"]
    parity = deploy["parity"]
    lines += [
        "",
        "## Plots",
        "![quality against cost, batch 1 and 64](pareto.png)",
        "",
        "![validation rsum per epoch](curves.png)",
        "",
        "![top-5 images for a few test captions](examples.png)",
        "",
        "## Deploy",
        f"Exported `{deploy['spec']}` to `{deploy['export']}` (ONNX fp32 + int8; test rsum torch "
        f"{parity['torch']['recall']['rsum']:.1f}, fp32 {parity['onnx_fp32']['recall']['rsum']:.1f}"
        + (f", int8 {parity['onnx_int8']['recall']['rsum']:.1f}" if "onnx_int8" in parity else "")
        + f") and indexed the test images in `{deploy['index']}`. Query it:",
        "",
        "```",
        f'clipdistill search {deploy["index"]} "a red heart" -k 5',
        "```",
        "",
        f"Whole run: {report['wall_seconds']:.0f} s (stages already finished are skipped and not counted).",
    ]
    lines += _memory_lines(report.get("memory"))
    lines += _bad_samples_lines(report.get("bad_samples"))
    return "\n".join(lines) + "\n"


def fusion_gain_sentence(fusion: dict[str, Any]) -> str:
    """The re-ranking's t2i R@1 gain on val and test with its 95% interval (paired bootstrap over
    the caption queries, eval/rerank.py), so a gain within the split's sampling noise reads as
    such; a split whose summary predates the interval gives the gain alone."""
    parts = []
    for split in ("val", "test"):
        rerank = fusion.get(f"rerank_{split}")
        if not rerank:
            continue
        interval = rerank.get("gain_R@1_ci95")
        ci = f" [{interval[0]:+.1f}, {interval[1]:+.1f}]" if interval else ""
        parts.append(f"{split} {rerank['gain_R@1']:+.1f}{ci}")
    return f"R@1 gain (95% interval over the caption queries): {', '.join(parts)}." if parts else ""


def term_lines(report: dict[str, Any]) -> list[str]:
    """ "Which terms did anything": each distillation term's gradient on the student's outputs
    against the task term's (train/term_gradients.py), per method and seed; a term that stayed
    under the threshold for the whole run is flagged."""
    from clipdistill.train.term_gradients import INERT_RATIO

    rows = []
    for student in report["students"]:
        for term, entry in sorted(student.get("terms", {}).items()):
            if "grad_ratio" not in entry:
                continue
            flag = f"under {INERT_RATIO:.0%} of the task gradient all run" if entry["inert"] else ""
            rows.append(
                f"| `{row_label(student)}` | {student['seed']} | `{term}` | {entry['grad_ratio']:.3f} "
                f"| {entry['cos_task']:+.2f} | {flag} |"
            )
    if not rows:
        return []
    return [
        "",
        "## Which loss terms did anything",
        "Each term's gradient on the student's outputs (image and caption embeddings) at the last step of every "
        "epoch: its norm over the task term's (`grad_ratio`, mean over epochs) and its cosine with the task "
        "gradient (`cos_task`; near 1: it repeats the task term).",
        "",
        "| method | seed | term | grad_ratio | cos_task | flag |",
        "|---|---:|---|---:|---:|---|",
        *rows,
    ]


def efficiency_lines(report: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """``report.md``'s efficiency section: per tower and batch, the ONNX Runtime time, the work
    (FLOPs per item) and the share of the matmul peak reached, so a speed-up can be read against
    the work saved; empty for a report without ``onnx_ms``."""
    if latency_source(report)[0] != "onnx":
        return []
    peak = report["efficiency"]["matmul_peak_gflops"]
    lines = [
        "",
        "## Efficiency",
        "ONNX Runtime fp32, milliseconds per item (batch time / batch size); MFLOPs per item from torch's "
        f"flop counter; peak share = achieved GFLOP/s / this run's fp32 matmul peak ({peak} GFLOP/s).",
        "",
        "| model | MFLOPs image | MFLOPs caption | image ms b1 | caption ms b1 | image ms b64 | caption ms b64 "
        "| peak share image b64 | peak share caption b64 |",
        "|" + "---|" * 9,
    ]
    for label, entry in [(f"teacher `{report['teacher']['spec']}`", report["teacher"])] + [
        (f"`{row_label(row)}`", row) for row in rows
    ]:
        ms, flops, share = entry["onnx_ms"], entry["flops_per_item"], entry["peak_share"]
        cells = [f"{flops['image'] / 1e6:.1f}", f"{flops['text'] / 1e6:.1f}"]
        cells += [f"{ms[key]:.3f}" for key in ("image_b1", "text_b1", "image_b64", "text_b64")]
        cells += [f"{100 * share[key]:.1f}%" for key in ("image_b64", "text_b64")]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return lines


def memory_sentence(memory: dict[str, Any]) -> str:
    """Peak resident memory of the run and of each stage (report.json's ``memory``, ``memory.py``)."""
    stages = ", ".join(f"{name} {mb / 1024:.1f}" for name, mb in memory["stages"].items())
    how = "" if memory["per_stage"] == "reset" else " (running peak at each stage's end: no per-stage reset here)"
    return f"Peak resident memory: {memory['peak_rss_mb'] / 1024:.1f} GiB; per stage, GiB{how}: {stages}."


def _memory_lines(memory: dict[str, Any] | None) -> list[str]:
    return ["", memory_sentence(memory)] if memory else []


def _bad_samples_lines(bad: dict[str, Any] | None) -> list[str]:
    """The data that was left out (``--on-bad-sample skip``): counts and the first offenders."""
    if not bad:
        return []
    lines = [
        "",
        "## Skipped samples",
        f"`--on-bad-sample skip` left out {bad['skipped_images']} image(s) and {bad['skipped_captions']} "
        f"caption(s); every result above is on the rest. First {len(bad['first'])}:",
        "",
    ]
    return lines + [f"- `{message}`" for message in bad["first"]]


def _save(figure: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:  # a failed write must not leak the figure (pyplot keeps every open one alive)
        plt.close(figure)


def _method_colours(report: dict[str, Any]) -> dict[str, Any]:
    """One colour per method, in the order the report lists them (seeds share their method's)."""
    import matplotlib

    palette = matplotlib.colormaps["tab10"].colors
    methods = list(dict.fromkeys(student["method"] for student in report["students"]))
    return {method: palette[index % len(palette)] for index, method in enumerate(methods)}


def curves_by_method(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per method (``clip [lite0@64]`` per student variant of a ladder): each seed's (epochs, val
    rsum) from its ``results.jsonl``, and the mean over seeds at every epoch all seeds reached (a
    run stopped early shortens the mean, not skews it); ``key``: its (method, student label)."""
    from clipdistill.io import read_jsonl

    runs: dict[str, list[tuple[list[int], list[float]]]] = {}
    keys = {row_label(student): row_key(student) for student in report["students"]}
    for student in report["students"]:
        results = read_jsonl(Path(student["run_dir"]) / "results.jsonl")
        epochs = [int(r["epoch"]) for r in results]
        runs.setdefault(row_label(student), []).append((epochs, [float(r["val"]["rsum"]) for r in results]))
    curves = {}
    for name, seeds in runs.items():
        shared = sorted(set.intersection(*(set(epochs) for epochs, _ in seeds)))
        by_epoch = [dict(zip(epochs, values, strict=True)) for epochs, values in seeds]
        mean = [statistics.fmean(values[epoch] for values in by_epoch) for epoch in shared]
        curves[name] = {"key": keys[name], "runs": seeds, "epochs": shared, "mean": mean}
    return curves


def plot_pareto(report: dict[str, Any], path: Path) -> None:
    """Test rsum against per-pair cost at batch 1 and at batch 64, one panel each (``onnx_ms``;
    eager torch for an older report, said on the axis; batch 1 alone where a report has no
    batch-64 figures): every student seed as a dot in its
    method's colour, the method named once at its seeds' mean, the teacher as a star and, from
    report.json's ``frontier``, the teacher at smaller inputs as a curve, students a cheaper
    alternative beats circled in red, and the frontier as a step line."""
    import matplotlib.pyplot as plt

    colours = _method_colours(report)
    source, _ = latency_source(report)
    frontier = report.get("frontier") or []
    rows: dict[str, list[dict[str, Any]]] = {}  # a method on each student of a ladder is its own row
    for student in report["students"]:
        label = f"{student['method']} [{student['student']}]" if student.get("student") else student["method"]
        rows.setdefault(label, []).append(student)
    entries = [report["teacher"], *report["students"]]
    has_b64 = all("image_b64" in (e["onnx_ms"] if source == "onnx" else e["latency_ms"]) for e in entries)
    batches = (1, 64) if has_b64 else (1,)  # an older report timed batch 1 only
    figure, panels = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.8), sharey=True, squeeze=False)
    for axes, batch in zip(panels[0], batches, strict=True):
        for label, seeds in rows.items():
            colour = colours[seeds[0]["method"]]
            xs = [pair_ms(student, source, batch) for student in seeds]
            ys = [student["metrics"]["rsum"] for student in seeds]
            axes.scatter(xs, ys, s=30, color=colour, alpha=0.8)
            mean = (statistics.fmean(xs), statistics.fmean(ys))
            axes.annotate(label, mean, textcoords="offset points", xytext=(5, 3), fontsize=8, color=colour)
        teacher = report["teacher"]
        at = (pair_ms(teacher, source, batch), teacher["metrics"]["rsum"])
        axes.scatter(*at, marker="*", s=220, color="black", zorder=3)
        axes.annotate("teacher", at, xytext=(6, -10), textcoords="offset points", fontsize=9)
        _frontier_marks(axes, frontier, f"b{batch}")
        axes.set_xscale("log")
        runtime = "ONNX Runtime fp32" if source == "onnx" else "eager torch"
        axes.set_xlabel(f"CPU ms per image + caption, {runtime}, batch {batch} (log)")
        axes.set_title(f"batch {batch}")
        axes.grid(alpha=0.3)
    panels[0][0].set_ylabel("test rsum")
    figure.suptitle(f"{report['dataset']}: quality against cost")
    _save(figure, path)


def _frontier_marks(axes: Any, frontier: list[dict[str, Any]], key: str) -> None:
    """The frontier's extra layers on one panel: the teacher-at-smaller-input curve (through the
    teacher at its own size), beaten students circled, the frontier as a step line."""
    resized = sorted(
        (p for p in frontier if p["kind"] in ("teacher", "teacher_smaller_input")), key=lambda p: p["onnx_ms"][key]
    )
    if len(resized) > 1:
        xs, ys = [p["onnx_ms"][key] for p in resized], [p["rsum"] for p in resized]
        axes.plot(xs, ys, color="grey", linestyle="--", marker="s", markersize=4, label="teacher at smaller inputs")
        for point in resized:
            if point["kind"] == "teacher_smaller_input":
                axes.annotate(
                    f"{point['image_size']} px",
                    (point["onnx_ms"][key], point["rsum"]),
                    xytext=(4, -10),
                    textcoords="offset points",
                    fontsize=7,
                    color="grey",
                )
    beaten = [p for p in frontier if p["kind"] == "student" and (p.get("beaten_by") or {}).get(key)]
    if beaten:
        axes.scatter(
            [p["onnx_ms"][key] for p in beaten],
            [p["rsum"] for p in beaten],
            s=160,
            facecolors="none",
            edgecolors="red",
            linewidths=1.2,
            label="a cheaper alternative scores more",
        )
    best = sorted((p for p in frontier if p["on_frontier"][key]), key=lambda p: p["onnx_ms"][key])
    if best:
        axes.step(
            [p["onnx_ms"][key] for p in best],
            [p["rsum"] for p in best],
            where="post",
            color="black",
            linewidth=0.8,
            alpha=0.6,
            label="frontier",
        )
    if frontier:
        axes.legend(fontsize=7, loc="lower right")


def plot_curves(report: dict[str, Any], path: Path) -> None:
    """Validation rsum after each epoch: one colour per method (one line style per student
    variant of a ladder), its mean over seeds as the thick line and each seed as a thin one (21
    runs as 21 colours could not be told apart)."""
    import matplotlib.pyplot as plt

    colours = _method_colours(report)
    variants = list(dict.fromkeys(student.get("student") for student in report["students"]))
    figure, axes = plt.subplots(figsize=(6.5, 4.5))
    for name, curve in curves_by_method(report).items():
        method, student = curve["key"]
        colour, style = colours[method], ("-", "--", ":", "-.")[variants.index(student) % 4]
        for epochs, values in curve["runs"]:
            axes.plot(epochs, values, color=colour, linestyle=style, linewidth=0.8, alpha=0.35)
        seeds = len(curve["runs"])
        label = name + (f" (mean of {seeds})" if seeds > 1 else "")
        mean = {"color": colour, "linestyle": style, "linewidth": 2.2, "marker": "o", "markersize": 4, "label": label}
        axes.plot(curve["epochs"], curve["mean"], **mean)
    axes.set_xlabel("epoch")
    axes.set_ylabel("val rsum")
    axes.set_title("training curves (validation split; thin lines: single seeds)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: curves fill the axes
    _save(figure, path)


def plot_examples(report: dict[str, Any], dataset: Any, path: Path) -> None:
    """A few test captions with the top-5 images of the teacher, the scratch student and the
    best distilled student; a correct image is framed in green."""
    import matplotlib.pyplot as plt
    import torch
    from PIL import Image

    from clipdistill.data.images import load_image_tensor
    from clipdistill.eval.embed import embed_images, embed_texts
    from clipdistill.models.teachers import load_model

    test = dataset.split("test")
    texts, owners = test.texts(), test.text_to_image()
    step = max(1, len(texts) // EXAMPLE_QUERIES)
    queries = list(range(0, step * EXAMPLE_QUERIES, step))[:EXAMPLE_QUERIES]
    models = [("teacher", report["teacher"]["spec"])]
    baseline = scratch_method()
    distilled = [s for s in report["students"] if s["method"] != baseline]
    best = max(distilled, key=lambda s: s["val_rsum"]) if distilled else report["students"][0]
    # scratch on the best distilled student's variant: the same network without a teacher
    scratch = [s for s in report["students"] if row_key(s) == (baseline, best.get("student"))]
    if scratch:
        models.append((f"scratch ({row_label(scratch[0])})", scratch[0]["spec"]))
    if distilled:
        models.append((f"best distilled ({row_label(best)})", best["spec"]))
    pixels = load_image_tensor(test.image_paths(), report["budget"]["image_size"])
    top: dict[str, torch.Tensor] = {}
    for label, spec in models:
        model = load_model(spec).eval()
        with torch.no_grad():
            images = embed_images(model, pixels, batch_size=EXAMPLE_BATCH)
            scores = embed_texts(model, [texts[q] for q in queries]) @ images.t()
        top[label] = scores.topk(TOP, dim=1).indices
    paths = test.image_paths()
    figure, grid = plt.subplots(len(queries) * len(models), TOP, figsize=(TOP * 1.3, len(queries) * len(models) * 1.3))
    for qi, query in enumerate(queries):
        for mi, (label, _) in enumerate(models):
            row = qi * len(models) + mi
            for col in range(TOP):
                axes = grid[row][col]
                image_index = int(top[label][qi, col])
                axes.imshow(Image.open(paths[image_index]).convert("RGBA"))
                axes.set_xticks([])
                axes.set_yticks([])
                hit = image_index == owners[query]
                for spine in axes.spines.values():
                    spine.set_edgecolor("green" if hit else "lightgrey")
                    spine.set_linewidth(3 if hit else 1)
            grid[row][0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
        grid[qi * len(models)][0].set_title(f"“{texts[query]}”", fontsize=9, loc="left")
    _save(figure, path)


def write_plots(out: Path, report: dict[str, Any], dataset: Any) -> None:
    """Write the three plots beside ``report.json`` (they read neither its ``memory`` nor its
    times, so a run can measure them as a stage of its own before writing those)."""
    import matplotlib

    matplotlib.use("Agg")
    plot_pareto(report, out / "pareto.png")
    plot_curves(report, out / "curves.png")
    plot_examples(report, dataset, out / "examples.png")


def write_report(out: Path, report: dict[str, Any], dataset: Any) -> None:
    """Write ``report.md`` and the three plots beside ``report.json``."""
    write_plots(out, report, dataset)
    atomic_write_text(out / "report.md", markdown(report))


def main(argv: list[str] | None = None) -> None:
    """``python -m clipdistill.report REPORT_JSON``: print the results table (for the README)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("report", type=Path, help="a demo run's report.json")
    args = parser.parse_args(argv)
    print(results_table(json.loads(args.report.read_text(encoding="utf-8"))), end="")


if __name__ == "__main__":
    main()
