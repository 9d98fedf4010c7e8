"""The frozen-stage memo of the LiT teacher (models/encoding_memo.py): inside ``encoding_memo``
every image's frozen stages run once across passes (teacher bank, fusion teacher, cache), the
embeddings and tokens equal a plain forward, and outside the block (or while training) nothing
is memoised."""

from __future__ import annotations

import pytest
import torch

from clipdistill.models import encoding_memo as memo_module
from clipdistill.models.encoding_memo import clear_encoding_memos, encoding_memo
from clipdistill.models.lit import LiTModel, lit_config_from_spec


@pytest.fixture(scope="module")
def teacher() -> LiTModel:
    return LiTModel(lit_config_from_spec("efficientnet-lite0@64", frozen_stages=5)).eval()


def _count_frozen_rows(model: LiTModel, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    rows: list[int] = []
    original = model._run_frozen

    def counting(pixels: torch.Tensor, weights: str) -> torch.Tensor:
        rows.append(pixels.shape[0])
        return original(pixels, weights)

    monkeypatch.setattr(model, "_run_frozen", counting)
    return rows


@torch.no_grad()
def test_memo_reuses_frozen_rows_and_matches_a_plain_forward(teacher: LiTModel, monkeypatch) -> None:
    clear_encoding_memos()
    generator = torch.Generator().manual_seed(0)
    pixels = teacher.prepare_pixels(torch.rand(5, 3, 48, 48, generator=generator))
    plain_embedding, plain_tokens = teacher.encode_image(pixels), teacher.encode_image_tokens(pixels)
    rows = _count_frozen_rows(teacher, monkeypatch)
    with encoding_memo():
        embedding = teacher.encode_image(pixels)
        tokens = teacher.encode_image_tokens(pixels)  # the fusion teacher's second pass: no frozen rows
        assert rows == [5]
        reordered = teacher.encode_image(torch.cat([pixels[3:], pixels[:1], torch.flip(pixels[:1], dims=[3])]))
        assert rows == [5, 1]  # another batch: only the new (flipped) image runs the frozen stages
    torch.testing.assert_close(embedding, plain_embedding, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tokens, plain_tokens, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(reordered[:3], plain_embedding[[3, 4, 0]], atol=1e-5, rtol=1e-4)
    clear_encoding_memos()


def test_memo_is_off_outside_the_block_and_while_gradients_flow(teacher: LiTModel, monkeypatch) -> None:
    clear_encoding_memos()
    pixels = teacher.prepare_pixels(torch.rand(2, 3, 48, 48))
    rows = _count_frozen_rows(teacher, monkeypatch)
    with torch.no_grad():
        teacher.encode_image(pixels)
        teacher.encode_image(pixels)
    assert rows == [] and not memo_module._MEMOS  # no block: the plain trunk forward, no memo
    with encoding_memo():
        teacher.encode_image(pixels).sum().backward()  # training the upper stages: the plain path
    assert rows == [] and not memo_module._MEMOS
    clear_encoding_memos()


def test_a_changed_frozen_tower_does_not_read_the_old_rows(teacher: LiTModel) -> None:
    clear_encoding_memos()
    pixels = teacher.prepare_pixels(torch.rand(2, 3, 48, 48))
    other = LiTModel(lit_config_from_spec("efficientnet-lite0@64", frozen_stages=5)).eval()
    with torch.no_grad():
        other.trunk.conv_stem.weight.mul_(0.5)
        expected = other.frozen_features(pixels)
        with encoding_memo():
            teacher.frozen_features(pixels)
            torch.testing.assert_close(other.frozen_features(pixels), expected)
    assert len(memo_module._MEMOS) == 2
    clear_encoding_memos()
