"""The lite0 student preset and its pretrained tower initialisations (models/student_towers.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipdistill.config import ConfigError, StudentConfig, TrainConfig, from_dict
from clipdistill.models.imagenet_lite import map_lite_state, read_lite_state
from clipdistill.models.student_towers import apply_tower_init, embedding_basis, read_minilm, spread_layers
from clipdistill.models.students import build_student, load_student, save_student, student_config
from clipdistill.train.trainer import build_student_model, train

CAPTIONS = [
    "a red heart",
    "red heart emoji",
    "Café crème & croissant — ünïcödé “quotes” 😀 日本語",
    "a &amp; b   with   spaces\tand\ttabs",
    " ".join(["a very long caption about a smiling yellow face with tears of joy"] * 6),
]


@pytest.fixture(scope="module")
def lite0() -> object:
    torch.manual_seed(0)
    return build_student(student_config("lite0", image_size=32))


@pytest.fixture(scope="module")
def inherited() -> object:
    torch.manual_seed(0)
    student = build_student(student_config("lite0", image_size=32))
    apply_tower_init(student, "imagenet", "teacher")
    return student


def test_lite0_tokenizer_gives_bert_ids(lite0) -> None:
    tokens = lite0.tokenize(["a red heart", CAPTIONS[-1]])
    assert tokens.shape == (2, 32)
    assert (tokens[:, 0] == 101).all()  # [CLS]
    assert tokens[0, 4] == 102 and (tokens[0, 5:] == 0).all()  # [SEP], then [PAD]=0
    assert tokens[1, -1] == 102  # truncated to the context, [SEP] kept last
    assert lite0.image_mean == (0.5, 0.5, 0.5) and lite0.image_std == (0.5, 0.5, 0.5)


def test_lite0_image_tower_runs_channels_last_and_keeps_its_weights(lite0) -> None:
    """BatchNorm CNN towers get NHWC pixels (1.7x per training step on CPU); the result is the
    NCHW computation's, and the weights keep their layout (safetensors refuses strided ones)."""
    assert lite0.channels_last_pixels
    pixels = torch.rand(2, 3, 32, 32)
    lite0.eval()  # no dropout: the two passes must see the same function
    with torch.no_grad():
        nhwc = lite0.encode_image(pixels)
        lite0.channels_last_pixels = False
        try:
            nchw = lite0.encode_image(pixels)
        finally:
            lite0.channels_last_pixels = True
    torch.testing.assert_close(nhwc, nchw, atol=1e-5, rtol=1e-4)
    assert all(p.is_contiguous() for p in lite0.parameters())


