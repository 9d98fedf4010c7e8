"""Teacher cache: cached outputs equal the online teacher's, stale caches are refused, builds resume."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from clipdistill.cli.cache_cmd import cache_app
from clipdistill.data.augment import replay_augmentation
from clipdistill.data.dataset import Caption, PairedDataset
from clipdistill.data.images import load_image_tensor, to_unit
from clipdistill.data.loading import load_dataset
from clipdistill.distill.base import Batch
from clipdistill.distill.cache import (
    MANIFEST_FILE,
    CacheCorruptError,
    CachedTeacher,
    CacheKeyError,
    CacheMismatchError,
    TokenFeaturesUnavailableError,
    build_cache,
    dataset_fingerprint,
)
from clipdistill.distill.losses import clip_loss
from clipdistill.distill.teacher_source import OnlineTeacher
from clipdistill.models.lit import LiTConfig, LiTModel
from clipdistill.models.teachers import load_teacher

K = 3
# 6 train images x 3 augmentations = 18 rows and 12 captions: shard_size 5 gives several shards.
BUILD: dict[str, Any] = {"k_augmentations": K, "image_size": 32, "seed": 0, "shard_size": 5, "batch_size": 4}
OPEN: dict[str, Any] = {
    "split": "train",
    "image_size": 32,
    "k_augmentations": K,
    "seed": 0,
    "aug_scale": (0.8, 1.0),
    "aug_max_shift": 0.1,
}


def _save_teacher(directory: Path, seed: int) -> str:
    torch.manual_seed(seed)
    LiTModel(LiTConfig(image_model="test_convnext", image_size=32)).save(directory)
    return f"run:{directory}"


@pytest.fixture(scope="module")
def teacher_spec(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _save_teacher(tmp_path_factory.mktemp("teacher"), seed=0)


@pytest.fixture(scope="module")
def dataset(shapes_dataset_dir: Path) -> PairedDataset:
    return load_dataset(shapes_dataset_dir)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory, teacher_spec: str, dataset: PairedDataset) -> Path:
    return build_cache(teacher_spec, dataset, tmp_path_factory.mktemp("cache") / "c", progress=False, **BUILD)


def _copy(cache_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(cache_dir, tmp_path / "copy"))  # copy2 keeps mtimes


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


def _batch(dataset: PairedDataset, aug_ids: list[int], split: str = "train") -> Batch:
    """A batch built exactly as the trainer builds one: decode, to_unit, replay augmentation."""
    records = dataset.split(split).images[: len(aug_ids)]
    image_ids = [r.image_id for r in records]
    unit = to_unit(load_image_tensor([r.path for r in records], 32))
    pixels = replay_augmentation(unit, image_ids, aug_ids, seed=0, scale=(0.8, 1.0), max_shift=0.1)
    captions = [r.captions[i % len(r.captions)] for i, r in enumerate(records)]
    return Batch(
        unit_pixels=pixels,
        texts=[c.text for c in captions],
        image_ids=image_ids,
        caption_ids=[c.caption_id for c in captions],
        aug_ids=torch.tensor(aug_ids, dtype=torch.int64),
    )


# --- (a) equivalence with the online teacher -----------------------------------------------------
def test_cached_outputs_equal_online_teacher(cache_dir: Path, teacher_spec: str, dataset: PairedDataset) -> None:
    batch = _batch(dataset, [0, 1, 2, 2, 1, 0])
    plain = _batch(dataset, [0] * 6)
    assert not torch.allclose(batch.unit_pixels[1], plain.unit_pixels[1])  # augmentations really differ

    cached = CachedTeacher.open(cache_dir, teacher_spec=teacher_spec, dataset=dataset, **OPEN)(batch)
    online = OnlineTeacher(load_teacher(teacher_spec))(batch)

    assert cached.image.shape == online.image.shape == (6, 384)
    torch.testing.assert_close(cached.image, online.image, atol=1e-5, rtol=0)
    torch.testing.assert_close(cached.text, online.text, atol=1e-5, rtol=0)
    torch.testing.assert_close(cached.logit_scale, online.logit_scale)
    loss_cached = clip_loss(cached.image, cached.text, cached.logit_scale)
    loss_online = clip_loss(online.image, online.text, online.logit_scale)
    torch.testing.assert_close(loss_cached, loss_online, atol=1e-5, rtol=0)


def test_manifest_records_what_the_cache_is(cache_dir: Path, teacher_spec: str, dataset: PairedDataset) -> None:
    manifest = json.loads((cache_dir / MANIFEST_FILE).read_text())
    assert manifest["teacher"]["spec"] == teacher_spec and manifest["teacher"]["embed_dim"] == 384
    assert manifest["dataset"]["fingerprint"] == dataset_fingerprint(dataset.split("train"))
    assert manifest["preprocessing"]["k_augmentations"] == K and manifest["counts"]["image_rows"] == 6 * K
    assert [e["file"] for e in manifest["shards"]["images"]] == [f"images-{i:05d}.safetensors" for i in range(4)]
    assert len(manifest["shards"]["texts"]) == 3 and manifest["caption_ids"] == dataset.split("train").caption_ids()


def test_unknown_ids_name_the_id_and_the_cache(cache_dir: Path, teacher_spec: str, dataset: PairedDataset) -> None:
    teacher = CachedTeacher.open(cache_dir, teacher_spec=teacher_spec, dataset=dataset, **OPEN)
    val_batch = _batch(dataset, [0, 0], split="val")
    expected = f"{re.escape(repr(val_batch.image_ids[0]))}.*{re.escape(str(cache_dir))}"
    with pytest.raises(CacheKeyError, match=expected):
        teacher(val_batch)
    too_far = _batch(dataset, [0, K])
    with pytest.raises(KeyError, match=rf"augmentation {K} .*0\.\.{K - 1}"):
        teacher(too_far)


def test_a_moved_teacher_with_the_same_weights_is_accepted(
    cache_dir: Path, teacher_spec: str, dataset: PairedDataset, tmp_path: Path
) -> None:
    moved = shutil.copytree(teacher_spec.removeprefix("run:"), tmp_path / "moved")
    CachedTeacher.open(cache_dir, teacher_spec=f"run:{moved}", dataset=dataset, **OPEN)


# --- (b) mismatches are refused, naming the field -------------------------------------------------
def _edit_first_caption(dataset: PairedDataset) -> PairedDataset:
    records = list(dataset.images)
    index = next(i for i, r in enumerate(records) if r.split == "train")
    first = records[index]
    captions = (Caption(first.captions[0].caption_id, "an edited caption"), *first.captions[1:])
    records[index] = dataclasses.replace(first, captions=captions)
    return PairedDataset(name=dataset.name, images=records, source=dataset.source)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ("teacher", "teacher"),
        ("dataset", "dataset"),
        ({"split": "val"}, "split"),
        ({"k_augmentations": 2}, "k_augmentations"),
        ({"seed": 1}, "seed"),
        ({"image_size": 64}, "image_size"),
        ({"aug_max_shift": 0.2}, "aug_max_shift"),
        ({"aug_scale": (0.5, 1.0)}, "aug_scale"),
    ],
)
def test_mismatched_cache_is_refused(
    change: Any, field: str, cache_dir: Path, teacher_spec: str, dataset: PairedDataset, tmp_path: Path
) -> None:
    spec, data, kwargs = teacher_spec, dataset, dict(OPEN)
    if change == "teacher":
        spec = _save_teacher(tmp_path / "other", seed=1)
    elif change == "dataset":
        data = _edit_first_caption(dataset)
    else:
        kwargs.update(change)
    with pytest.raises(CacheMismatchError, match=field) as info:
        CachedTeacher.open(cache_dir, teacher_spec=spec, dataset=data, **kwargs)
    assert "clipdistill cache build" in str(info.value) and str(cache_dir) in str(info.value)


def test_cache_from_an_older_pixel_pipeline_is_refused(
    cache_dir: Path, teacher_spec: str, dataset: PairedDataset, tmp_path: Path
) -> None:
    """A cache built before a decoding change (cache.PIPELINE bumped) holds teacher outputs for
    other pixels: opening it must fail naming both pipelines, not serve the stale features."""
    from clipdistill.distill.cache import PIPELINE

    old = _copy(cache_dir, tmp_path)
    manifest = json.loads((old / "manifest.json").read_text())
    v1 = "load_image_tensor(bicubic, rgb on white) > to_unit > replay_augmentation/v1"
    manifest["preprocessing"]["pipeline"] = v1
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheMismatchError, match=r"built for pipeline='load_image_tensor.*/v1' but pipeline=") as info:
        CachedTeacher.open(old, teacher_spec=teacher_spec, dataset=dataset, **OPEN)
    assert repr(PIPELINE) in str(info.value) and "clipdistill cache build" in str(info.value)


def test_token_features_not_in_cache_are_refused(cache_dir: Path, teacher_spec: str, dataset: PairedDataset) -> None:
    with pytest.raises(CacheMismatchError, match="token_features"):
        CachedTeacher.open(cache_dir, teacher_spec=teacher_spec, dataset=dataset, token_features=True, **OPEN)


# --- (c) corruption ------------------------------------------------------------------------------
def test_corrupt_shard_is_refused_naming_the_file(
    cache_dir: Path, teacher_spec: str, dataset: PairedDataset, tmp_path: Path
) -> None:
    copy = _copy(cache_dir, tmp_path)
    shard = copy / "images-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0xFF  # inside the tensor data: the file still parses, only the checksum can tell
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match=r"images-00001\.safetensors.*checksum"):
        CachedTeacher.open(copy, teacher_spec=teacher_spec, dataset=dataset, **OPEN)

    (copy / "texts-00002.safetensors").unlink()
    shard.write_bytes((cache_dir / shard.name).read_bytes())
    with pytest.raises(CacheCorruptError, match=r"texts-00002\.safetensors is missing"):
        CachedTeacher.open(copy, teacher_spec=teacher_spec, dataset=dataset, **OPEN)


def test_unfinished_cache_is_refused(
    cache_dir: Path, teacher_spec: str, dataset: PairedDataset, tmp_path: Path
) -> None:
    copy = _copy(cache_dir, tmp_path)
    (copy / MANIFEST_FILE).unlink()
    with pytest.raises(CacheCorruptError, match=r"manifest\.json does not exist"):
        CachedTeacher.open(copy, teacher_spec=teacher_spec, dataset=dataset, **OPEN)


# --- (d) no-op rebuild and resume ----------------------------------------------------------------
def test_rebuilding_a_finished_cache_touches_nothing(
    cache_dir: Path, teacher_spec: str, dataset: PairedDataset, tmp_path: Path
) -> None:
    copy = _copy(cache_dir, tmp_path)
    before = _mtimes(copy)
    build_cache(teacher_spec, dataset, copy, progress=False, **BUILD)
    assert _mtimes(copy) == before


def test_interrupted_build_resumes_and_completes(
    cache_dir: Path, teacher_spec: str, dataset: PairedDataset, tmp_path: Path
) -> None:
    copy = _copy(cache_dir, tmp_path)
    (copy / MANIFEST_FILE).unlink()  # a crash before the manifest...
    (copy / "images-00002.safetensors").unlink()  # ...and before this shard was written
    kept = _mtimes(copy)
    build_cache(teacher_spec, dataset, copy, progress=False, **BUILD)

    after = _mtimes(copy)
    assert {name: after[name] for name in kept} == kept  # finished shards were not recomputed
    # safetensors writes metadata in hash-map order, so only the recomputed shard's file hash may differ.
    manifests = [json.loads((folder / MANIFEST_FILE).read_text()) for folder in (copy, cache_dir)]
    for manifest in manifests:
        manifest["shards"]["images"][2].pop("sha256")
    assert manifests[0] == manifests[1]
    restored, original = (safe_open(str(f / "images-00002.safetensors"), "pt") for f in (copy, cache_dir))
    assert restored.metadata() == original.metadata()
    for name in ("embeddings", "aug_ids"):
        assert torch.equal(restored.get_tensor(name), original.get_tensor(name))
    CachedTeacher.open(copy, teacher_spec=teacher_spec, dataset=dataset, **OPEN)


def test_rebuild_with_other_settings_replaces_the_cache(
    cache_dir: Path, teacher_spec: str, dataset: PairedDataset, tmp_path: Path
) -> None:
    copy = _copy(cache_dir, tmp_path)
    texts = {name: mtime for name, mtime in _mtimes(copy).items() if name.startswith("texts-")}
    build_cache(teacher_spec, dataset, copy, progress=False, **{**BUILD, "k_augmentations": 1})
    assert {name: _mtimes(copy)[name] for name in texts} == texts  # captions do not depend on k: reused
    assert not (copy / "images-00003.safetensors").exists()  # 6 rows now: stale shards are gone
    teacher = CachedTeacher.open(copy, teacher_spec=teacher_spec, dataset=dataset, **{**OPEN, "k_augmentations": 1})
    assert teacher(_batch(dataset, [0, 0])).image.shape == (2, 384)
    with pytest.raises(CacheMismatchError, match="k_augmentations"):
        CachedTeacher.open(copy, teacher_spec=teacher_spec, dataset=dataset, **OPEN)


# --- token features ------------------------------------------------------------------------------
def _without_token_features(monkeypatch: pytest.MonkeyPatch) -> None:
    """The LiT teacher provides token features; remove them to stand for a teacher that does not."""
    for name in ("encode_image_tokens", "encode_text_tokens"):
        monkeypatch.delattr(LiTModel, name)


def test_token_features_from_a_teacher_without_them_is_a_clear_error(
    teacher_spec: str, dataset: PairedDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _without_token_features(monkeypatch)
    with pytest.raises(TokenFeaturesUnavailableError, match="does not provide token features"):
        build_cache(teacher_spec, dataset, tmp_path / "c", token_features=True, progress=False, **BUILD)
    assert not (tmp_path / "c").exists()


def test_token_features_are_stored_and_served(
    teacher_spec: str, dataset: PairedDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def image_tokens(self: LiTModel, pixels: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_features(pixels).flatten(2).transpose(1, 2)

    def text_tokens(self: LiTModel, ids: torch.Tensor) -> torch.Tensor:
        return ids[:, :4, None].float().expand(-1, -1, 3)

    monkeypatch.setattr(LiTModel, "encode_image_tokens", image_tokens, raising=False)
    monkeypatch.setattr(LiTModel, "encode_text_tokens", text_tokens, raising=False)
    build = {**BUILD, "k_augmentations": 2, "shard_size": 64, "batch_size": 64}
    out = build_cache(teacher_spec, dataset, tmp_path / "c", token_features=True, progress=False, **build)
    assert (out / "image_tokens-00000.safetensors").is_file() and (out / "text_tokens-00000.safetensors").is_file()

    opened = {**OPEN, "k_augmentations": 2}
    batch = _batch(dataset, [1, 0, 1])
    cached = CachedTeacher.open(out, teacher_spec=teacher_spec, dataset=dataset, token_features=True, **opened)(batch)
    model = load_teacher(teacher_spec).model
    with torch.no_grad():
        expected = model.encode_image_tokens(model.prepare_pixels(batch.unit_pixels))
    assert cached.image_tokens is not None and cached.text_tokens is not None
    torch.testing.assert_close(cached.image_tokens, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(cached.text_tokens, text_tokens(model, model.tokenize(batch.texts)))
    plain = CachedTeacher.open(out, teacher_spec=teacher_spec, dataset=dataset, **opened)(batch)
    assert plain.image_tokens is None  # not loaded unless asked for


# --- (e) CLI -------------------------------------------------------------------------------------
runner = CliRunner()


def _flat(output: str) -> str:
    """Rich wraps long lines to the terminal width; compare text with whitespace collapsed."""
    return " ".join(output.split())


def test_cli_builds_a_cache_and_prints_a_summary(teacher_spec: str, shapes_dataset_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    args = ["build", "--teacher", teacher_spec, "--data", str(shapes_dataset_dir), "--out", str(out)]
    result = runner.invoke(cache_app, [*args, "--k-aug", "2", "--image-size", "32", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert "6 images x k=2 (12 rows), 12 captions" in result.output
    assert json.loads((out / MANIFEST_FILE).read_text())["preprocessing"]["k_augmentations"] == 2
    info = runner.invoke(cache_app, ["info", str(out)])
    assert info.exit_code == 0 and teacher_spec in info.output


@pytest.mark.parametrize(
    ("teacher", "message"),
    [("opneclip:RN50", "unknown model schema 'opneclip'"), ("run:/no/such/teacher", "folder does not exist")],
)
def test_cli_bad_teacher_is_one_clear_error(
    teacher: str, message: str, shapes_dataset_dir: Path, tmp_path: Path
) -> None:
    args = ["build", "--teacher", teacher, "--data", str(shapes_dataset_dir), "--out", str(tmp_path / "c")]
    result = runner.invoke(cache_app, args)
    assert result.exit_code == 2
    assert "error:" in result.output and message in _flat(result.output)
    assert "Traceback" not in result.output


def test_cli_cache_errors_exit_cleanly(
    teacher_spec: str, shapes_dataset_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _without_token_features(monkeypatch)
    args = ["build", "--teacher", teacher_spec, "--data", str(shapes_dataset_dir), "--out", str(tmp_path / "c")]
    result = runner.invoke(cache_app, [*args, "--token-features"])
    assert result.exit_code == 2 and "does not provide token features" in _flat(result.output)
    missing = runner.invoke(cache_app, ["info", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "manifest.json does not exist" in _flat(missing.output)
