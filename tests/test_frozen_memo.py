"""The frozen-stage memo of the LiT teacher (models/encoding_memo.py): with an ``EncodingMemo``
attached every image's frozen stages run once across passes (teacher bank, fusion teacher,
cache), the embeddings and tokens equal a plain forward, and without one (or while training)
nothing is memoised. And ``student.frozen_stages``: a student's leading EfficientNet stages stay fixed,
run through the memoised ONNX Runtime prefix (models/trunk_split.py), and the model is still the
plain open_clip one (same weights, same function, same saved folder)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clipdistill.config import ConfigError, TrainConfig, from_dict
from clipdistill.models.encoding_memo import EncodingMemo, attach_encoding_memo
from clipdistill.models.frozen_stages import FrozenStages
from clipdistill.models.lit import LiTModel, lit_config_from_spec
from clipdistill.models.students import build_student, student_config
from clipdistill.train.trainer import build_student_model


@pytest.fixture(scope="module")
def lit_teacher() -> LiTModel:
    return LiTModel(lit_config_from_spec("efficientnet-lite0@64", frozen_stages=5)).eval()


@pytest.fixture
def teacher(lit_teacher: LiTModel) -> object:
    """The module's teacher with no memo attached (each test attaches its own)."""
    attach_encoding_memo(lit_teacher, None)
    yield lit_teacher
    attach_encoding_memo(lit_teacher, None)


