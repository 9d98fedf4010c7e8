"""The paired bootstrap of a method against scratch (eval/paired_bootstrap.py): its mean is the
difference of the seeds' mean rsums, and its interval is paired over the same test queries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipdistill.eval.paired_bootstrap import rsum_difference, rsum_of
from clipdistill.eval.retrieval import recall_at_k, recall_from_ranks, retrieval_ranks


def _ranks(seed: int, n_images: int = 60, n_texts: int = 120, scale: int = 30) -> dict[str, list[int]]:
    generator = np.random.default_rng(seed)
    return {
        "i2t": generator.integers(0, scale, n_images).tolist(),
        "t2i": generator.integers(0, scale, n_texts).tolist(),
    }


def test_rsum_of_ranks_is_recall_at_k_s_rsum() -> None:
    torch.manual_seed(0)
    images, texts = torch.randn(20, 8), torch.randn(40, 8)
    owner = [j // 2 for j in range(40)]
    i2t, t2i = retrieval_ranks(images, texts, owner)
    expected = recall_at_k(images, texts, owner)
    assert recall_from_ranks(i2t, t2i) == expected
    assert rsum_of({"i2t": i2t.tolist(), "t2i": t2i.tolist()}) == pytest.approx(expected["rsum"])


def test_the_mean_is_the_difference_of_the_seeds_mean_rsums() -> None:
    method, scratch = [_ranks(1), _ranks(2)], [_ranks(3), _ranks(4), _ranks(5)]
    result = rsum_difference(method, scratch, resamples=200)
    expected = np.mean([rsum_of(r) for r in method]) - np.mean([rsum_of(r) for r in scratch])
    assert result["mean"] == pytest.approx(expected, abs=1e-3)
    low, high = result["ci95"]
    assert low < result["mean"] < high and result["seeds"] == [2, 3]


def test_a_model_against_itself_has_no_spread_and_a_better_one_excludes_zero() -> None:
    same = _ranks(7)
    assert rsum_difference([same], [same], resamples=100)["ci95"] == [0.0, 0.0]  # paired: nothing varies
    better = {direction: [max(0, r - 10) for r in ranks] for direction, ranks in same.items()}
    result = rsum_difference([better], [same], resamples=300)
    assert result["mean"] > 0 and result["ci95"][0] > 0


def test_runs_on_other_queries_are_refused() -> None:
    with pytest.raises(ValueError, match="same test queries"):
        rsum_difference([_ranks(1)], [_ranks(2, n_texts=100)])


def test_a_per_query_difference_gets_a_seeded_interval_around_its_mean() -> None:
    """200 queries, 20 of which the method finds and the baseline misses (100 vs 0 points): the
    mean gain is 10 points, and the interval is near the normal one, 10 ± 1.96·30/√200."""
    from clipdistill.eval.paired_bootstrap import mean_difference

    baseline = np.zeros(200)
    method = baseline.copy()
    method[::10] = 100.0
    result = mean_difference(method, baseline, resamples=2000, seed=0)
    assert result["mean"] == pytest.approx(10.0) and result["resamples"] == 2000
    low, high = result["ci95"]
    half = 1.96 * 30.0 / np.sqrt(200)
    assert low == pytest.approx(10.0 - half, abs=0.8) and high == pytest.approx(10.0 + half, abs=0.8)
    assert mean_difference(method, baseline, seed=0) == result  # seeded
    assert mean_difference(method, baseline, block=300) == result  # the blocks do not change the draws
    assert mean_difference(method, method)["ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="equal-length"):
        mean_difference(method, baseline[:-1])
