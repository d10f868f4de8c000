"""ragops.tracking: URI validation and evaluation runs in a real MLflow store (sqlite)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragops.errors import ConfigError

import mlflow  # noqa: E402  (a dependency: a missing one fails, not skips)


@pytest.mark.parametrize(
    ("uri", "message"),
    [("ftp://host/x", "unknown MLflow tracking URI scheme 'ftp'"), ("http://", "has no host")],
)
def test_a_bad_tracking_uri_is_one_clear_error_at_start_up(tmp_path: Path, uri: str, message: str) -> None:
    from ragops.config import load_settings

    with pytest.raises(ConfigError, match=message):
        load_settings([], [f"tracking.mlflow_uri={uri}"], data_dir=tmp_path, environ={})


def test_a_folder_is_a_file_store(tmp_path: Path) -> None:
    from ragops.config import load_settings

    s = load_settings([], [f"tracking.mlflow_uri={tmp_path / 'mlruns'}"], data_dir=tmp_path, environ={})
    assert s.tracking.mlflow_uri == (tmp_path / "mlruns").as_uri()


def test_an_evaluation_is_a_finished_run_with_its_metrics(tmp_path: Path) -> None:
    from ragops.config import load_settings
    from ragops.tracking.mlflow_tracker import log_eval_run

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    settings = load_settings([], [f"tracking.mlflow_uri={uri}"], data_dir=tmp_path, environ={})
    report = {"dense": {"ndcg@10": 0.5, "recall@5": 0.75, "label": "x"}, "hybrid": {"ndcg@10": 0.6}}
    run_id = log_eval_run(settings, "eval-retrieval", report, params={"k": 10})
    run = mlflow.MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["ragops.kind"] == "eval-retrieval"
    assert run.data.metrics == {"dense.ndcg_at_10": 0.5, "dense.recall_at_5": 0.75, "hybrid.ndcg_at_10": 0.6}
    assert run.data.params["eval.k"] == "10" and run.data.params["settings.retrieval.k"] == "10"


def test_no_uri_no_run(tmp_path: Path) -> None:
    from ragops.config import load_settings
    from ragops.tracking.mlflow_tracker import log_eval_run

    assert log_eval_run(load_settings([], [], data_dir=tmp_path, environ={}), "eval-answers", {"token_f1": 1.0}) is None
