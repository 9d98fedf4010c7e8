"""Per-batch decoding (``data.preload: false``): the same pixels as preloading, only the
step's rows decoded, and a run that is bitwise the preloaded run, resumable across the two."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clipdistill.config import ConfigError, TrainConfig, from_dict
from clipdistill.data import pixels as pixels_module
from clipdistill.data.loading import load_dataset
from clipdistill.data.pixels import DecodingPixels, PreloadedPixels, chunked
from clipdistill.data.wds import write_wds
from clipdistill.train.trainer import Trainer, train
from test_trainer import interrupt_after_steps


def _config(tmp_path: Path, data: Path, *, batch_size: int = 3, epochs: int = 2, **data_keys: object) -> TrainConfig:
    return from_dict(
        TrainConfig,
        {
            "name": "p",
            "out_dir": str(tmp_path / "runs"),
            "method": "clip",
            "data": {"path": str(data), "image_size": 32, **data_keys},
            "optim": {"epochs": epochs, "batch_size": batch_size, "lr": 1e-3, "warmup_steps": 1},
            "log_every": 1,
            "save_every": 1,
        },
    )


def _student(config: TrainConfig) -> dict[str, torch.Tensor]:
    return torch.load(config.run_dir / "checkpoints" / "latest.pt", weights_only=True)["student"]


@pytest.fixture(scope="module")
def wds_dir(shapes_dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wds")
    write_wds(load_dataset(shapes_dataset_dir), out, shard_size=4)
    return out


@pytest.mark.parametrize("source", ["files", "wds"])
@pytest.mark.parametrize("workers", [0, 2])
def test_decoded_batches_equal_the_preloaded_rows(
    source: str, workers: int, shapes_dataset_dir: Path, wds_dir: Path
) -> None:
    dataset = load_dataset(shapes_dataset_dir if source == "files" else wds_dir)
    paths = dataset.image_paths()
    preloaded = PreloadedPixels(paths, 24)
    batches = [torch.tensor([3, 0]), torch.tensor([len(paths) - 1]), torch.tensor([1, 1, 2])]
    decoded = list(DecodingPixels(paths, 24, workers=workers).batches(batches))
    assert len(decoded) == len(batches)
    for index, got in zip(batches, decoded, strict=True):
        assert got.dtype == torch.uint8 and got.shape == (len(index), 3, 24, 24)
        assert torch.equal(got, preloaded.pixels[index])
    assert [len(c) for c in chunked(7, 3)] == [3, 3, 1] and torch.equal(torch.cat(chunked(7, 3)), torch.arange(7))


def test_only_the_rows_a_step_uses_are_decoded(
    shapes_dataset_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: list[str] = []
    real = pixels_module.decode_uint8

    def counting(path: str, size: int) -> object:
        decoded.append(path)
        return real(path, size)

    monkeypatch.setattr(pixels_module, "decode_uint8", counting)
    config = _config(tmp_path, shapes_dataset_dir, batch_size=4, epochs=1, preload=False)
    trainer = Trainer(config, progress=False)
    assert decoded == []  # nothing decoded up front
    trainer.fit()
    train_paths = {str(p) for p in trainer.train_split.image_paths()}
    in_training = [p for p in decoded if p in train_paths]
    # 6 training images, batch 4: one step of 4 rows per epoch; the 2 left over are never decoded
    assert len(in_training) == 4 and len(set(in_training)) == 4
    assert len(decoded) - len(in_training) == len(trainer.val_split)  # evaluation decoded the val split once


def test_per_batch_decoding_trains_bitwise_like_preloading_and_resumes_across_modes(
    shapes_dataset_dir: Path, tmp_path: Path
) -> None:
    preloaded = _config(tmp_path / "a", shapes_dataset_dir)
    train(preloaded, progress=False)
    lazy = _config(tmp_path / "b", shapes_dataset_dir, preload=False, workers=2)
    train(lazy, progress=False)
    expected, got = _student(preloaded), _student(lazy)
    assert all(torch.equal(got[key], expected[key]) for key in expected)

    # Stop a preloaded run after 3 of 4 steps, resume it decoding per batch in 1 worker.
    interrupted = _config(tmp_path / "c", shapes_dataset_dir)
    interrupt_after_steps(Trainer(interrupted, progress=False), 3)
    resumed_config = _config(tmp_path / "c", shapes_dataset_dir, preload=False, workers=1)
    Trainer(resumed_config, progress=False).fit(resume="latest")
    resumed = _student(resumed_config)
    assert all(torch.equal(resumed[key], expected[key]) for key in expected)


def test_workers_need_per_batch_decoding_and_must_not_be_negative(shapes_dataset_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'data.workers' is 2 but 'data.preload' is true"):
        _config(tmp_path, shapes_dataset_dir, workers=2)
    with pytest.raises(ConfigError, match=r"'data.workers' has value -1"):
        _config(tmp_path, shapes_dataset_dir, preload=False, workers=-1)


def test_evaluation_decodes_in_chunks_with_the_same_embeddings(
    shapes_dataset_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """embed_split without pixels decodes a few images at a time (memory flat in the split's
    size) and gives the embeddings of the whole split decoded at once."""
    from clipdistill.data.images import load_image_tensor
    from clipdistill.eval import embed as embed_module
    from clipdistill.models.lit import LiTConfig, LiTModel

    torch.manual_seed(0)
    model = LiTModel(LiTConfig(image_model="test_convnext", image_size=32)).eval()
    split = load_dataset(shapes_dataset_dir).split("test")
    decoded: list[int] = []
    original = pixels_module.DecodingPixels.batches

    def counting(self: pixels_module.DecodingPixels, indices: list[torch.Tensor]):  # type: ignore[no-untyped-def]
        for batch in original(self, indices):
            decoded.append(len(batch))
            yield batch

    monkeypatch.setattr(embed_module, "DECODE_CHUNK", 2)
    monkeypatch.setattr(pixels_module.DecodingPixels, "batches", counting)
    images, texts = embed_module.embed_split(model, split)
    assert decoded == [2, 1] and sum(decoded) == len(split)
    whole = load_image_tensor(split.image_paths(), 32)
    expected_images, expected_texts = embed_module.embed_split(model, split, pixels=whole)
    assert torch.allclose(images, expected_images, atol=1e-6) and torch.equal(texts, expected_texts)
