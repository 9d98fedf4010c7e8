"""The demo's efficiency stage: teacher and students timed together in ONNX Runtime, memoised.

``onnx_efficiency`` (``eval/onnx_timing.py``) measures what the report's speed-up needs, but
only when every model is in the same call: the models are timed interleaved, so a ratio
between two models is only trustworthy when both were measured in one run. This stage therefore
times the teacher and **one representative of every distinct student network** in a single
call and hands each student its network's figures.

Students are grouped by the network they run, not by method or seed: every method trains the
same architecture (training-only modules are dropped from the exported student), so timing
each seed of each method would only time the same graph again. A student's network is its
open_clip ``model_cfg`` plus the input size in its ``preprocess_cfg``: that pair is exactly
what ``open_clip.create_model("local-dir:...")`` builds the graph from and what the timed input
is shaped by, so two students with equal keys run the same computation on the same input. It
is preferred to the report's older key (parameter and FLOP counts), which is known only after
evaluation and can in principle be equal for different graphs (a dense vs. a depthwise layout
of the same size). A model that is not an open_clip folder (the LiT teacher, a zoo or hub
name) is keyed by its spec and the fingerprint of its weight and config files, so a retrained
teacher under the same spec is timed again.

The result is memoised in ``OUT/efficiency.json`` together with the request it answers (the
networks' keys, repeats, threads, batch sizes): a rerun of the demo with the same networks
skips the stage, and adding a student of another architecture (or retraining the teacher)
re-times everything, since the figures of one run must not be mixed with another's.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from clipdistill.hashing import canonical_hash
from clipdistill.io import atomic_write_json

EFFICIENCY_FILE = "efficiency.json"
BATCH_SIZES = (1, 64)
TEACHER = "teacher"


def network_key(spec: str) -> dict[str, Any]:
    """What identifies the network ``spec`` runs (module docstring): an open_clip folder's
    ``model_cfg`` and input size, else the spec and its weights' fingerprint."""
    from clipdistill.models.fingerprint import teacher_fingerprint
    from clipdistill.models.run_dir import resolve_run_dir
    from clipdistill.models.spec import parse_spec
    from clipdistill.models.students import CONFIG_FILE

    parsed = parse_spec(spec)
    directory: Path | None = None
    if parsed.schema == "local-dir":
        directory = Path(parsed.name)
    elif parsed.schema == "run":
        kind, found = resolve_run_dir(parsed.name)
        directory = found if kind == "openclip" else None
    if directory is not None and (directory / CONFIG_FILE).is_file():
        raw = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
        if "model_cfg" not in raw:
            raise ValueError(f"{directory / CONFIG_FILE}: no 'model_cfg' (not a clipdistill/open_clip student folder)")
        return {"open_clip": raw["model_cfg"], "image_size": (raw.get("preprocess_cfg") or {}).get("size")}
    return {"spec": str(parsed), "fingerprint": teacher_fingerprint(spec)}


def group_networks(specs: Sequence[str]) -> dict[str, list[str]]:
    """Student specs grouped by network: ``{network name: [specs]}``, in order of first
    appearance; the name is a short hash of :func:`network_key`, the first spec the one timed."""
    groups: dict[str, list[str]] = {}
    for spec in specs:
        groups.setdefault(f"student-{canonical_hash(network_key(spec))[:12]}", []).append(spec)
    return groups


def _request(
    teacher_spec: str, groups: Mapping[str, list[str]], repeats: int, threads: int, teacher_sizes: Sequence[int]
) -> dict[str, Any]:
    """Everything the memoised figures depend on; a different request means a fresh measurement."""
    return {
        "teacher": network_key(teacher_spec),
        "teacher_sizes": list(teacher_sizes),
        "students": sorted(groups),  # names are hashes of the networks' keys
        "repeats": repeats,
        "threads": threads,
        "batch_sizes": list(BATCH_SIZES),
    }


def _memo(path: Path, request: dict[str, Any], say: Callable[[str], None]) -> dict[str, Any] | None:
    """The stored measurement when it answers ``request``; ``None`` (and why) otherwise."""
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        say(f"{path} is unreadable ({error}); measuring again")
        return None
    if stored.get("request") != request:
        say(f"{path} was measured for other networks or settings; measuring again")
        return None
    return stored


