"""Config loading: YAML merge, overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from clipdistill.config import ConfigError, TrainConfig, load_config, save_config


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_files_merge_in_order_and_overrides_win(tmp_path: Path) -> None:
    base = _write(tmp_path / "base.yaml", {"data": {"path": "d"}, "optim": {"lr": 0.01, "epochs": 3}})
    method = _write(tmp_path / "m.yaml", {"method": "clipkd", "optim": {"epochs": 5}})
    config = load_config([base, method], ["optim.lr=1e-4", "method_args.w_fd=100", "augment.scale=[0.5, 1.0]"])
    assert config.method == "clipkd"
    assert config.optim.epochs == 5 and config.optim.lr == pytest.approx(1e-4)
    assert config.method_args == {"w_fd": 100}
    assert config.augment.scale == (0.5, 1.0)
    assert config.optim.batch_size == TrainConfig().optim.batch_size  # untouched default


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path / "c.yaml", {"data": {"path": "d"}, "teacher": {"spec": "run:t"}}))
    save_config(config, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", r"unknown config key 'optim.lrr' \(did you mean 'optim.lr'\?\)"),
        ("optimizer.lr=1", r"unknown config key 'optimizer'"),
        ("optim.epochs=ten", r"key 'optim.epochs' must be an integer, got str 'ten'"),
        ("optim.epochs=2.5", r"key 'optim.epochs' must be an integer"),
        ("optim.amp=maybe", r"key 'optim.amp' must be true or false"),
        ("augment.scale=[0.5]", r"key 'augment.scale' must be a list of 2 values"),
        ("data=3", r"key 'data' must be a mapping"),
        ("optim.lr", r"must look like key=value"),
        ("student.image_size=64", r"key 'student.image_size' \(64\) resizes a preset; .* give their own size"),
        ("student.embed_dim=768", r"key 'student.embed_dim' \(768\) widens a preset; .* give their own width"),
    ],
)
def test_bad_keys_and_types_name_the_key(tmp_path: Path, override: str, message: str) -> None:
    base = _write(tmp_path / "c.yaml", {"data": {"path": "d"}, "student": {"model_config": "tiny.json"}})
    with pytest.raises(ConfigError, match=message):
        load_config(base, [override])


def test_missing_data_path_and_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"key 'data\.path' is required"):
        load_config(_write(tmp_path / "c.yaml", {"method": "clip"}))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_shipped_configs_load() -> None:
    root = Path(__file__).resolve().parents[1] / "configs"
    for method_file in sorted((root / "methods").glob("*.yaml")):
        config = load_config([root / "emoji.yaml", method_file])
        assert config.method == method_file.stem
        assert config.name == f"emoji-{method_file.stem}"
