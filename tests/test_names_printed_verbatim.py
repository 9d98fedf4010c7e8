"""Names users choose (datasets, specs, paths) are printed as written: rich's emoji codes
(``:train:`` -> 🚋) and markup (``[b]``) stay text in every console the CLI prints through."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from clipdistill.cli.cache_cmd import cache_app
from clipdistill.cli.common import console, print_metrics
from clipdistill.distill.cache.format import FORMAT, FORMAT_VERSION, MANIFEST_FILE

NAME = "mine:train:"


def _manifest(out: Path, dataset: str) -> None:
    out.mkdir(parents=True)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "counts": {"images": 3, "image_rows": 3, "captions": 6},
        "preprocessing": {"k_augmentations": 1, "image_size": 32, "seed": 0},
        "teacher": {"spec": "run:teachers/:heart:", "embed_dim": 8},
        "dataset": {"name": dataset},
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_cache_info_prints_a_dataset_name_verbatim(tmp_path: Path) -> None:
    out = tmp_path / "cache"
    _manifest(out, NAME)
    result = CliRunner().invoke(cache_app, ["info", str(out)], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert f"on {NAME}:" in result.output and "run:teachers/:heart:" in result.output
    assert "🚋" not in result.output and "❤" not in result.output


def test_shared_console_and_metrics_table_keep_emoji_codes_and_brackets(capsys: object) -> None:
    assert console._emoji is False  # the one console every command module shares
    with console.capture() as captured:
        console.print(f"dataset {NAME}", highlight=False)
    assert captured.get().strip() == f"dataset {NAME}"
    print_metrics(f"local-dir:[b]runs/x[/b] on {NAME}test", {"t2i_R@1": 12.5, "rsum": 80.0})
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    assert f"local-dir:[b]runs/x[/b] on {NAME}test" in out and "🚋" not in out