def measure_networks(
    out: str | Path,
    teacher_spec: str,
    student_specs: Sequence[str],
    *,
    repeats: int = 30,
    threads: int | None = None,
    stage: Callable[[str, bool], bool] | None = None,
    say: Callable[[str], None] = print,
    teacher_sizes: Sequence[int] = (),
) -> tuple[dict[str, Any], dict[str, str]]:
    """The stage itself: ``(measurement, {student spec: network name})``.

    The measurement is ``onnx_efficiency``'s report (models ``teacher``, ``teacher@SIZE`` for each
    of ``teacher_sizes`` and one per student network) plus ``request``, ``timed_specs`` and
    ``measured_utc``, read from ``OUT/efficiency.json`` when it answers the same request, else
    measured and written there. A ``teacher@SIZE`` differs from the teacher only in its image
    input, so only its image tower is timed and its text figures are the teacher's.
    ``stage(name, done)`` announces the stage (the demo's ``_stage``)."""
    from clipdistill.eval import onnx_timing

    path = Path(out) / EFFICIENCY_FILE
    groups = group_networks(student_specs)
    membership = {spec: name for name, specs in groups.items() for spec in specs}
    threads = len(os.sched_getaffinity(0)) if threads is None else threads
    request = _request(teacher_spec, groups, repeats, threads, teacher_sizes)
    stored = _memo(path, request, say)
    sizes = f" at {1 + len(teacher_sizes)} input sizes" if teacher_sizes else ""
    label = f"efficiency (ONNX Runtime: teacher{sizes} + {len(groups)} student network(s), {repeats} repeats)"
    if stage is not None:
        stage(label, stored is not None)
    if stored is not None:
        return stored, membership

    import onnxruntime

    from clipdistill.models.teachers import load_model

    timed = {TEACHER: teacher_spec, **{name: specs[0] for name, specs in groups.items()}}
    models = {name: load_model(spec) for name, spec in timed.items()}
    # Shallow copies share the loaded teacher's weights; each reads its own input size.
    resized = {f"{TEACHER}@{size}": copy.copy(models[TEACHER]).at_image_size(size) for size in teacher_sizes}
    result = onnx_timing.onnx_efficiency(
        {**models, **resized},
        batch_sizes=BATCH_SIZES,
        repeats=repeats,
        threads=threads,
        towers={name: ("image",) for name in resized},
    )
    teacher_row = result["models"][TEACHER]
    for name in resized:  # the same text tower as the teacher's: its figures are the teacher's
        row = result["models"][name]
        for table in ("onnx_ms", "gflops_per_s", "peak_share"):
            row[table].update({key: value for key, value in teacher_row[table].items() if key.startswith("text_")})
        row["flops"]["text"] = teacher_row["flops"]["text"]
    result["request"] = request
    result["timed_specs"] = timed
    result["measured_utc"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    result["runtime"] = f"onnxruntime {onnxruntime.__version__}, CPUExecutionProvider, fp32"
    atomic_write_json(path, result)
    return result, membership


def _entry_figures(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "onnx_ms": dict(row["onnx_ms"]),
        "flops_per_item": dict(row["flops"]),
        "peak_share": dict(row["peak_share"]),
    }


def add_onnx_efficiency(
    out: str | Path,
    report: dict[str, Any],
    *,
    repeats: int = 30,
    threads: int | None = None,
    stage: Callable[[str, bool], bool] | None = None,
    say: Callable[[str], None] = print,
) -> None:
    """Run (or reuse) the stage for ``report``'s teacher (and its ``smaller_inputs``) and
    students and write its figures into the report: ``onnx_ms``, ``flops_per_item`` and
    ``peak_share`` under ``teacher``, each of its smaller inputs and every student (with the
    ``network`` it runs), ``efficiency`` (matmul peak, threads, repeats, when) at the top level.
    The eager ``latency_ms`` entries stay as they are (other readers use them)."""
    students = report["students"]
    result, membership = measure_networks(
        out,
        report["teacher"]["spec"],
        [student["spec"] for student in students],
        repeats=repeats,
        threads=threads,
        stage=stage,
        say=say,
        teacher_sizes=[smaller["image_size"] for smaller in report["teacher"].get("smaller_inputs", [])],
    )
    report["teacher"].update(_entry_figures(result["models"][TEACHER]))
    for smaller in report["teacher"].get("smaller_inputs", []):
        smaller.update(_entry_figures(result["models"][f"{TEACHER}@{smaller['image_size']}"]))
    for student in students:
        student.update(_entry_figures(result["models"][membership[student["spec"]]]))
        student["network"] = membership[student["spec"]]
    report["efficiency"] = {
        "matmul_peak_gflops": result["matmul_peak_gflops"],
        "threads": result["threads"],
        "repeats": result["repeats"],
        "measured_utc": result["measured_utc"],
        "runtime": result["runtime"],
    }