@pytest.mark.e2e
def test_lite0_round_trips_and_loads_in_plain_open_clip(lite0, tmp_path: Path) -> None:
    folder = save_student(lite0.eval(), tmp_path / "student")
    assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    again = load_student(folder).eval()
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(pixels), lite0.encode_image(pixels))
        torch.testing.assert_close(
            again.encode_text(again.tokenize(CAPTIONS)), lite0.encode_text(lite0.tokenize(CAPTIONS))
        )
    # Without clipdistill: a fresh interpreter that never imports it.
    script = (
        "import sys, open_clip, torch\n"
        f"model, _, preprocess = open_clip.create_model_and_transforms('local-dir:{folder}')\n"
        f"tok = open_clip.get_tokenizer('local-dir:{folder}')\n"
        "ids = tok(['a red heart'])\n"
        "assert type(tok).__name__ == 'HFTokenizer' and ids[0, 0] == 101 and ids.shape == (1, 32), ids\n"
        "assert 'clipdistill' not in sys.modules\n"
        "print(model.encode_text(ids).shape[-1])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "384"


def test_imagenet_init_loads_the_lite0_weights(lite0, inherited) -> None:
    state, _ = read_lite_state("efficientnet-lite0")
    expected = map_lite_state(state, inherited.model.visual.trunk)
    trunk = inherited.model.visual.trunk.state_dict()
    random_trunk = lite0.model.visual.trunk.state_dict()
    for name in ("conv_stem.weight", "blocks.3.1.conv_dw.weight", "conv_head.weight", "bn2.running_var"):
        torch.testing.assert_close(trunk[name], expected[name], atol=0, rtol=0)
        assert not torch.equal(random_trunk[name], expected[name]), name


def test_teacher_text_init_inherits_projected_embeddings(lite0, inherited) -> None:
    state, _ = read_minilm()
    words = state["embeddings.word_embeddings.weight"]
    basis = embedding_basis(words, 256)
    assert basis.shape == (384, 256)
    torch.testing.assert_close(basis.T @ basis, torch.eye(256, dtype=torch.float64), atol=1e-8, rtol=0)
    rows = torch.tensor([0, 101, 102, 2417, 2540, 30521])
    table = inherited.model.token_embedding.weight.detach()
    torch.testing.assert_close(table[rows].double(), (words[rows] @ basis), atol=1e-5, rtol=0)
    assert not torch.allclose(lite0.model.token_embedding.weight[rows].double(), words[rows] @ basis, atol=1e-3)
    # The low-rank map keeps the vocabulary's geometry: most tokens keep their nearest neighbour.
    sample = torch.arange(1000, 30000, 29)
    full = torch.nn.functional.normalize(words[sample], dim=-1)
    low = torch.nn.functional.normalize(table[sample].double(), dim=-1)
    same = ((full @ full.T).fill_diagonal_(-2).argmax(1) == (low @ low.T).fill_diagonal_(-2).argmax(1)).float()
    assert same.mean() > 0.8
    # The first block's norm is MiniLM's embedding LayerNorm, seen through the basis.
    expected_ln = (basis * basis).T @ state["embeddings.LayerNorm.weight"]
    ln_1 = inherited.model.transformer.resblocks[0].ln_1.weight.detach().double()
    torch.testing.assert_close(ln_1, expected_ln, atol=1e-5, rtol=0)


def test_teacher_text_init_is_deterministic(inherited) -> None:
    torch.manual_seed(123)  # another random init underneath: the inherited tensors must not change
    again = build_student(student_config("lite0", image_size=32))
    apply_tower_init(again, "random", "teacher")
    first, second = inherited.model.state_dict(), again.model.state_dict()
    for name in ("token_embedding.weight", "transformer.resblocks.1.attn.in_proj_weight", "text_projection"):
        assert torch.equal(first[name], second[name]), name


def test_layer_subset_is_spread_evenly() -> None:
    assert spread_layers(6, 2) == [0, 5]
    assert spread_layers(6, 3) == [0, 2, 5]
    assert spread_layers(6, 6) == list(range(6))


def test_tower_init_refusals(tmp_path: Path) -> None:
    def config(**student: object) -> TrainConfig:
        return from_dict(TrainConfig, {"out_dir": str(tmp_path), "student": student})

    with pytest.raises(ConfigError, match=r"student\.image_init.*'efficientvit_m0'.*tf_efficientnet_lite0"):
        build_student_model(config(preset="tiny", image_init="imagenet"))
    with pytest.raises(ConfigError, match=r"student\.text_init.*WordPiece"):
        build_student_model(config(preset="tiny", text_init="teacher"))
    with pytest.raises(ConfigError, match=r"student\.init.*student\.image_init"):
        StudentConfig(init="local-dir:/nowhere", image_init="imagenet")
    with pytest.raises(ConfigError, match=r"student\.init.*student\.text_init"):
        StudentConfig(init="local-dir:/nowhere", text_init="teacher")
    with pytest.raises(ConfigError, match=r"student\.text_init.*'bert'.*random, teacher"):
        StudentConfig(text_init="bert")


def test_lite0_trains_from_pretrained_towers(shapes_dataset_dir: Path, tmp_path: Path) -> None:
    raw = {
        "name": "lite0",
        "out_dir": str(tmp_path / "runs"),
        "method": "clip",
        "data": {"path": str(shapes_dataset_dir), "image_size": 32},
        "optim": {"epochs": 1, "batch_size": 4, "warmup_steps": 1},
        "student": {"preset": "lite0", "image_init": "imagenet", "text_init": "teacher"},
    }
    config = from_dict(TrainConfig, raw)
    summary = train(config, progress=False)
    assert summary["val"]["rsum"] >= 0
    saved = json.loads((config.run_dir / "model" / "open_clip_config.json").read_text())
    assert saved["model_cfg"]["text_cfg"]["hf_tokenizer_name"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert saved["preprocess_cfg"]["mean"] == [0.5, 0.5, 0.5]
    assert load_student(config.run_dir / "model").tokenize(["a red heart"])[0, 0] == 101


def test_exported_lite0_serves_open_clips_token_ids(lite0, tmp_path: Path) -> None:
    import open_clip

    from clipdistill.export.onnx import export_model
    from clipdistill.serve.tokenize import load_tokenizer

    folder = save_student(lite0.eval(), tmp_path / "student")
    parity = export_model(f"local-dir:{folder}", tmp_path / "export")
    served = load_tokenizer(tmp_path / "export")(CAPTIONS)
    expected = open_clip.get_tokenizer(f"local-dir:{folder}")(CAPTIONS).numpy()
    assert served.shape == expected.shape == (len(CAPTIONS), 32)
    assert (served == expected).all()
    assert parity["tokenizer_mismatched_captions"] == 0
    assert parity["onnx_fp32"]["text"]["min_cosine"] > 0.9999
    config = json.loads((tmp_path / "export" / "tokenizer_config.json").read_text())
    assert config["kind"] == "wordpiece" and config["clean"] == "whitespace"
