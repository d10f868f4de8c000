"""MLflow tracking against a real MLflow store (sqlite, offline): runs, per-step metrics, registry aliases."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.finetune.conftest import metrics_by_step

import mlflow  # noqa: E402  (a dependency: a missing one fails, not skips)


def _client(uri: str) -> Any:
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_an_sft_run_and_its_aliases_are_mirrored_into_mlflow(tmp_path: Path, sft_file: Path, ft_settings: Callable[..., Any]) -> None:
    from typer.testing import CliRunner

    from ragops.cli import app
    from ragops.finetune.train import train
    from ragops.runs import RunStore

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = ft_settings("finetune.runner=local", f"tracking.mlflow_uri={uri}", "tracking.experiment=exp1")
    result = train(settings, "sft", sft_file, max_steps=4, tags={"team": "search"})

    client = _client(uri)
    exp = client.get_experiment_by_name("exp1")
    assert exp.artifact_location == (tmp_path / "mlartifacts").as_uri()  # beside the store, not in the cwd
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == result.run.run_id
    assert result.run.mlflow_run_id == run.info.run_id  # remembered for --resume
    tags = run.data.tags
    assert tags["ragops.kind"] == "sft" and tags["team"] == "search"
    assert tags["ragops.data_hash"] == result.run.data["hash"] and tags["ragops.artifact"] == result.artifact.name
    assert run.data.params["settings.finetune.runner"] == "local"
    assert run.data.params["settings.tracking.experiment"] == "exp1"

    # Every step's loss, at its step number, matches ragops' own record.
    ours = {s: r["loss"] for s, r in metrics_by_step(RunStore.from_settings(settings).metrics(result.run.run_id)).items() if "loss" in r}
    theirs = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert ours and {s: pytest.approx(v) for s, v in ours.items()} == theirs
    assert "ragops/artifact.json" in [f.path for f in client.list_artifacts(run.info.run_id, "ragops")]

    # The artifact is a model version; promote and rollback move the MLflow alias too.
    (v1,) = client.search_model_versions("name = 'exp1-sft'")
    assert v1.tags["ragops.artifact"] == result.artifact.name and v1.run_id == run.info.run_id
    second = train(settings, "sft", sft_file, max_steps=2)
    runner = CliRunner()
    env = {"RAGOPS_TRACKING__MLFLOW_URI": uri, "RAGOPS_TRACKING__EXPERIMENT": "exp1"}
    common = ["--data-dir", str(settings.data_dir), "--set", f"finetune.base_model={settings.finetune.base_model}"]
    for name in (result.artifact.name, second.artifact.name):
        r = runner.invoke(app, ["models", "promote", name, "--alias", "prod", *common], env=env)
        assert r.exit_code == 0, r.output
    assert client.get_model_version_by_alias("exp1-sft", "prod").tags["ragops.artifact"] == second.artifact.name
    r = runner.invoke(app, ["models", "rollback", "prod", *common], env=env)
    assert r.exit_code == 0, r.output
    assert client.get_model_version_by_alias("exp1-sft", "prod").tags["ragops.artifact"] == result.artifact.name


def test_an_unreachable_server_warns_once_and_training_goes_on(
    sft_file: Path, ft_settings: Callable[..., Any], capfd: pytest.CaptureFixture[str], spans: Any
) -> None:
    from ragops.finetune.train import train
    from ragops.runs import RunStore

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = ft_settings("finetune.runner=local", f"tracking.mlflow_uri=http://127.0.0.1:{port}", "tracking.timeout_s=1")
    result = train(settings, "sft", sft_file, max_steps=3)
    assert result.run.status == "finished" and result.run.mlflow_run_id is None
    assert len(RunStore.from_settings(settings).metrics(result.run.run_id)) >= 3  # nothing lost on our side
    err = capfd.readouterr().err
    assert err.count("MLflow at http://127.0.0.1") == 1, err
    # The run's phases are spans (telemetry), under one root per run.
    done = {s.name: s for s in spans.get_finished_spans()}
    root = done["train.sft"]
    assert root.attributes["ragops.run_id"] == result.run.run_id and root.attributes["ragops.artifact"] == result.artifact.name
    for phase in ("train.fit", "train.publish"):
        assert done[phase].parent.span_id == root.context.span_id

