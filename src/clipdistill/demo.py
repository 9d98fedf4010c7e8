"""The main job, stage by stage, each stage skipped when its finished output exists.

So far: build the emoji data (or read the given dataset), train the LiT teacher, evaluate
it on the unseen-concept test split. Distillation, export and the report join as their
issues land.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipdistill.io import atomic_write_json

PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"teacher_max_seconds": 360.0},
    "full": {"teacher_max_seconds": None},  # the full budget of TeacherTrainConfig
}


def run_demo(
    out: str | Path, *, data: str | Path | None = None, images: str | Path | None = None, preset: str = "quick"
) -> dict[str, Any]:
    """Run the stages; returns the (partial) report, also written to ``out/report.json``."""
    import json

    from clipdistill.data.dataset import DatasetError
    from clipdistill.data.loading import load_dataset
    from clipdistill.eval.evaluate import evaluate_loaded
    from clipdistill.models.lit import MODEL_FILE
    from clipdistill.models.teachers import load_model
    from clipdistill.train.lit import TeacherTrainConfig, train_lit_teacher

    if preset not in PRESETS:
        raise DatasetError(f"unknown demo preset {preset!r}; valid: {', '.join(PRESETS)}")
    settings = PRESETS[preset]
    out = Path(out)
    if data is None:
        from clipdistill.data.emoji import build_emoji_dataset

        dataset = build_emoji_dataset(out / "data")  # skips rendering when already complete
    else:
        dataset = load_dataset(data, images)

    teacher_dir = out / "teacher"
    if not (teacher_dir / MODEL_FILE).is_file():
        train_lit_teacher(
            dataset,
            teacher_dir,
            TeacherTrainConfig(max_seconds=settings["teacher_max_seconds"]),
        )
    summary = json.loads((teacher_dir / "train_summary.json").read_text(encoding="utf-8"))

    test = dataset.split("test")
    teacher = load_model(f"run:{teacher_dir}")
    teacher_eval = evaluate_loaded(teacher, test)
    report = {
        "dataset": dataset.name,
        "split": "test",
        "n_images": len(test),
        "n_texts": test.n_texts(),
        "preset": preset,
        "teacher": {
            "spec": f"run:{teacher_dir}",
            "train_seconds": summary["train_seconds"],
            "metrics": {k: v for k, v in teacher_eval.items() if "_R@" in k or k == "rsum"},
            **{k: teacher_eval[k] for k in ("params", "flops", "latency_ms", "peak_mem_mb") if k in teacher_eval},
        },
    }
    atomic_write_json(out / "report.json", report)
    return report
