"""Searcher on a hand-built index, the search CLI, and serving without torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipdistill.io import atomic_write_json
from clipdistill.serve.encoders import OnnxEncoders
from clipdistill.serve.index import IndexMismatchError, build_index
from clipdistill.serve.search import QueryError, Searcher
from test_export import deploy_app, ensure_export

CAPTIONS = ["a red heart", "a blue whale", "a green tree", "a yellow sun", "a black cat", "a white cloud"]
COLOURS = ["red", "blue", "green", "yellow", "black", "white"]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory, shapes_dataset_dir: Path) -> Path:
    return ensure_export(tmp_path_factory.getbasetemp() / "deploy", shapes_dataset_dir)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory, export_dir: Path) -> Path:
    """A hand-built embedding folder: each row's image vector IS its caption's text embedding
    (so a caption query must return its own row first with score ~1), images are solid colours."""
    root = tmp_path_factory.mktemp("handmade")
    emb = root / "emb"
    encoders = OnnxEncoders(export_dir)
    vectors = encoders.encode_texts(CAPTIONS)
    rows = []
    for i, (caption, colour) in enumerate(zip(CAPTIONS, COLOURS, strict=True)):
        path = root / f"{colour}.png"
        Image.new("RGB", (40, 40), colour).save(path)
        rows.append(
            {"id": f"img{i}", "image_path": str(path), "caption": caption, "captions": [caption], "split": "test"}
        )
    for sub, name in (("img_emb", "img_emb_0000.npy"), ("text_emb", "text_emb_0000.npy")):
        (emb / sub).mkdir(parents=True)
        np.save(emb / sub / name, vectors)
    pd.DataFrame(rows).to_parquet(emb / "metadata.parquet")
    identity = {"backend": "onnx", "export_dir": str(export_dir), **encoders.identity}
    atomic_write_json(
        emb / "embeddings.json",
        {
            "model": identity,
            "dataset": {"name": "handmade", "source": "test", "split": "test"},
            "dataset_sha256": "x",
            "count": len(rows),
            "embed_dim": encoders.embed_dim,
            "shards": [{}],
        },
    )
    build_index(emb, root / "index", factory="Flat", thumb_size=16)
    return root / "index"


def test_text_query_returns_its_own_row(index_dir: Path) -> None:
    searcher = Searcher.open(index_dir)
    for i, caption in enumerate(CAPTIONS):
        hits = searcher.search(text=caption, k=3)
        assert hits[0]["id"] == f"img{i}" and hits[0]["caption"] == caption
        assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert set(hits[0]) == {"id", "score", "caption", "path"} and Path(hits[0]["path"]).is_file()
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_image_query_accepts_pil_bytes_and_path(index_dir: Path, tmp_path: Path) -> None:
    searcher = Searcher.open(index_dir)
    image = Image.new("RGB", (40, 40), "red")
    path = tmp_path / "q.png"
    image.save(path)
    results = [searcher.search(image=q, k=6) for q in (image, path.read_bytes(), path, str(path))]
    assert all(len(hits) == 6 for hits in results)
    assert all([h["id"] for h in hits] == [h["id"] for h in results[0]] for hits in results)
    vector = searcher.embed_query(image=image)
    np.testing.assert_allclose(np.linalg.norm(vector), 1.0, atol=1e-5)


def test_bad_queries_are_refused(index_dir: Path) -> None:
    searcher = Searcher.open(index_dir)
    with pytest.raises(QueryError, match="exactly one"):
        searcher.search(k=3)
    with pytest.raises(QueryError, match="empty"):
        searcher.search(text="   ")
    with pytest.raises(QueryError, match="k must be"):
        searcher.search(text="a red heart", k=0)
    with pytest.raises(QueryError, match="cannot decode"):
        searcher.search(image=b"not an image")
    with pytest.raises(IndexMismatchError, match="query dim 3"):
        searcher.search_vectors(np.ones((1, 3), dtype=np.float32))
    assert len(searcher.search(text="a red heart", k=100)) == len(CAPTIONS)  # k > count: all rows


def test_search_with_foreign_encoders_is_refused(index_dir: Path, tmp_path: Path, export_dir: Path) -> None:
    import shutil

    other = tmp_path / "other"
    shutil.copytree(export_dir, other)
    config = json.loads((other / "export.json").read_text())
    config["source"]["weights_sha256"] = "2" * 64
    (other / "export.json").write_text(json.dumps(config))
    with pytest.raises(IndexMismatchError, match="weights checksum"):
        Searcher.open(index_dir, encoders=other)
    Searcher.open(index_dir, encoders=export_dir, variant="int8")  # the same model's int8 graphs pass


def test_search_cli_prints_a_table(index_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(deploy_app(), ["search", str(index_dir), "a blue whale", "-k", "2"])
    assert result.exit_code == 0, result.output
    assert "a blue whale" in result.output and "img1" in result.output and "score" in result.output
    Image.new("RGB", (20, 20), "green").save(tmp_path / "g.png")
    result = runner.invoke(deploy_app(), ["search", str(index_dir), "--image", str(tmp_path / "g.png"), "-k", "3"])
    assert result.exit_code == 0, result.output
    assert "top 3" in result.output
    result = runner.invoke(deploy_app(), ["search", str(index_dir)])
    assert result.exit_code == 2 and "exactly one" in result.output
    result = runner.invoke(deploy_app(), ["search", str(tmp_path), "x"])
    assert result.exit_code == 2 and "manifest.json is missing" in result.output


def test_embed_and_index_cli(tmp_path: Path, export_dir: Path, shapes_dataset_dir: Path) -> None:
    runner = CliRunner()
    emb, index = tmp_path / "emb", tmp_path / "index"
    result = runner.invoke(
        deploy_app(), ["embed", "--model", str(export_dir), "--data", str(shapes_dataset_dir), "--out", str(emb)]
    )
    assert result.exit_code == 0, result.output
    assert "embedded 3 images" in result.output
    result = runner.invoke(deploy_app(), ["index", str(emb), "--out", str(index), "--factory", "HNSW16"])
    assert result.exit_code == 0, result.output
    assert "index HNSW16 over 3 vectors" in result.output
    result = runner.invoke(deploy_app(), ["index", str(emb), "--out", str(index), "--factory", "Bogus"])
    assert result.exit_code == 2 and "Bogus" in result.output


def test_serving_runs_without_torch(index_dir: Path) -> None:
    """A subprocess where ``import torch`` fails still opens the index and searches."""
    script = textwrap.dedent(
        f"""
        import sys

        class BlockTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
                return None

        sys.meta_path.insert(0, BlockTorch())
        from clipdistill.serve import Searcher

        searcher = Searcher.open({str(index_dir)!r})
        hits = searcher.search(text="a green tree", k=2)
        assert hits[0]["id"] == "img2", hits
        searcher.search(image={str(index_dir / "thumbs" / "0000000.jpg")!r}, k=2)
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
        print("ok", hits[0]["id"])
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok img2" in result.stdout
