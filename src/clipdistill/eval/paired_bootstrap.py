"""Paired bootstrap intervals: a method against the scratch baseline (the rsum difference), and
any per-query difference of two rankings of one query set (the fusion teacher's re-ranking gain).

Seeds say how much training noise moves a row; the test set's own sampling moves every row
too. A paired bootstrap over the test queries covers the second: resample the caption queries
and the image queries with replacement, score every model on the same resample, and take the
difference of the method's mean rsum over its seeds and the baseline's; the 2.5th and 97.5th
percentiles of that difference over the resamples are the interval. Paired because both sides
see the same resampled queries, so a query that is hard for every model does not widen it.
scipy's ``bootstrap`` resamples one set of observations; an rsum needs two query sets (images
and captions) resampled together across several models, hence this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

KS = (1, 5, 10)


def _hits(ranks: Sequence[int]) -> np.ndarray:
    """(queries,) of each query's contribution to the rsum's terms in this direction: the count
    of cut-offs it is found within, in percent units (100 / queries per hit)."""
    values = np.asarray(ranks)
    return sum((values < k).astype(np.float64) for k in KS) * (100.0 / len(values))


def rsum_of(ranks: dict[str, Sequence[int]]) -> float:
    """The rsum of one model's ``{"i2t": ranks per image, "t2i": ranks per caption}``."""
    return float(_hits(ranks["i2t"]).sum() + _hits(ranks["t2i"]).sum())


def rsum_difference(
    method: Sequence[dict[str, Sequence[int]]],
    baseline: Sequence[dict[str, Sequence[int]]],
    *,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean rsum of ``method``'s seeds minus the mean of ``baseline``'s, and its 95% interval by
    a paired bootstrap over the test queries (every model ranked on the same queries)."""
    if not method or not baseline:
        raise ValueError("rsum_difference needs at least one run on each side")
    n_images, n_texts = len(method[0]["i2t"]), len(method[0]["t2i"])
    for ranks in [*method, *baseline]:
        if (len(ranks["i2t"]), len(ranks["t2i"])) != (n_images, n_texts):
            raise ValueError("every run must be ranked on the same test queries")

    def side(runs: Sequence[dict[str, Sequence[int]]], direction: str) -> np.ndarray:
        return np.mean([_hits(r[direction]) for r in runs], axis=0)  # the seeds' mean, per query

    image_diff = side(method, "i2t") - side(baseline, "i2t")
    text_diff = side(method, "t2i") - side(baseline, "t2i")
    generator = np.random.default_rng(seed)
    totals = np.empty(resamples)
    for b in range(resamples):
        images = generator.integers(0, n_images, n_images)
        texts = generator.integers(0, n_texts, n_texts)
        totals[b] = image_diff[images].sum() + text_diff[texts].sum()
    low, high = np.percentile(totals, [2.5, 97.5])
    return {
        "mean": round(float(image_diff.sum() + text_diff.sum()), 3),
        "ci95": [round(float(low), 3), round(float(high), 3)],
        "seeds": [len(method), len(baseline)],
        "resamples": resamples,
    }


def mean_difference(
    method: Sequence[float] | np.ndarray,
    baseline: Sequence[float] | np.ndarray,
    *,
    resamples: int = 2000,
    seed: int = 0,
    block: int = 1 << 22,
) -> dict[str, Any]:
    """Mean over the queries of ``method − baseline`` (one value per query on each side, e.g.
    100 for a hit at R@1 else 0) and its 95% interval by a paired bootstrap over the queries: both
    sides read on the same resampled queries. ``block`` bounds the resample indices held at once."""
    ours, theirs = np.asarray(method, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if ours.ndim != 1 or ours.shape != theirs.shape or len(ours) == 0:
        raise ValueError(f"mean_difference needs two equal-length 1-D series, got shapes {ours.shape}, {theirs.shape}")
    difference = ours - theirs
    n = len(difference)
    generator = np.random.default_rng(seed)
    means = np.empty(resamples)
    rows = max(1, block // n)
    for start in range(0, resamples, rows):
        count = min(rows, resamples - start)
        means[start : start + count] = difference[generator.integers(0, n, (count, n))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {
        "mean": round(float(difference.mean()), 3),
        "ci95": [round(float(low), 3), round(float(high), 3)],
        "resamples": resamples,
    }