def _count_frozen_rows(model: object, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The batch sizes ``model.frozen_prefix`` computes (rows not found in the memo)."""
    rows: list[int] = []
    original = model.frozen_prefix.run

    def counting(pixels: torch.Tensor, key: str | None = None) -> torch.Tensor:
        rows.append(pixels.shape[0])
        return original(pixels, key)

    monkeypatch.setattr(model.frozen_prefix, "run", counting)
    return rows


@torch.no_grad()
def test_memo_reuses_frozen_rows_and_matches_a_plain_forward(teacher: LiTModel, monkeypatch) -> None:
    generator = torch.Generator().manual_seed(0)
    pixels = teacher.prepare_pixels(torch.rand(5, 3, 48, 48, generator=generator))
    plain_embedding, plain_tokens = teacher.encode_image(pixels), teacher.encode_image_tokens(pixels)
    rows = _count_frozen_rows(teacher, monkeypatch)
    upper: list[int] = []
    original_upper = teacher._upper_from_frozen
    monkeypatch.setattr(teacher, "_upper_from_frozen", lambda f: upper.append(len(f)) or original_upper(f))
    attach_encoding_memo(teacher, EncodingMemo())
    embedding = teacher.encode_image(pixels)
    tokens = teacher.encode_image_tokens(pixels)  # the fusion teacher's second pass: nothing runs
    assert rows == [5] and upper == [5]
    reordered = teacher.encode_image(torch.cat([pixels[3:], pixels[:1], torch.flip(pixels[:1], dims=[3])]))
    assert rows == [5, 1] and upper == [5, 1]  # another batch: only the new (flipped) image runs
    torch.testing.assert_close(embedding, plain_embedding, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tokens, plain_tokens, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(reordered[:3], plain_embedding[[3, 4, 0]], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_a_whole_trunk_row_replaces_its_frozen_row_in_the_memo(teacher: LiTModel) -> None:
    """Later passes ask for the whole trunk: once that row is memoised, the frozen row it was
    computed from leaves the memo (and its bytes with it)."""
    memo = EncodingMemo()
    attach_encoding_memo(teacher, memo)
    pixels = teacher.prepare_pixels(torch.rand(4, 3, 48, 48, generator=torch.Generator().manual_seed(1)))
    teacher.frozen_rows(pixels[:2])  # teacher training's bank: two images' frozen rows
    frozen = memo.tower(teacher.frozen_prefix.key())
    assert len(frozen.rows) == 2 and frozen.bytes > 0
    teacher.encode_image(pixels)
    (trunk,) = [rows for key, rows in memo.towers.items() if key.startswith("lit-trunk:")]
    assert len(trunk.rows) == 4
    assert len(frozen.rows) == 0 and frozen.bytes == 0


@torch.no_grad()
def test_frozen_rows_are_the_memos_own_tensors(teacher: LiTModel) -> None:
    """A caller keeping rows (the teacher's frozen bank) holds the memo's tensors, not copies;
    without a memo the rows are those of one plain pass."""
    pixels = torch.randn(3, 3, 64, 64)
    plain = teacher.frozen_rows(pixels)
    memo = EncodingMemo()
    attach_encoding_memo(teacher, memo)
    first, again = teacher.frozen_rows(pixels), teacher.frozen_rows(pixels)
    assert all(a is b for a, b in zip(first, again, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(first, plain, strict=True))
    assert torch.equal(torch.stack(first), teacher.frozen_features(pixels))


def test_memo_is_off_without_a_memo_and_while_gradients_flow(teacher: LiTModel, monkeypatch) -> None:
    pixels = teacher.prepare_pixels(torch.rand(2, 3, 48, 48))
    rows = _count_frozen_rows(teacher, monkeypatch)
    with torch.no_grad():
        teacher.encode_image(pixels)
        teacher.encode_image(pixels)
    assert rows == []  # no memo: the plain trunk forward
    memo = EncodingMemo()
    attach_encoding_memo(teacher, memo)
    teacher.encode_image(pixels).sum().backward()  # training the upper stages: the plain path
    assert rows == [] and not memo.towers


def test_a_changed_frozen_tower_does_not_read_the_old_rows(teacher: LiTModel) -> None:
    pixels = teacher.prepare_pixels(torch.rand(2, 3, 48, 48))
    other = LiTModel(lit_config_from_spec("efficientnet-lite0@64", frozen_stages=5)).eval()
    memo = EncodingMemo()
    with torch.no_grad():
        other.trunk.conv_stem.weight.mul_(0.5)
        expected = other.frozen_features(pixels)
        attach_encoding_memo(teacher, memo)
        attach_encoding_memo(other, memo)
        teacher.frozen_features(pixels)
        torch.testing.assert_close(other.frozen_features(pixels), expected)
    assert len(memo.towers) == 2


@torch.no_grad()
def test_changed_trained_stages_do_not_read_the_old_trunk_rows(teacher: LiTModel) -> None:
    """The whole-trunk memo is keyed by every trunk weight: other trained stages (a teacher saved
    at another epoch) compute their own rows, while the frozen rows are still shared."""
    pixels = teacher.prepare_pixels(torch.rand(2, 3, 48, 48))
    other = LiTModel(lit_config_from_spec("efficientnet-lite0@64", frozen_stages=5)).eval()
    other.load_state_dict(teacher.state_dict())
    other.trunk.conv_head.weight.mul_(0.5)
    expected = other.encode_image_tokens(pixels)
    memo = EncodingMemo()
    attach_encoding_memo(teacher, memo)
    attach_encoding_memo(other, memo)
    teacher.encode_image_tokens(pixels)
    torch.testing.assert_close(other.encode_image_tokens(pixels), expected, atol=1e-5, rtol=1e-4)
    assert len(memo.towers) == 3  # one frozen-stage memo, two whole-trunk memos


# --- student.frozen_stages: the same split on a student (models/openclip_model.py) ----------------
def _lite0(frozen: int) -> object:
    torch.manual_seed(0)
    student = build_student(student_config("lite0", image_size=32))
    student.freeze_trunk_stages(frozen)
    return student


def test_frozen_student_is_the_plain_model_and_computes_each_row_once(monkeypatch) -> None:
    student = _lite0(5)
    plain = _lite0(0)
    assert student.state_dict().keys() == plain.state_dict().keys()
    pixels = torch.rand(4, 3, 32, 32)
    with torch.no_grad():  # before any training step (those move the upper BatchNorm statistics)
        torch.testing.assert_close(
            student.eval().encode_image(pixels), plain.eval().encode_image(pixels), atol=1e-5, rtol=1e-4
        )
    student.encoding_memo = EncodingMemo()  # its own memo starts empty again
    student.train()
    trunk = student.model.visual.trunk
    assert not trunk.bn1.training and not trunk.blocks[4].training and trunk.blocks[5].training
    frozen = {id(p) for module in student.frozen_prefix.modules for p in module.parameters()}
    assert frozen and all(not p.requires_grad for module in student.frozen_prefix.modules for p in module.parameters())
    rows = _count_frozen_rows(student, monkeypatch)
    embedding = student.encode_image(pixels)  # training mode: grads reach the upper stages only
    embedding.sum().backward()
    assert rows == [4]
    grads = [p for p in student.parameters() if p.grad is not None]
    assert grads and not [p for p in grads if id(p) in frozen]
    assert trunk.blocks[5][0].conv_pw.weight.grad is not None
    again = student.encode_image(torch.cat([pixels[2:], torch.rand(1, 3, 32, 32)]))
    assert rows == [4, 1]  # rows met before come from the memo
    assert again.shape == (3, student.embed_dim)


def test_onnx_prefix_rows_do_not_depend_on_their_batch() -> None:
    """What makes the memo exact (and resume bit-for-bit): on CPU a row's frozen features are the
    same bits whichever rows share its batch."""
    student = _lite0(5)
    runner = FrozenStages(student.frozen_prefix.modules, torch.device("cpu"))
    pixels = torch.randn(9, 3, 32, 32)
    whole = runner(pixels)
    for rows in ([0], [4, 2], [8, 0, 5, 1]):
        assert torch.equal(runner(pixels[rows]), whole[rows])


def test_onnx_prefix_runs_a_large_batch_in_bounded_calls(monkeypatch) -> None:
    """A batch larger than rows_per_call runs as several calls (the session's arena keeps its
    largest activations: a 1,024-image call left gigabytes resident), with the same bits."""
    import clipdistill.models.frozen_stages as frozen_stages

    student = _lite0(5)
    runner = FrozenStages(student.frozen_prefix.modules, torch.device("cpu"))
    pixels = torch.randn(9, 3, 32, 32)
    whole = runner(pixels)
    session = runner.sessions[(32, 32)]
    batches: list[int] = []

    class Counting:
        def run(self, names, feeds):
            batches.append(len(feeds["pixels"]))
            return session.run(names, feeds)

    runner.sessions[(32, 32)] = Counting()
    monkeypatch.setattr(frozen_stages, "PIXELS_PER_CALL", 4 * 32 * 32 + 100)
    chunked = runner(pixels)
    assert batches == [4, 4, 1]
    assert torch.equal(chunked, whole) and chunked.is_contiguous(memory_format=torch.channels_last)


def test_rows_per_call_keeps_the_pixels_of_a_call_bounded() -> None:
    from clipdistill.models.frozen_stages import PIXELS_PER_CALL, rows_per_call

    assert rows_per_call(224, 224) == 8  # the teacher's input: about 15 MB of activations per row
    assert rows_per_call(96, 96) * 96 * 96 <= PIXELS_PER_CALL < (rows_per_call(96, 96) + 1) * 96 * 96
    assert rows_per_call(4096, 4096) == 1  # a huge input still runs, one row at a time


def test_frozen_stages_key_builds_and_rejects_other_trunks(tmp_path) -> None:
    base = {"name": "s", "out_dir": str(tmp_path), "method": "clip", "data": {"path": str(tmp_path)}}
    config = from_dict(TrainConfig, {**base, "student": {"preset": "lite0", "image_size": 32, "frozen_stages": 3}})
    student = build_student_model(config)
    assert student.frozen_stages == 3 and len(student.frozen_prefix.modules) == 2 + 3
    with pytest.raises(ConfigError, match=r"student.frozen_stages.*EfficientNet"):
        build_student_model(from_dict(TrainConfig, {**base, "student": {"preset": "tiny", "frozen_stages": 2}}))
    with pytest.raises(ConfigError, match=r"student.frozen_stages.*8.*7 stages"):
        build_student_model(from_dict(TrainConfig, {**base, "student": {"preset": "lite0", "frozen_stages": 8}}))
    with pytest.raises(ConfigError, match=r"frozen_stages' must be >= 0"):
        from_dict(TrainConfig, {**base, "student": {"preset": "lite0", "frozen_stages": -1}})


def test_a_copied_frozen_student_builds_its_own_runner() -> None:
    """``copy.deepcopy`` of a student (EMA copies, tests) must not try to copy an ONNX Runtime
    session; the copy's prefix runs on its own copied stages."""
    import copy

    student = _lite0(5).eval()
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = student.encode_image(pixels)  # builds the original's runner
        twin = copy.deepcopy(student)
        assert twin.frozen_prefix._runner is None and twin.encoding_memo is student.encoding_memo
        assert twin.frozen_prefix.modules[0] is twin.model.visual.trunk.conv_stem
        twin.encoding_memo = EncodingMemo()  # rows not yet computed: the copy's own runner runs
        torch.testing.assert_close(twin.encode_image(pixels), expected)
        assert twin.frozen_prefix._runner is not None


@torch.no_grad()
def test_a_released_runner_is_built_again_with_the_same_output(teacher: LiTModel) -> None:
    pixels = torch.randn(2, 3, 64, 64)
    before = teacher.frozen_features(pixels)
    assert teacher.frozen_prefix._runner is not None
    teacher.frozen_prefix.release()
    assert teacher.frozen_prefix._runner is None  # its session (and arena) gone
    assert torch.equal(teacher.frozen_features(pixels), before)


@torch.no_grad()
def test_image_token_keys_read_back_the_batched_tokens_from_memory_and_disk(teacher: LiTModel, tmp_path: Path) -> None:
    """The fusion teacher keeps the keys of its split's token rows, not the rows: read back from
    the memo (here mostly from its spill file) they equal the batched tokens bit for bit."""
    pixels = teacher.prepare_pixels(torch.rand(5, 3, 48, 48, generator=torch.Generator().manual_seed(2)))
    plain = teacher.encode_image_tokens(pixels)
    memo = EncodingMemo(max_bytes=1, spill_dir=tmp_path)  # every row past the first goes to disk
    attach_encoding_memo(teacher, memo)
    try:
        keys = teacher.image_token_keys(pixels)
        assert keys is not None and len(keys) == 5
        (trunk,) = [tower for key, tower in memo.towers.items() if key.startswith("lit-trunk:")]
        assert trunk.spill is not None and len(trunk.spill.placed) >= 4
        rows = teacher.image_tokens_reader()(keys[::-1])
        assert torch.equal(torch.stack(rows[::-1]), teacher.encode_image_tokens(pixels))  # the memo's own rows
        torch.testing.assert_close(torch.stack(rows[::-1]), plain, atol=1e-4, rtol=1e-4)
    finally:
        attach_encoding_memo(teacher, None)
        memo.clear()


@torch.no_grad()
def test_frozen_keys_read_back_the_frozen_rows(teacher: LiTModel, tmp_path: Path) -> None:
    """Teacher training's bank holds keys: the rows read back equal the frozen stages' output."""
    pixels = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    memo = EncodingMemo(max_bytes=1, spill_dir=tmp_path)
    attach_encoding_memo(teacher, memo)
    try:
        keys = teacher.frozen_keys(pixels)
        assert keys is not None
        assert torch.equal(torch.stack(teacher.frozen_rows_reader()(keys)), teacher.frozen_prefix.run(pixels))
    finally:
        attach_encoding_memo(teacher, None)
        memo.clear()
    assert teacher.frozen_keys(pixels) is None


@torch.no_grad()
def test_a_token_row_dropped_by_a_memo_without_spill_is_a_clear_error(teacher: LiTModel) -> None:
    pixels = teacher.prepare_pixels(torch.rand(3, 3, 48, 48, generator=torch.Generator().manual_seed(3)))
    memo = EncodingMemo(max_bytes=1, spill=False)
    attach_encoding_memo(teacher, memo)
    try:
        keys = teacher.image_token_keys(pixels)
        assert keys is not None
        with pytest.raises(RuntimeError, match="no longer in the encoding memo"):
            teacher.image_tokens_reader()(keys)
    finally:
        attach_encoding_memo(teacher, None)
    assert teacher.image_token_keys(pixels) is None  # no memo: the caller keeps the rows itself
