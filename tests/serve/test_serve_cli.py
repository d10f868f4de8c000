"""``ragops serve`` refusals that happen before anything starts (no Ray needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from ragops.commands.serve import serve_command


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_embedder: Path):
    for var in ("RAGOPS_API_KEYS_CHAT", "RAGOPS_API_KEYS_ADMIN"):
        monkeypatch.delenv(var, raising=False)
    app = typer.Typer()
    app.command("serve")(serve_command)
    app.command("version")(lambda: None)  # two commands: typer keeps `serve` as a sub-command

    def invoke(*args: str, env: dict[str, str] | None = None):
        argv = ["serve", "--data-dir", str(tmp_path / "data"), "--set", f"embedder.model={tiny_embedder}", *args]
        return CliRunner().invoke(app, argv, env=env)

    return invoke


def test_help_explains_the_command(run) -> None:
    res = run("--help")
    assert res.exit_code == 0 and "--insecure" in res.output and "RAGOPS_API_KEYS_CHAT" in res.output


def test_public_address_without_keys_is_refused(run) -> None:
    res = run("--host", "0.0.0.0")
    assert res.exit_code == 2
    assert "refusing to bind 0.0.0.0 without API keys" in res.output and "--insecure" in res.output


def test_more_retrievers_than_the_edge_store_allows_is_refused(run) -> None:
    res = run("--set", "serve.retriever.autoscaling.max_replicas=3")
    assert res.exit_code == 2 and "one process only" in res.output


def test_missing_collection_is_reported_before_starting(run) -> None:
    res = run("--host", "0.0.0.0", env={"RAGOPS_API_KEYS_CHAT": "k"})
    assert res.exit_code == 1 and "does not exist" in res.output and "ragops ingest" in res.output
