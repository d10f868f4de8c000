"""Job specs, address and token resolution, the embedded-store checks: no cluster needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragops.cluster.connection import Connection, auth_error, resolve_address, resolve_token
from ragops.cluster.entrypoint import (
    build_job,
    check_store_placement,
    command_string,
    project_requirements,
    ragops_words,
    settings_options,
)
from ragops.cluster.errors import AuthError, ClusterError, JobRefused
from ragops.cluster.jobs import exit_code_for, last_lines, short_message
from ragops.errors import RagopsError
from ragops.raylocal import driver_address
from tests.ragops.cluster._helpers import REPO


def test_command_string_quotes_arguments_or_keeps_one_shell_line() -> None:
    assert command_string(["ragops", "ingest", "my docs"]) == "ragops ingest 'my docs'"
    assert command_string(["ragops ingest a && ragops index stats"]) == "ragops ingest a && ragops index stats"
    with pytest.raises(RagopsError, match="after --"):
        command_string([])


def test_ragops_words_and_settings_options() -> None:
    assert ragops_words(["ragops", "ingest", "docs"]) == ["ingest"]
    assert ragops_words(["ragops", "train", "sft", "--data", "x"]) == ["train", "sft"]
    assert ragops_words(["/venv/bin/ragops", "eval", "answers"]) == ["eval", "answers"]
    assert ragops_words(["ragops ask 'hi'"]) == ["ask"]
    assert ragops_words(["python", "x.py"]) == []
    argv = ["ragops", "ingest", "d", "-c", "bge", "--config=c.yaml", "--set", "a.b=1", "-s", "x=y=z", "--data-dir", "/d"]
    assert settings_options(argv) == (["bge", "c.yaml"], ["a.b=1", "x=y=z"], "/d")


def test_runtime_env_ships_working_dir_without_pip_or_values(tmp_path: Path) -> None:
    spec = build_job(["ragops", "ingest", "docs", "--data-dir", "/shared"], working_dir=tmp_path, env_names=["QDRANT_API_KEY"])
    assert spec.runtime_env["working_dir"] == str(tmp_path)
    assert ".venv" in spec.runtime_env["excludes"] and ".ragops" in spec.runtime_env["excludes"]
    assert "pip" not in spec.runtime_env and "env_vars" not in spec.runtime_env
    assert spec.entrypoint.endswith("&& ragops ingest docs --data-dir /shared")
    assert "${QDRANT_API_KEY:?" in spec.entrypoint
    assert spec.metadata["ragops.env"] == "QDRANT_API_KEY" and spec.metadata["ragops.command"] == "ingest"
    assert spec.submission_id.startswith("ragops-ingest-")
    assert spec.warnings == []
    with_pip = build_job(["echo"], working_dir=None, pip=["requests==2.32.0"])
    assert with_pip.runtime_env == {"pip": ["requests==2.32.0"]}


def test_env_takes_names_only() -> None:
    with pytest.raises(RagopsError, match="name only"):
        build_job(["echo"], working_dir=None, env_names=["QDRANT_API_KEY=s3cret"])
    with pytest.raises(RagopsError, match="not a valid"):
        build_job(["echo"], working_dir=None, env_names=["1BAD"])


def test_checkout_source_is_not_shipped() -> None:
    spec = build_job(["ragops", "config", "show"], working_dir=REPO)
    assert "/ragops" in spec.runtime_env["excludes"] and "/ingest" in spec.runtime_env["excludes"]


def test_job_settings_come_from_the_command_line(tmp_path: Path) -> None:
    (tmp_path / "job.yaml").write_text("vectorstore: {backend: qdrant, url: 'http://q:6333'}\n")
    spec = build_job(["ragops", "ingest", "d", "--config", "job.yaml", "--set", "retrieval.k=3"], working_dir=tmp_path)
    assert spec.settings is not None and spec.settings.vectorstore.backend == "qdrant" and spec.settings.retrieval.k == 3
    assert any("relative" in w for w in spec.warnings)  # data_dir .ragops would live in the job's temp copy
    with pytest.raises(JobRefused, match="ray.nodes > 1"):
        build_job(["ragops", "ingest", "d", "--set", "ray.nodes=2"], working_dir=None)
    unknown = build_job(["ragops", "ingest", "d", "--config", "/nowhere/x.yaml"], working_dir=None)
    assert unknown.settings is None and any("not checked" in w for w in unknown.warnings)
    assert build_job(["ragops", "models", "list"], working_dir=None).settings is None


def test_embedded_store_refused_on_multi_node_cluster() -> None:
    spec = build_job(["ragops", "ingest", "d", "--data-dir", "/shared"], working_dir=None)
    with pytest.raises(JobRefused, match="3 nodes") as exc:
        check_store_placement(spec, "http://head:8265", is_local=False, node_count=3)
    assert "vectorstore.backend=qdrant" in str(exc.value)
    assert check_store_placement(spec, "http://127.0.0.1:8265", is_local=True, node_count=1) == []
    warn = check_store_placement(spec, "http://head:8265", is_local=False, node_count=1)
    assert len(warn) == 1 and "remote cluster" in warn[0]
    assert len(check_store_placement(spec, "http://head:8265", is_local=False, node_count=None)) == 1
    server = build_job(
        ["ragops", "ingest", "d", "--set", "vectorstore.backend=qdrant", "--set", "vectorstore.url=http://q:6333"],
        working_dir=None,
    )
    assert check_store_placement(server, "http://head:8265", is_local=False, node_count=5) == []


def test_project_requirements(tmp_path: Path) -> None:
    assert any(r.startswith("ray[") for r in project_requirements(REPO))
    with pytest.raises(RagopsError, match="no pyproject"):
        project_requirements(tmp_path)


def test_address_precedence(tmp_path: Path) -> None:
    env = {"RAGOPS_HEADS_DIR": str(tmp_path), "RAY_ADDRESS": "http://env:8265/"}
    assert resolve_address("http://cli:8265", "http://cfg:8265", env) == ("http://cli:8265", "--address")
    assert resolve_address(None, "http://cfg:8265", env) == ("http://env:8265", "RAY_ADDRESS")
    env.pop("RAY_ADDRESS")
    assert resolve_address(None, "http://cfg:8265", env)[1] == "ray.address in the configuration"
    with pytest.raises(ClusterError, match="ragops cluster up"):
        resolve_address(None, "10.0.0.1:6379", env)  # a GCS address is for ray.init, not the Jobs API
    with pytest.raises(ClusterError, match="Ray Client"):
        resolve_address("ray://head:10001", None, env)


def test_token_sources_in_order(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    tok = tmp_path / "tok"
    tok.write_text("from-file")
    base = {"RAGOPS_HEADS_DIR": str(tmp_path / "reg"), "HOME": str(home)}
    url = "http://h:8265"
    assert resolve_token(url, base) == (None, None)  # no RAY_AUTH_MODE: the home file is not sent
    assert resolve_token(url, {**base, "RAY_AUTH_MODE": "token"})[0] == "from-home"
    assert resolve_token(url, {**base, "RAY_AUTH_TOKEN_PATH": str(tok)})[0] == "from-file"
    assert resolve_token(url, {**base, "RAY_AUTH_TOKEN": "t", "RAY_AUTH_TOKEN_PATH": str(tok)}) == ("t", "RAY_AUTH_TOKEN")
    assert resolve_token(url, {**base, "RAY_AUTH_TOKEN": "t", "RAY_AUTH_MODE": "disabled"}) == (None, None)
    with pytest.raises(AuthError, match="cannot read"):
        resolve_token(url, {**base, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})


def test_auth_error_messages_never_show_the_token() -> None:
    missing = auth_error(Connection("http://h:8265", "--address"))
    assert "requires a token" in str(missing) and "RAY_AUTH_MODE=token" in str(missing)
    wrong = auth_error(Connection("http://h:8265", "--address", "s3cret", "RAY_AUTH_TOKEN"), 403)
    assert "rejected the token from RAY_AUTH_TOKEN" in str(wrong) and "s3cret" not in str(wrong)
    assert "s3cret" not in repr(Connection("http://h:8265", "x", "s3cret"))


def test_exit_codes_and_messages() -> None:
    assert [exit_code_for(s) for s in ("SUCCEEDED", "FAILED", "STOPPED")] == [0, 1, 1]
    msg = "Job entrypoint command failed with exit code 3, last available logs (truncated to 20,000 chars):\nboom"
    assert short_message(msg) == "Job entrypoint command failed with exit code 3"
    assert last_lines("a\n\nb\nc\n", 2) == "b\nc"


def test_driver_address_ignores_dashboard_urls() -> None:
    assert driver_address("http://head:8265", "10.0.0.2:6379") == "10.0.0.2:6379"  # inside a job
    assert driver_address("http://head:8265", None) is None
    assert driver_address("10.0.0.1:6379", "10.0.0.2:6379") == "10.0.0.1:6379"
    assert driver_address(None, "http://head:8265") is None
