"""``clipdistill export --format open_clip``: a trained LiT teacher as a plain open_clip folder.

The folder must load with ``open_clip.create_model_and_transforms("local-dir:DIR")`` alone
(offline, no clipdistill imported, another working directory) and with clipdistill's
``local-dir:`` (also after the folder moved), and give the LiT teacher's embeddings and recall.
A student run is an open_clip folder already: it is copied.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from clipdistill.cli.deploy_cmd import export_command

# Curly quotes and HTML entities: open_clip's tokenizers clean them (ftfy), so must the LiT one.
CAPTIONS = ["a red circle", "Two   dogs in the SNOW.", "triangle in green " * 12, "", "twelve o’clock &amp; a cat"]


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("export")(export_command)
    app.command("noop")(_noop)  # two commands keep typer's subcommand syntax
    return app


def _noop() -> None:
    """Nothing."""


COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 60, 220),
    "yellow": (230, 210, 40),
    "purple": (130, 40, 170),
    "orange": (240, 140, 20),
    "black": (10, 10, 10),
    "pink": (250, 150, 190),
}


def _write_dataset(root: Path) -> Path:
    """48 images (8 colours x 3 shapes x 2 sizes), 2 captions each; every other image is train,
    the rest test: a split large enough that recall is neither perfect nor a coin toss."""
    from PIL import Image, ImageDraw

    (root / "images").mkdir(parents=True)
    images, sentid = [], 0
    combos = [(c, s, z) for c in COLOURS for s in ("circle", "square", "triangle") for z in ("big", "small")]
    for imgid, (colour, shape, size) in enumerate(combos):
        image = Image.new("RGB", (32, 32), "white")
        draw = ImageDraw.Draw(image)
        lo, hi = (3, 29) if size == "big" else (10, 22)
        if shape == "circle":
            draw.ellipse((lo, lo, hi, hi), fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle((lo, lo, hi, hi), fill=COLOURS[colour])
        else:
            draw.polygon([(16, lo), (hi, hi), (lo, hi)], fill=COLOURS[colour])
        filename = f"{colour}_{shape}_{size}.png"
        image.save(root / "images" / filename)
        captions = [f"a {size} {colour} {shape}", f"{shape} in {colour}"]
        images.append(
            {
                "imgid": imgid,
                "filename": filename,
                "filepath": "images",
                "split": "train" if imgid % 2 == 0 else "test",
                "sentences": [{"raw": text, "sentid": sentid + i} for i, text in enumerate(captions)],
            }
        )
        sentid += 2
    (root / "dataset.json").write_text(json.dumps({"dataset": "shapes48", "images": images}))
    return root


@pytest.fixture(scope="module")
def shapes48(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_dataset(tmp_path_factory.mktemp("shapes48"))


def _fitted_teacher(folder: Path, shapes_dataset_dir: Path, **config: object) -> str:
    """A LiT teacher (ImageNet Lite0 trunk at 64 px, frozen stages) whose head is fitted by ridge
    regression from the train images' pooled features to their captions' MiniLM embeddings: a
    trained teacher in a second, with real margins between its rankings."""
    from clipdistill.data.images import load_image_tensor, to_unit
    from clipdistill.data.loading import load_dataset
    from clipdistill.models.lit import LiTModel, lit_config_from_spec

    base = lit_config_from_spec("efficientnet-lite0@64", frozen_stages=5)
    teacher = LiTModel(dataclasses.replace(base, **config)).eval()
    train = load_dataset(shapes_dataset_dir).split("train")
    unit = to_unit(load_image_tensor(train.image_paths(), 32))
    with torch.no_grad():
        pixels = teacher.prepare_pixels(unit)
        features = teacher.trunk.forward_head(teacher.trunk.forward_features(pixels))
        texts = torch.stack(
            [
                teacher.text_proj(teacher.minilm_features(teacher.tokenize([c.text for c in r.captions]))).mean(0)
                for r in train.images
            ]
        )
        gram = features @ features.T + 1e-2 * torch.eye(len(features))
        weight = features.T @ torch.linalg.solve(gram, texts)  # (features, embed)
        teacher.image_proj.weight.copy_(weight.T)
        teacher.image_proj.bias.zero_()
    teacher.save(folder)
    return f"run:{folder}"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, shapes48: Path) -> tuple[str, Path, str]:
    base = tmp_path_factory.mktemp("openclip_export")
    spec = _fitted_teacher(base / "teacher", shapes48)
    out = base / "oc"
    result = CliRunner().invoke(_app(), ["export", "--model", spec, "--format", "open_clip", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return spec, out, result.output


def test_export_prints_its_stages_and_writes_a_plain_folder(exported: tuple[str, Path, str]) -> None:
    _, out, output = exported
    flat = " ".join(output.split())
    for stage in ("loading run:", "writing the LiT teacher", "checking the folder with open_clip alone"):
        assert f"export: {stage}" in flat, output
    assert "open_clip reproduces it" in flat
    names = sorted(p.name for p in out.iterdir())
    assert {"open_clip_config.json", "open_clip_model.safetensors", "config.json", "tokenizer.json"} <= set(names)
    assert [n for n in names if n.endswith((".safetensors", ".bin", ".pth"))] == ["open_clip_model.safetensors"]
    cfg = json.loads((out / "open_clip_config.json").read_text())
    text_cfg, vision_cfg = cfg["model_cfg"]["text_cfg"], cfg["model_cfg"]["vision_cfg"]
    assert text_cfg["hf_model_name"] == str(out.resolve()) and text_cfg["hf_model_pretrained"] is False
    assert text_cfg["hf_proj_type"] is None and text_cfg["hf_pooler_type"] == "mean_pooler"
    assert text_cfg["context_length"] == 32
    assert vision_cfg["timm_model_name"] == "tf_efficientnet_lite0" and vision_cfg["timm_proj_bias"] is True
    assert cfg["preprocess_cfg"]["mean"] == [0.5] * 3 and cfg["preprocess_cfg"]["interpolation"] == "bicubic"
    assert cfg["clipdistill"] == {"frozen_stages": 5}


def _teacher_inputs(spec: str) -> tuple[object, torch.Tensor]:
    from clipdistill.models.teachers import load_model

    teacher = load_model(spec)
    unit = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    return teacher, unit


def test_plain_open_clip_loads_it_offline_and_matches(exported: tuple[str, Path, str], tmp_path: Path) -> None:
    spec, out, _ = exported
    teacher, unit = _teacher_inputs(spec)
    pixels = teacher.prepare_pixels(unit)
    torch.save({"pixels": pixels, "captions": CAPTIONS}, tmp_path / "inputs.pt")
    code = (
        "import sys, torch, numpy as np, open_clip\n"
        f"model, _, preprocess = open_clip.create_model_and_transforms('local-dir:{out}')\n"
        f"tokenizer = open_clip.get_tokenizer('local-dir:{out}')\n"
        "assert not [m for m in sys.modules if m.startswith('clipdistill')]\n"
        "inputs = torch.load('inputs.pt')\n"
        "model.eval()\n"
        "with torch.no_grad():\n"
        "    image = model.encode_image(inputs['pixels'], normalize=True)\n"
        "    ids = tokenizer(inputs['captions'])\n"
        "    text = model.encode_text(ids, normalize=True)\n"
        "np.savez('out.npz', image=image.numpy(), text=text.numpy(), ids=ids.numpy())\n"
        "print(preprocess)\n"
    )
    home = tmp_path / "hf_home"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(home)}
    env["HF_HUB_CACHE"] = str(home / "hub")
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bicubic" in result.stdout and "mean=[0.5, 0.5, 0.5]" in result.stdout
    got = np.load(tmp_path / "out.npz")
    with torch.no_grad():
        image = teacher.encode_image(pixels).numpy()
        text = teacher.embed_texts(CAPTIONS).numpy()
    assert (np.sum(image * got["image"], axis=1) > 0.9999).all()
    assert (np.sum(text * got["text"], axis=1) > 0.9999).all()
    ours = teacher.tokenize(CAPTIONS).numpy()  # LiT pads to the longest caption, open_clip to context_length
    assert (got["ids"][:, : ours.shape[1]] == ours).all() and (got["ids"][:, ours.shape[1] :] == 0).all()


def test_clipdistill_local_dir_matches_the_run_after_a_move(
    exported: tuple[str, Path, str], tmp_path: Path, shapes48: Path
) -> None:
    from clipdistill.eval.evaluate import evaluate_model
    from clipdistill.models.teachers import load_model

    spec, out, _ = exported
    moved = tmp_path / "elsewhere" / "teacher-oc"
    shutil.copytree(out, moved)  # its config still names the old place: our loader finds the folder's own
    teacher, unit = _teacher_inputs(spec)
    local = load_model(f"local-dir:{moved}")
    assert local.image_size == teacher.image_size and local.image_mean == teacher.image_mean
    assert local.image_std == teacher.image_std
    torch.testing.assert_close(local.prepare_pixels(unit), teacher.prepare_pixels(unit), rtol=0, atol=0)
    ours, theirs = teacher.tokenize(CAPTIONS), local.tokenize(CAPTIONS)
    assert (theirs[:, : ours.shape[1]] == ours).all() and (theirs[:, ours.shape[1] :] == 0).all()
    # the LiT teacher's frozen stages run as in run: (the same ONNX Runtime prefix, the same bits)
    assert local.frozen_stages == 5 and not local.frozen_prefix.modules[0].training
    pixels = teacher.prepare_pixels(unit)
    assert torch.equal(local.frozen_prefix.run(pixels), teacher.frozen_features(pixels))
    with torch.no_grad():
        image_cos = (teacher.embed_images(unit) * local.embed_images(unit)).sum(-1)
        text_cos = (teacher.embed_texts(CAPTIONS) * local.embed_texts(CAPTIONS)).sum(-1)
    assert (image_cos > 0.9999).all() and (text_cos > 0.9999).all()
    run = evaluate_model(spec, shapes48, split="test", efficiency=False)  # 24 images the head was not fitted on
    folder = evaluate_model(f"local-dir:{moved}", shapes48, split="test", efficiency=False)
    print("test rsum run:", run["rsum"], "local-dir:", folder["rsum"])
    assert abs(run["rsum"] - folder["rsum"]) <= 0.1, (run, folder)
    assert 100 < run["rsum"] < 590  # neither chance nor perfect: the rankings themselves are compared


def test_linear_text_projection_and_a_student_run(
    tmp_path: Path, shapes48: Path, exported: tuple[str, Path, str]
) -> None:
    """``text_proj: linear`` becomes ``hf_proj_type: linear``; a student folder is copied as it is."""
    from clipdistill.export.open_clip import export_open_clip
    from clipdistill.models.students import build_student, save_student, student_config

    torch.manual_seed(0)
    spec = _fitted_teacher(tmp_path / "teacher", shapes48, text_proj="linear", embed_dim=128)
    done = export_open_clip(spec, tmp_path / "oc")
    assert done["kind"] == "lit" and done["check"]["text_min_cosine"] > 0.9999
    cfg = json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())["model_cfg"]
    assert cfg["text_cfg"]["hf_proj_type"] == "linear" and cfg["embed_dim"] == 128

    save_student(build_student(student_config("tiny", image_size=32)), tmp_path / "run" / "model")
    copied = export_open_clip(f"run:{tmp_path / 'run'}", tmp_path / "student-oc")
    assert copied["kind"] == "open_clip" and copied["check"]["image_min_cosine"] > 0.9999
    source = sorted(p.name for p in (tmp_path / "run" / "model").iterdir())
    assert sorted(p.name for p in (tmp_path / "student-oc").iterdir()) == source

    again = export_open_clip(f"local-dir:{exported[1]}", tmp_path / "re-export")  # an export of an export
    assert again["kind"] == "open_clip"
    text_cfg = json.loads((tmp_path / "re-export" / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    assert text_cfg["hf_model_name"] == str((tmp_path / "re-export").resolve())


def test_open_clip_format_refusals(tmp_path: Path, exported: tuple[str, Path, str]) -> None:
    runner = CliRunner()
    spec, out, _ = exported
    zoo = runner.invoke(_app(), ["export", "--model", "openclip:ViT-B-32", "--format", "open_clip", "--out", "x"])
    assert zoo.exit_code == 2 and "--format open_clip writes a LiT teacher" in " ".join(zoo.output.split())
    bad = runner.invoke(_app(), ["export", "--model", spec, "--format", "tflite", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "valid formats are onnx, open_clip" in " ".join(bad.output.split())
    int8 = runner.invoke(_app(), ["export", "--model", spec, "--format", "open_clip", "--int8", "--out", "x"])
    assert int8.exit_code == 2 and "--int8 and --data belong to the ONNX export" in " ".join(int8.output.split())
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "pytorch_model.bin").write_bytes(b"other weights")
    busy = runner.invoke(_app(), ["export", "--model", spec, "--format", "open_clip", "--out", str(tmp_path / "busy")])
    assert busy.exit_code == 2 and "export into an empty folder" in " ".join(busy.output.split())
    same = runner.invoke(_app(), ["export", "--model", f"local-dir:{out}", "--format", "open_clip", "--out", str(out)])
    assert same.exit_code == 2 and "is the folder" in " ".join(same.output.split())
