"""What a teacher costs during training: student alone vs cached teacher vs online teacher.

Trains the tiny student for the same number of steps three ways in one process and reports
seconds per epoch, split into data time (batch assembly from the in-memory image tensor)
and compute time, next to what decoding the PNGs every epoch would cost. Target: training
from the cache costs at most 1.3x training the student alone.

    .venv/bin/python benchmarks/cache_cost.py --data data/emoji --teacher run:runs/teacher
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import time

import torch

from clipdistill.config import TrainConfig, from_dict
from clipdistill.data.images import load_image_tensor
from clipdistill.data.loading import load_dataset
from clipdistill.distill.cache import build_cache
from clipdistill.io import atomic_write_json
from clipdistill.train.trainer import Trainer, epoch_plan


def time_epochs(config: TrainConfig, epochs: int) -> dict[str, float]:
    """Mean data and compute seconds per epoch over ``epochs`` epochs (after one warm-up step)."""
    trainer = Trainer(config, progress=False)
    plan = epoch_plan(trainer.caption_counts, config.augment.k, config.seed, 0)
    trainer.train_step(*trainer._batch(plan, 0))  # warm-up: allocator, lazy inits
    data = compute = 0.0
    for epoch in range(epochs):
        plan = epoch_plan(trainer.caption_counts, config.augment.k, config.seed, epoch)
        for step in range(trainer.steps_per_epoch):
            started = time.perf_counter()
            batch, tokens = trainer._batch(plan, step)
            assembled = time.perf_counter()
            trainer.train_step(batch, tokens)
            data += assembled - started
            compute += time.perf_counter() - assembled
    return {
        "data_s": data / epochs,
        "compute_s": compute / epochs,
        "epoch_s": (data + compute) / epochs,
        "steps_per_epoch": trainer.steps_per_epoch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/emoji")
    parser.add_argument("--teacher", default="run:runs/teacher")
    parser.add_argument("--cache", default="runs/bench/cache")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--k-aug", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/cache_cost.json")
    args = parser.parse_args()

    dataset = load_dataset(args.data)
    started = time.perf_counter()
    cache = build_cache(args.teacher, dataset, args.cache, k_augmentations=args.k_aug, image_size=64, progress=False)
    cache_seconds = time.perf_counter() - started
    started = time.perf_counter()
    load_image_tensor(dataset.split("train").image_paths(), 64)
    decode_seconds = time.perf_counter() - started

    base = {
        "out_dir": "runs/bench",
        "data": {"path": args.data, "image_size": 64},
        "augment": {"k": args.k_aug},
        "optim": {"epochs": args.epochs, "batch_size": args.batch_size},
    }
    setups = {
        "student alone (clip)": {"name": "cost-alone", "method": "clip"},
        "cached teacher (openclip)": {
            "name": "cost-cached",
            "method": "openclip",
            "teacher": {"spec": args.teacher, "cache": str(cache)},
        },
        "online teacher (openclip)": {"name": "cost-online", "method": "openclip", "teacher": {"spec": args.teacher}},
    }
    rows = {}
    for label, extra in setups.items():
        rows[label] = time_epochs(from_dict(TrainConfig, {**base, **extra}), args.epochs)
    alone = rows["student alone (clip)"]["epoch_s"]
    print(
        f"\nteacher cache build: {cache_seconds:.1f} s ({args.k_aug} augmentations/image); "
        f"decoding the train PNGs once: {decode_seconds:.2f} s"
    )
    print(f"{'setup':28s} {'s/epoch':>8s} {'data s':>7s} {'compute s':>9s} {'x alone':>8s}")
    for label, row in rows.items():
        row["ratio_vs_alone"] = row["epoch_s"] / alone
        print(
            f"{label:28s} {row['epoch_s']:8.1f} {row['data_s']:7.2f} {row['compute_s']:9.1f} "
            f"{row['ratio_vs_alone']:8.2f}"
        )
    result = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "teacher": args.teacher,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "k_aug": args.k_aug,
        "cache_build_s": cache_seconds,
        "decode_train_pngs_s": decode_seconds,
        "rows": rows,
        "target": "cached <= 1.3x alone",
        "target_met": rows["cached teacher (openclip)"]["ratio_vs_alone"] <= 1.3,
    }
    atomic_write_json(args.out, result)
    print(json.dumps({"target_met": result["target_met"]}))


if __name__ == "__main__":
    main()
