"""Student presets ship as open_clip model-config JSON files (``clipdistill/model_configs/``).

The files must give exactly the networks the presets built when they were Python dicts: the
expected configs below are literal copies of those dicts, and the state_dict digests (sha256 of
every ``name:shape``, sorted) and parameter counts were taken from the dict-built models.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from clipdistill.model_configs import preset_names, read_preset
from clipdistill.models.students import PRESETS, StudentConfigError, build_student, student_config

EXPECTED_CONFIGS = json.loads(
    """
{
  "tiny": {
    "embed_dim": 256,
    "vision_cfg": {"timm_model_name": "efficientvit_m0", "timm_model_pretrained": false, "timm_pool": "avg",
                   "timm_proj": "linear", "timm_proj_bias": false, "image_size": 64},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3}
  },
  "small": {
    "embed_dim": 256,
    "vision_cfg": {"timm_model_name": "fastvit_t8", "timm_model_pretrained": false, "timm_pool": "avg",
                   "timm_proj": "linear", "timm_proj_bias": false, "image_size": 64},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4}
  },
  "base": {
    "embed_dim": 384,
    "vision_cfg": {"timm_model_name": "fastvit_sa12", "timm_model_pretrained": false, "timm_pool": "avg",
                   "timm_proj": "linear", "timm_proj_bias": false, "image_size": 64},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 384, "heads": 6, "layers": 6}
  },
  "lite0": {
    "embed_dim": 384,
    "vision_cfg": {"timm_model_name": "tf_efficientnet_lite0", "timm_model_pretrained": false, "timm_pool": "avg",
                   "timm_proj": "linear", "timm_proj_bias": true, "image_size": 96},
    "text_cfg": {"context_length": 32, "vocab_size": 30522,
                 "hf_tokenizer_name": "sentence-transformers/all-MiniLM-L6-v2", "no_causal_mask": true,
                 "pool_type": "first", "width": 256, "heads": 8, "layers": 2}
  }
}
"""
)
# (sha256 of the sorted "name:shape" lines of the open_clip state_dict, parameters, state_dict entries)
EXPECTED_NETWORKS = {
    "tiny": ("7720cb521835d1e57f806627241e00989a0af189fa5ce687b68e299d48fce7b2", 9161365, 729),
    "small": ("78c5a70b30efd5a40a9567f4ac1daa0b6d216b794bff1722faaae228a749593c", 19335569, 515),
    "base": ("11d2cf8aa9632e1df5335099c9f6d20f474b86479ce5d95c0d49cbdd3e8d59d7", 40729153, 581),
    "lite0": ("b7aa3ddd81c834ba9c9e8632b4fb495a378c54bf7f99c43b3eb0695f3ef472ea", 13363073, 326),
}
PACKAGE = Path(__file__).resolve().parents[1] / "src" / "clipdistill"


def test_every_preset_file_is_in_the_registry_with_the_old_values() -> None:
    assert preset_names() == sorted(EXPECTED_CONFIGS)
    assert set(PRESETS) == set(EXPECTED_CONFIGS)
    for name, expected in EXPECTED_CONFIGS.items():
        assert PRESETS[name] == expected
        assert read_preset(name) == expected
        # key order too: a saved folder's open_clip_config.json (and so a weights fingerprint) is unchanged
        assert json.dumps(PRESETS[name]) == json.dumps(expected)
        assert student_config(name) == expected and student_config(name) is not PRESETS[name]


@pytest.mark.parametrize("name", sorted(EXPECTED_NETWORKS))
def test_a_preset_builds_the_same_network_as_before(name: str) -> None:
    torch.manual_seed(0)
    model = build_student(name)
    state = model.model.state_dict()
    text = "\n".join(f"{key}:{tuple(value.shape)}" for key, value in sorted(state.items()))
    digest = hashlib.sha256(text.encode()).hexdigest()
    assert (digest, sum(p.numel() for p in model.parameters()), len(state)) == EXPECTED_NETWORKS[name]


def test_student_config_takes_an_open_clip_config_file(tmp_path: Path) -> None:
    plain = tmp_path / "my-student.json"  # open_clip's model_configs/NAME.json layout
    plain.write_text(json.dumps(EXPECTED_CONFIGS["tiny"]))
    assert student_config(str(plain)) == EXPECTED_CONFIGS["tiny"]
    resized = student_config(str(plain), image_size=48, layers=2)
    assert resized["vision_cfg"]["image_size"] == 48 and resized["text_cfg"]["layers"] == 2
    folder = tmp_path / "open_clip_config.json"  # a saved folder's config (model_cfg + preprocess_cfg)
    folder.write_text(json.dumps({"model_cfg": EXPECTED_CONFIGS["small"], "preprocess_cfg": {}}))
    assert student_config(str(folder)) == EXPECTED_CONFIGS["small"]
    built = build_student(str(plain))
    assert built.model_cfg == EXPECTED_CONFIGS["tiny"]


def test_bad_config_files_and_names_are_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StudentConfigError, match=r"unknown student preset 'tinny'.*did you mean 'tiny'"):
        student_config("tinny")
    with pytest.raises(StudentConfigError, match="does not exist"):
        student_config(str(tmp_path / "missing.json"))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(StudentConfigError, match="not readable JSON"):
        student_config(str(broken))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(StudentConfigError, match="not an open_clip model config"):
        student_config(str(other))


def test_the_preset_files_are_package_data() -> None:
    """An installed wheel carries the JSON files (the registry is empty without them)."""
    pyproject = tomllib.loads((PACKAGE.parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["clipdistill"]
    shipped = {path for pattern in patterns for path in PACKAGE.glob(pattern)}
    files = set((PACKAGE / "model_configs").glob("*.json"))
    assert len(files) == len(EXPECTED_CONFIGS) and files <= shipped


def test_student_create_help_lists_every_preset() -> None:
    from clipdistill.cli.main import app

    result = CliRunner().invoke(app, ["student", "create", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert all(name in flat for name in preset_names()) and "lite0" in flat
