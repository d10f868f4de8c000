"""CLI behaviour that needs no training: help, flags, errors, empty registries."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from tests.finetune.conftest import write_jsonl
from tests.finetune.test_train import cli


def test_train_flags_are_documented() -> None:
    result = CliRunner().invoke(cli(), ["train", "sft", "--help"])
    assert result.exit_code == 0
    for flag in ("--data", "--base", "--workers", "--gpu", "--max-steps", "--resume", "--tag", "--config", "--set", "--json", "--data-dir"):
        assert flag in result.stdout
    assert CliRunner().invoke(cli(), ["train", "reward", "--help"]).exit_code == 0


def test_malformed_data_exits_with_file_and_line(tmp_path: Path, tiny_base: Path) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"question": "q", "answer": "a", "contexts": ["x"]}', "{oops"])
    result = CliRunner().invoke(
        cli(),
        ["train", "sft", "--data", str(bad), "--data-dir", str(tmp_path / "home"), "--set", f"finetune.base_model={tiny_base}",
         "--set", "finetune.data.runner=local"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert f"{bad}:2: not valid JSON" in " ".join(result.stderr.split())  # rich wraps long lines


def test_bad_tag_and_empty_listings(tmp_path: Path) -> None:
    home = ["--data-dir", str(tmp_path / "home")]
    result = CliRunner().invoke(cli(), ["train", "sft", "--data", "x.jsonl", "--tag", "novalue", *home])
    assert result.exit_code == 2 and "--tag 'novalue'" in result.stderr
    assert "no trained artifacts" in CliRunner().invoke(cli(), ["models", "list", *home]).stdout
    assert "no runs" in CliRunner().invoke(cli(), ["runs", "list", *home]).stdout
    result = CliRunner().invoke(cli(), ["models", "rollback", "prod", *home])
    assert result.exit_code == 2 and "unknown alias 'prod'" in result.stderr
    result = CliRunner().invoke(cli(), ["models", "show", "nope", *home])
    assert result.exit_code == 1 and "no artifact or alias 'nope'" in result.stderr
    shown = CliRunner().invoke(cli(), ["models", "show", "smollm2-135m-instruct", "--json", *home])
    assert shown.exit_code == 0 and '"generator"' in shown.stdout
