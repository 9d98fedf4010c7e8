"""Hub specs on a machine without the hub: one line naming the spec, the cache looked
in and how to pass local weights, never a traceback or (hf-hub) a silent fallback to random weights.

Every run here is a subprocess with ``HF_HUB_OFFLINE=1`` and an empty ``HF_HOME``, so no network
is attempted and nothing cached elsewhere on the machine is found. A fresh interpreter importing
torch and open_clip costs about 10 s on 2 cores, so the module is marked e2e.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def _offline_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "hf_home"
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "XDG_CACHE_HOME": str(tmp_path / "xdg"),
        "COLUMNS": "80",  # a narrow terminal must not wrap the message into several lines
    }


def test_eval_with_an_uncached_zoo_tag_is_one_line_naming_spec_cache_and_local_weights(
    tmp_path: Path, shapes_dataset_dir: Path
) -> None:
    spec = "openclip:ViT-B-32@laion2b_s34b_b79k"
    command = ["eval", "--model", spec, "--data", str(shapes_dataset_dir), "--out", str(tmp_path / "m.json")]
    result = subprocess.run(
        [sys.executable, "-m", "clipdistill.cli.main", *command, "--no-efficiency"],
        env=_offline_env(tmp_path),
        capture_output=True,
        text=True,
        check=False,
    )
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 2, output
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    line = lines[0]
    assert f"cannot load {spec!r}" in line
    assert str(tmp_path / "hf_home" / "hub") in line  # the cache it looked in
    assert "local-dir:" in line and "openclip:ViT-B-32@/path/to/weights" in line  # how to pass local weights


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        ("hf-hub:timm/ViT-B-16-SigLIP", ["its open_clip_config.json", "local-dir:"]),
        ("hf:openai/clip-vit-base-patch32", ["model 'openai/clip-vit-base-patch32'", "hf:/path/to/folder"]),
        ("openclip:RN50@openai", ["the weights of tag 'openai'", "openclip:RN50@/path/to/weights"]),
    ],
)
def test_other_hub_specs_offline(tmp_path: Path, spec: str, names: list[str]) -> None:
    code = (
        "import json, sys\n"
        "from clipdistill.models.spec import ModelSpecError\n"
        "from clipdistill.models.teachers import load_model\n"
        "try:\n"
        f"    load_model({spec!r})\n"
        "except ModelSpecError as error:\n"
        "    print(json.dumps(str(error)))\n"
        "else:\n"
        "    sys.exit('loaded')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=_offline_env(tmp_path), capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    message = json.loads(result.stdout.strip().splitlines()[-1])
    assert "\n" not in message and message.startswith(f"cannot load {spec!r}")
    assert str(tmp_path / "hf_home" / "hub") in message
    for name in names:
        assert name in message, message
