"""Model specs and loaders, exercised offline on random-weight models built from configs."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

from clipdistill.models.base import DualEncoder, FrozenTeacher
from clipdistill.models.lit import LiTConfig, LiTModel, load_lit
from clipdistill.models.spec import ModelSpec, ModelSpecError, parse_spec
from clipdistill.models.students import (
    PRESETS,
    StudentConfigError,
    build_student,
    save_student,
    student_config,
)
from clipdistill.models.teachers import load_model, load_teacher

# A deliberately small open_clip architecture: a timm test trunk + a 1-layer text transformer.
TINY_OPENCLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {
        "timm_model_name": "test_convnext",
        "timm_model_pretrained": False,
        "timm_pool": "avg",
        "timm_proj": "linear",
        "image_size": 32,
    },
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _pixels(model: DualEncoder, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(batch, 3, 40, 40)  # deliberately not the model's size: prepare_pixels resizes


@pytest.fixture(scope="module")
def tiny_openclip_name(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("oc_cfg")
    (folder / "clipdistill-test-tiny.json").write_text(json.dumps(TINY_OPENCLIP_CFG))
    open_clip.add_model_config(folder)
    return "clipdistill-test-tiny"


# --- spec parsing -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("openclip:ViT-B-32@laion2b_s34b_b79k", ModelSpec("openclip", "ViT-B-32", "laion2b_s34b_b79k")),
        ("openclip:RN50", ModelSpec("openclip", "RN50", None)),
        ("hf-hub:timm/ViT-B-16-SigLIP", ModelSpec("hf-hub", "timm/ViT-B-16-SigLIP")),
        ("local-dir:/tmp/x", ModelSpec("local-dir", "/tmp/x")),
        ("hf:openai/clip-vit-base-patch32", ModelSpec("hf", "openai/clip-vit-base-patch32")),
        ("run:runs/teacher", ModelSpec("run", "runs/teacher")),
    ],
)
def test_parse_spec_each_schema(text: str, expected: ModelSpec) -> None:
    assert parse_spec(text) == expected
    assert str(parse_spec(text)) == text


def test_unknown_schema_lists_valid_ones_and_close_match() -> None:
    with pytest.raises(ModelSpecError, match=r"unknown model schema 'opneclip'.*Did you mean 'openclip:'") as info:
        parse_spec("opneclip:ViT-B-32")
    for schema in ("openclip:", "hf-hub:", "local-dir:", "hf:", "run:"):
        assert schema in str(info.value)


@pytest.mark.parametrize("bad", ["ViT-B-32", "openclip:", "hf-hub:noslash", "openclip:@tag"])
def test_malformed_specs_are_errors(bad: str) -> None:
    with pytest.raises(ModelSpecError):
        parse_spec(bad)


def test_unknown_openclip_name_suggests_close_matches() -> None:
    with pytest.raises(ModelSpecError, match=r"unknown open_clip model 'ViT-B-33'.*close matches: .*ViT-B-32"):
        load_model("openclip:ViT-B-33")


def test_unknown_pretrained_tag_lists_tags() -> None:
    with pytest.raises(ModelSpecError, match=r"unknown pretrained tag 'laion2b_nope'.*laion2b_s34b_b79k"):
        load_model("openclip:ViT-B-32@laion2b_nope")


def test_run_spec_without_model_names_what_it_looked_for(tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match=r"no model found .*clipdistill_model.json.*open_clip_config.json"):
        load_model(f"run:{tmp_path}")
    with pytest.raises(ModelSpecError, match="does not exist"):
        load_model(f"run:{tmp_path / 'missing'}")


# --- each loader, random weights --------------------------------------------------------
def test_openclip_zoo_name_builds_with_random_weights(tiny_openclip_name: str) -> None:
    model = load_model(f"openclip:{tiny_openclip_name}", load_weights=False)
    assert model.image_size == (32, 32) and model.embed_dim == 32
    emb = model.embed_images(_pixels(model))
    assert emb.shape == (2, 32)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert model.embed_texts(["a red heart", "a cat"]).shape == (2, 32)


def test_local_dir_round_trip_matches_plain_open_clip(tmp_path: Path) -> None:
    student = build_student(TINY_OPENCLIP_CFG).eval()
    save_student(student, tmp_path / "student")
    ours = load_model(f"local-dir:{tmp_path / 'student'}")
    plain, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'student'}")
    plain.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'student'}")
    pixels = student.prepare_pixels(_pixels(student))
    texts = ["a red heart", "grinning face"]
    with torch.no_grad():
        expected_img = student.encode_image(pixels)
        assert torch.allclose(ours.encode_image(pixels), expected_img, atol=1e-6)
        assert torch.allclose(plain.encode_image(pixels, normalize=True), expected_img, atol=1e-6)
        assert torch.allclose(
            plain.encode_text(tokenizer(texts), normalize=True), student.embed_texts(texts), atol=1e-6
        )


def test_hf_hub_loads_from_an_offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """hf-hub: goes through open_clip's real hub code, served from a hand-built offline cache."""
    import huggingface_hub.constants as hub_constants

    student = build_student(TINY_OPENCLIP_CFG).eval()
    snapshot = tmp_path / "hub" / "models--clipdistill--tiny" / "snapshots" / ("0" * 40)
    save_student(student, snapshot)
    (tmp_path / "hub" / "models--clipdistill--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--clipdistill--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    model = load_model("hf-hub:clipdistill/tiny")
    pixels = student.prepare_pixels(_pixels(student))
    with torch.no_grad():
        assert torch.allclose(model.encode_image(pixels), student.encode_image(pixels), atol=1e-6)


def test_hf_clip_model_from_a_saved_folder(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    from clipdistill.models.text_minilm import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))  # any saved tokenizer works for the test
    config = CLIPConfig(
        text_config={
            "vocab_size": tokenizer.vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 32,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        projection_dim=24,
    )
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    model = load_model(f"hf:{tmp_path / 'clip'}")
    assert model.image_size == (32, 32) and model.embed_dim == 24
    assert model.embed_images(_pixels(model)).shape == (2, 24)
    assert model.embed_texts(["a red heart"]).shape == (1, 24)
    assert 0 < model.logit_scale.exp() < 101


# --- students -----------------------------------------------------------------------------
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds_through_plain_open_clip(preset: str, tmp_path: Path) -> None:
    student = build_student(preset).eval()
    save_student(student, tmp_path / preset)
    plain = open_clip.create_model(f"local-dir:{tmp_path / preset}").eval()
    pixels = student.prepare_pixels(_pixels(student))
    with torch.no_grad():
        assert torch.allclose(plain.encode_image(pixels, normalize=True), student.encode_image(pixels), atol=1e-5)
    image_params = sum(p.numel() for p in student.image_tower().parameters())
    text_params = sum(p.numel() for p in student.text_tower().parameters())
    total = sum(p.numel() for p in student.parameters())
    assert image_params + text_params + 1 == total  # +1: the logit scale belongs to neither tower


def test_tiny_preset_image_tower_is_about_two_million_parameters() -> None:
    student = build_student("tiny")
    image_params = sum(p.numel() for p in student.image_tower().parameters())
    assert 1.5e6 < image_params < 3e6
    assert 2 <= PRESETS["tiny"]["text_cfg"]["layers"] <= 4
    assert 128 <= PRESETS["tiny"]["text_cfg"]["width"] <= 256


def test_unknown_preset_suggests_close_match() -> None:
    with pytest.raises(StudentConfigError, match=r"unknown student preset 'tinny'.*did you mean 'tiny'"):
        student_config("tinny")


def test_broken_timm_trunk_is_a_clear_error() -> None:
    config = student_config("tiny")
    config["vision_cfg"]["timm_model_name"] = "no_such_trunk_xyz"
    with pytest.raises(StudentConfigError, match="no_such_trunk_xyz"):
        build_student(config)


# --- LiT teacher and the frozen wrapper ------------------------------------------------------
@pytest.fixture(scope="module")
def lit_model() -> LiTModel:
    torch.manual_seed(0)
    return LiTModel(LiTConfig(image_model="test_convnext", image_size=32)).eval()


def test_lit_save_load_round_trip(lit_model: LiTModel, tmp_path: Path) -> None:
    lit_model.save(tmp_path / "teacher")
    saved = set(json.loads((tmp_path / "teacher" / "clipdistill_model.json").read_text())["config"])
    assert {"image_model", "embed_dim", "text_proj"} <= saved
    loaded = load_model(f"run:{tmp_path / 'teacher'}")
    pixels = _pixels(lit_model)
    with torch.no_grad():
        assert torch.allclose(loaded.embed_images(pixels), lit_model.embed_images(pixels), atol=1e-6)
        assert torch.allclose(loaded.embed_texts(["a cat"]), lit_model.embed_texts(["a cat"]), atol=1e-6)


def test_lit_refuses_a_different_text_model(lit_model: LiTModel, tmp_path: Path) -> None:
    lit_model.save(tmp_path / "teacher")
    meta_path = tmp_path / "teacher" / "clipdistill_model.json"
    meta = json.loads(meta_path.read_text())
    meta["text_model"]["sha256"] = "f" * 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="different MiniLM"):
        load_lit(tmp_path / "teacher")


