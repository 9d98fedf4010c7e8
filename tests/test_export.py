"""ONNX export: parity with torch, torch-free tokenizer equivalence, the export CLI.

``ensure_export`` builds one tiny student export per test run (through the CLI, so the
command is exercised too); test_index.py and test_search.py reuse it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from clipdistill.cli.deploy_cmd import embed_command, export_command, index_command, search_command

CAPTIONS = [
    "a red heart",
    "Smiling face with tears of joy!!",
    "   lots   of\twhitespace\n here ",
    "café crème brûlée, naïve résumé",
    "日本の国旗 flag of Japan 🇯🇵",
    "emoji 😂🤣❤️‍🔥 and ZWJ 👩‍👩‍👧",
    "punctuation: (a) [b] {c} <d> ... --- ''' \"q\" #hash @at $5.00 100%",
    "don't won't it's we're they've I'm you'll he'd",
    "HTML &amp; entities &lt;b&gt; &quot;quoted&quot;",
    "mojibake: Ã©tÃ© â€œquotesâ€\x9d",
    "numbers 1234567890 and 3.14159",
    "",
    "over-long " + " ".join(f"word{i}" for i in range(200)),
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
]


def deploy_app() -> typer.Typer:
    """The deploy commands on their own app (cli.main registers them in the real CLI)."""
    app = typer.Typer()
    app.command("export")(export_command)
    app.command("embed")(embed_command)
    app.command("index")(index_command)
    app.command("search")(search_command)
    return app


def ensure_export(base: Path, data_dir: Path) -> Path:
    """A tiny (untrained, seeded) student exported with --int8 and parity on the shapes set."""
    out = base / "export"
    if (out / "export.json").is_file():
        return out
    import torch

    from clipdistill.models.students import build_student, save_student

    torch.manual_seed(0)
    save_student(build_student("tiny"), base / "student")
    result = CliRunner().invoke(
        deploy_app(),
        ["export", "--model", f"local-dir:{base / 'student'}", "--out", str(out), "--int8", "--data", str(data_dir)],
    )
    assert result.exit_code == 0, result.output
    (base / "export_cli_output.txt").write_text(result.output)
    return out


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory, shapes_dataset_dir: Path) -> Path:
    return ensure_export(tmp_path_factory.getbasetemp() / "deploy", shapes_dataset_dir)


def test_export_writes_graphs_configs_and_parity(export_dir: Path) -> None:
    for name in (
        "image_encoder.onnx",
        "text_encoder.onnx",
        "image_encoder.int8.onnx",
        "text_encoder.int8.onnx",
        "export.json",
        "parity.json",
        "preprocess_config.json",
        "tokenizer_config.json",
        "bpe_simple_vocab_16e6.txt.gz",
    ):
        assert (export_dir / name).is_file(), name
    parity = json.loads((export_dir / "parity.json").read_text())
    for tower in ("image", "text"):
        assert parity["onnx_fp32"][tower]["min_cosine"] >= 0.999
        assert parity["onnx_fp32"][tower]["max_abs_diff"] < 1e-4
        assert parity["onnx_int8"][tower]["min_cosine"] > 0.9
    assert parity["tokenizer_mismatched_captions"] == 0
    assert parity["torch"]["recall"]["rsum"] >= 0  # measured on the shapes test split
    assert "kept_fp32" in parity["int8_settings"]
    files = parity["files"]
    assert files["text_encoder.int8.onnx"]["bytes"] < files["text_encoder.onnx"]["bytes"] / 2
    output = (export_dir.parent / "export_cli_output.txt").read_text()
    assert "onnx_fp32" in output and "exported" in output


def test_graphs_take_dynamic_batch_and_named_inputs(export_dir: Path) -> None:
    from clipdistill.serve.encoders import OnnxEncoders

    encoders = OnnxEncoders(export_dir)
    assert [i.name for i in encoders._image.get_inputs()] == ["pixel_values"]
    assert encoders._text.get_inputs()[0].name == "input_ids"
    assert encoders._text.get_inputs()[0].type == "tensor(int64)"
    for batch in (1, 5):
        pixels = np.random.default_rng(0).standard_normal((batch, 3, 64, 64)).astype(np.float32)
        image = encoders.encode_pixels(pixels)
        text = encoders.encode_texts(["a red heart"] * batch)
        assert image.shape == text.shape == (batch, encoders.embed_dim)
        np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("context_length", [32, 77])
def test_served_tokenizer_matches_open_clip(context_length: int) -> None:
    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    from clipdistill.serve.tokenize import ClipBpeTokenizer

    reference = SimpleTokenizer(context_length=context_length)(CAPTIONS).numpy()
    served = ClipBpeTokenizer(default_bpe(), context_length)(CAPTIONS)
    assert served.dtype == np.int64
    np.testing.assert_array_equal(served, reference)
    assert served[-2, -1] == reference[-2, -1] != 0  # the over-long caption ends in eot at the cut


def test_student_tokenizer_is_what_export_describes(export_dir: Path) -> None:
    import open_clip

    from clipdistill.serve.tokenize import load_tokenizer

    student_dir = export_dir.parent / "student"
    reference = open_clip.get_tokenizer(f"local-dir:{student_dir}")(CAPTIONS).numpy()
    np.testing.assert_array_equal(load_tokenizer(export_dir)(CAPTIONS), reference)


def test_export_without_data_uses_random_inputs(tmp_path: Path, export_dir: Path) -> None:
    from clipdistill.export.onnx import parity_report, write_preprocess, write_tokenizer
    from clipdistill.models.students import build_student

    model = build_student("tiny")
    for name in ("image_encoder.onnx", "text_encoder.onnx"):  # reuse graphs: parity only needs shapes
        (tmp_path / name).write_bytes((export_dir / name).read_bytes())
    write_tokenizer(model, tmp_path)
    write_preprocess(model, tmp_path)
    config = json.loads((export_dir / "export.json").read_text())
    config["variants"] = ["fp32"]
    (tmp_path / "export.json").write_text(json.dumps(config))
    report = parity_report(model, tmp_path, variants=["fp32"], data=None)
    assert report["inputs"].startswith("random inputs")
    assert report["onnx_fp32"]["recall"] is None
