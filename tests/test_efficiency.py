"""Efficiency helpers on a tiny hand-written dual encoder whose costs can be worked out by hand.

Only sanity is asserted about time (positive, finite): speed is measured by benchmarks.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import pytest
import torch
from torch import nn

from clipdistill.eval.efficiency import (
    count_flops,
    count_parameters,
    measure_latency_ms,
    peak_memory_mb,
    tower_efficiency,
    weights_mb,
)
from clipdistill.models.base import DualEncoder

VOCAB, DIM, CONTEXT = 50, 16, 8
PIXELS = 3 * 8 * 8


class TinyDualEncoder(DualEncoder):
    """Linear over flattened 8x8 pixels; bag of token embeddings + a linear projection."""

    image_size = (8, 8)
    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.25, 0.25, 0.25)
    embed_dim = DIM

    def __init__(self) -> None:
        super().__init__()
        self.visual = nn.Sequential(nn.Flatten(), nn.Linear(PIXELS, DIM))
        self.token_embedding = nn.EmbeddingBag(VOCAB, DIM, mode="mean", padding_idx=0)
        self.text_projection = nn.Linear(DIM, DIM, bias=False)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)

    def _encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text_projection(self.token_embedding(tokens))

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        rows = []
        for text in texts:
            ids = [zlib.crc32(word.encode()) % (VOCAB - 1) + 1 for word in text.split()][:CONTEXT]
            rows.append(ids + [0] * (CONTEXT - len(ids)))
        return torch.tensor(rows, dtype=torch.int64)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_scale

    def image_tower(self) -> nn.Module:
        return self.visual

    def text_tower(self) -> nn.Module:
        return nn.ModuleList([self.token_embedding, self.text_projection])


IMAGE_PARAMS = PIXELS * DIM + DIM  # Linear weight + bias
TEXT_PARAMS = VOCAB * DIM + DIM * DIM  # embedding table + bias-free projection


@pytest.fixture(scope="module")
def model() -> TinyDualEncoder:
    torch.manual_seed(0)
    return TinyDualEncoder()


# --- parameters and FLOPs ---------------------------------------------------------------------
def test_count_parameters_matches_hand_count(model):
    assert count_parameters(model.image_tower()) == IMAGE_PARAMS == 3088
    assert count_parameters(model.text_tower()) == TEXT_PARAMS == 1056
    assert count_parameters(model) == IMAGE_PARAMS + TEXT_PARAMS + 1  # + logit scale


def test_count_parameters_counts_shared_weights_once():
    shared = nn.Linear(4, 4)
    assert count_parameters(nn.Sequential(shared, shared)) == 20


@pytest.mark.parametrize(("n_in", "n_out"), [(7, 3), (64, 16), (PIXELS, DIM)])
def test_count_flops_of_linear_at_batch_1(n_in, n_out):
    layer = nn.Linear(n_in, n_out)
    x = torch.randn(1, n_in)
    assert count_flops(lambda: layer(x)) == 2 * n_in * n_out


# --- latency ----------------------------------------------------------------------------------
def test_latency_is_positive_and_finite(model):
    pixels = torch.randn(4, 3, 8, 8)
    ms = measure_latency_ms(lambda: model.encode_image(pixels), warmup=1, repeats=5)
    assert isinstance(ms, float)
    assert 0 < ms < math.inf


def test_latency_counts_calls(model):
    calls = []
    measure_latency_ms(lambda: calls.append(1), warmup=2, repeats=4)
    assert len(calls) == 6


@pytest.mark.parametrize(("warmup", "repeats"), [(-1, 3), (0, 0)])
def test_latency_rejects_bad_counts(warmup, repeats):
    with pytest.raises(ValueError, match="repeats"):
        measure_latency_ms(lambda: None, warmup=warmup, repeats=repeats)


# --- memory -----------------------------------------------------------------------------------
def test_peak_memory_of_one_known_allocation():
    mib = peak_memory_mb(lambda: torch.ones(1_000_000))
    assert mib == pytest.approx(4_000_000 / 2**20, rel=0.01)


def test_peak_memory_is_the_high_water_mark_not_the_end_state():
    n = 500_000

    def three_live_then_free():
        a, b = torch.ones(n), torch.ones(n)
        c = a + b  # a, b and c alive together
        del a, b, c

    def one_at_a_time():
        for _ in range(3):
            torch.ones(n)

    assert peak_memory_mb(three_live_then_free) == pytest.approx(3 * 4 * n / 2**20, rel=0.01)
    assert peak_memory_mb(one_at_a_time) == pytest.approx(4 * n / 2**20, rel=0.01)


def test_peak_memory_positive_and_grows_with_batch(model):
    small, large = torch.randn(1, 3, 8, 8), torch.randn(512, 3, 8, 8)
    peak_small = peak_memory_mb(lambda: model.encode_image(small))
    peak_large = peak_memory_mb(lambda: model.encode_image(large))
    assert 0 < peak_small < peak_large
    tokens = model.tokenize(["a red heart"] * 512)
    assert peak_memory_mb(lambda: model.encode_text(tokens[:1])) < peak_memory_mb(lambda: model.encode_text(tokens))


# --- the report -------------------------------------------------------------------------------
def test_tower_efficiency_report(model):
    report = tower_efficiency(model, repeats=2)
    assert report.keys() == {"params", "flops", "latency_ms", "peak_mem_mb"}
    assert report["params"] == {"image": IMAGE_PARAMS, "text": TEXT_PARAMS, "total": count_parameters(model)}
    # embedding lookups count 0 FLOPs; the projections are all the matmul work
    assert report["flops"] == {"image": 2 * PIXELS * DIM, "text": 2 * DIM * DIM}
    assert list(report["latency_ms"]) == ["image_b1", "text_b1", "image_b64", "text_b64"]
    assert all(0 < v < math.inf for v in report["latency_ms"].values())
    assert report["peak_mem_mb"].keys() == {"image", "text"}
    assert report["peak_mem_mb"]["image"] > weights_mb(model.image_tower()) > 0
    assert report["peak_mem_mb"]["text"] > weights_mb(model.text_tower()) > 0


def test_tower_efficiency_other_batch_sizes_and_restores_state(model):
    model.train()
    threads = torch.get_num_threads()
    report = tower_efficiency(model, batch_sizes=(2, 5), repeats=1, num_threads=1)
    assert list(report["latency_ms"]) == ["image_b2", "text_b2", "image_b5", "text_b5"]
    assert model.training
    assert torch.get_num_threads() == threads
    model.eval()


def test_tower_efficiency_rejects_bad_batch_sizes(model):
    with pytest.raises(ValueError, match="batch_sizes"):
        tower_efficiency(model, batch_sizes=(0, 4))