def test_lit_text_features_are_minilm_sentence_embeddings(lit_model: LiTModel) -> None:
    """Padding length must not change the pooled feature (mask-weighted mean)."""
    short = lit_model.embed_texts(["a red heart"])
    batch = lit_model.embed_texts(["a red heart", "a much longer caption about a grinning face with big eyes"])
    assert torch.allclose(short[0], batch[0], atol=1e-5)
    similar = float(lit_model.embed_texts(["a red heart"]) @ lit_model.embed_texts(["red heart"]).t())
    unrelated = float(lit_model.embed_texts(["a red heart"]) @ lit_model.embed_texts(["flag of Japan"]).t())
    assert similar > unrelated


def test_frozen_teacher_stays_in_eval_mode_without_gradients(lit_model: LiTModel) -> None:
    teacher = FrozenTeacher(lit_model)
    parent = torch.nn.ModuleDict({"teacher": teacher, "head": torch.nn.Linear(2, 2)})
    parent.train()
    assert not teacher.training and not lit_model.training and parent["head"].training
    assert all(not p.requires_grad for p in teacher.parameters())
    out = teacher.embed_images(_pixels(lit_model))
    assert out.grad_fn is None and not out.requires_grad


def test_load_teacher_returns_frozen(lit_model: LiTModel, tmp_path: Path) -> None:
    lit_model.save(tmp_path / "teacher")
    teacher = load_teacher(f"run:{tmp_path / 'teacher'}")
    assert isinstance(teacher, FrozenTeacher)
    assert teacher.spec == f"run:{tmp_path / 'teacher'}"
    assert all(not p.requires_grad for p in teacher.parameters())
