"""`ragops job ...` against a real local Ray head (Jobs API, token auth), started by this module.

The head runs on free ports with its own temp dir, beside the session's in-process Ray, and is
stopped (only its own processes) when the module ends. Jobs run the real `ragops` CLI of this
environment with the tiny test models.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.conftest import SAMPLE_DOCS
from tests.ragops.cluster._helpers import cluster_cli

pytestmark = pytest.mark.e2e


def _job_cli(ray_head: Any) -> Any:
    head, env = ray_head
    runner = CliRunner()
    app = cluster_cli()

    def run(*args: str, extra_env: dict[str, Any] | None = None) -> Any:
        return runner.invoke(app, list(args), env={**env, **(extra_env or {})}, catch_exceptions=False)

    run.address = head.dashboard_url  # type: ignore[attr-defined]
    run.environ = {k: v for k, v in env.items() if v is not None}  # type: ignore[attr-defined]
    return run


@pytest.fixture(scope="module")
def job_cli(ray_head: Any) -> Any:
    return _job_cli(ray_head)


def _bounded(call: Any, limit_s: float = 120.0) -> Any:
    """``call()``, failing the test if it has not returned after ``limit_s`` (a hang, not a slow run)."""
    box: list[Any] = []
    t = threading.Thread(target=lambda: box.append(call()), daemon=True)
    t.start()
    t.join(limit_s)
    assert box, f"still waiting after {limit_s:.0f}s: the job hangs instead of failing"
    return box[0]


def _flat(text: str) -> str:
    """Rich wraps long lines when there is no terminal: compare with whitespace collapsed."""
    return " ".join(text.split())


def _train_registered() -> bool:
    try:
        import cli
    except ImportError:  # pragma: no cover
        return False
    names = {g.name for g in cli.app.registered_groups} | {c.name for c in cli.app.registered_commands}
    return "train" in names


def test_cluster_status_reports_the_head(job_cli: Any, ray_head: Any) -> None:
    head, _ = ray_head
    r = job_cli("cluster", "status", "--port", str(head.dashboard_port), "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["running"] is True and data["nodes"] == 1 and data["CPU"] == 2.0
    again = job_cli("cluster", "up", "--port", str(head.dashboard_port), "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["started"] is False  # found, not restarted
    up = json.loads(again.stdout)
    # 2 CPUs: fewer than the default ingest needs (a 2-CPU actor beside a load task); train's 1 fits.
    assert up["CPU"] == 2.0 and len(up["warnings"]) == 1 and "`ragops ingest`" in up["warnings"][0]
    shown = job_cli("cluster", "up", "--port", str(head.dashboard_port))
    assert "registered 2 CPUs, 0 GPUs" in shown.stdout and "fewer than the default `ragops ingest` asks for (2.25 CPUs:" in _flat(shown.stderr)
    from ragops.cluster.localhead import _free_port

    idle = _free_port()
    assert "no local head" in job_cli("cluster", "down", "--port", str(idle)).stdout
    assert job_cli("cluster", "status", "--port", str(idle)).exit_code == 1


def test_ingest_runs_as_a_job(job_cli: Any, tiny_embedder: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "docs").mkdir(parents=True)
    for src in sorted((SAMPLE_DOCS / "ray").glob("*"))[:3]:
        shutil.copy(src, work / "docs" / src.name)
    data_dir = tmp_path / "data"
    r = job_cli(
        "job", "submit", "--address", job_cli.address, "--working-dir", str(work), "--",
        "ragops", "ingest", "docs", "--data-dir", str(data_dir),
        "--set", f"embedder.model={tiny_embedder}",
        "--set", "ingest.chunker.chunk_tokens=64", "--set", "ingest.chunker.overlap_tokens=8",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "SUCCEEDED" in _flat(r.stderr) and "points_written" in r.stdout
    # The default embedding actor (2 CPUs) plus a load task do not fit 2 CPUs: fitted, not hung.
    assert "fitted to this cluster" in _flat(r.stdout) and "ingest.cpus_per_actor=1.75" in _flat(r.stdout)
    # The job's state changes, as `ragops job submit` saw them.
    assert "RUNNING → SUCCEEDED" in _flat(r.stderr)
    # The job wrote where the command said, with the settings it was given.
    from ragops.config import load_settings
    from ragops.index import collection_stats

    settings = load_settings([], [f"embedder.model={tiny_embedder}"], data_dir=data_dir, environ={})
    assert collection_stats(settings)["documents"] == 3
    listed = json.loads(job_cli("job", "list", "--address", job_cli.address, "--json").stdout)["jobs"]
    mine = [j for j in listed if j["metadata"].get("ragops.command") == "ingest"]
    assert mine and mine[0]["status"] == "SUCCEEDED"
    logs = job_cli("job", "logs", mine[0]["submission_id"], "--address", job_cli.address)
    assert logs.exit_code == 0 and "points_written" in logs.stdout
    # No terminal under a job: progress comes as plain lines (done/total, counts, rate, elapsed).
    lines = [ln for ln in logs.stdout.splitlines() if ln.startswith("ingest: ")]
    assert lines and "3/3 files · 3 documents ·" in lines[-1] and "chunks/s" in lines[-1] and "elapsed" in lines[-1]


def test_ingest_that_needs_more_than_the_head_has_fails_at_once(tiny_embedder: Path, tmp_path: Path) -> None:
    from tests.ragops.cluster.conftest import local_head

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n\nSome text about Ray.\n")
    with local_head(1) as small:
        cli = _job_cli(small)
        r = _bounded(lambda: cli(
            "job", "submit", "--address", cli.address, "--working-dir", str(tmp_path), "--",
            "ragops", "ingest", "docs", "--data-dir", str(tmp_path / "data"), "--set", f"embedder.model={tiny_embedder}",
            "--set", "ingest.cpus_per_actor=2",
        ))  # fmt: skip
    assert r.exit_code == 1, r.output
    assert (
        "ingest.cpus_per_actor=2 × ingest.embed_actors=1 needs 2 CPUs on one node, the largest node has 1 CPU: "
        "lower it or add nodes"
    ) in _flat(r.stdout + r.stderr)
    assert "(driver exit code 5)" in _flat(r.stderr)


def test_failing_job_exits_nonzero_with_its_logs(job_cli: Any) -> None:
    r = job_cli(
        "job", "submit", "--address", job_cli.address, "--no-working-dir", "--",
        "python", "-c", "import sys; print('boom-marker'); sys.exit(3)",
    )  # fmt: skip
    assert r.exit_code == 1
    assert "FAILED" in _flat(r.stderr) and "exit code 3" in _flat(r.stderr)
    assert "boom-marker" in _flat(r.stderr)  # the last log lines, repeated on stderr
    missing = job_cli("job", "submit", "--address", job_cli.address, "--no-working-dir", "--env", "RAGOPS_T_NOPE", "--", "echo", "hi")
    assert missing.exit_code == 1 and "RAGOPS_T_NOPE" in _flat(missing.stderr) and "not set" in _flat(missing.stderr)


def test_no_wait_status_and_stop(job_cli: Any) -> None:
    r = job_cli("job", "submit", "--address", job_cli.address, "--no-working-dir", "--no-wait", "--json", "--", "sleep", "120")
    assert r.exit_code == 0, r.output
    job_id = json.loads(r.stdout)["submission_id"]
    assert job_cli("job", "stop", job_id, "--address", job_cli.address).exit_code == 0
    from ragops.cluster.connection import connect
    from ragops.cluster.jobs import JobClient

    client = JobClient(connect(job_cli.address, environ=job_cli.environ))
    assert client.wait(job_id, timeout_s=60, poll_s=0.5)["status"] == "STOPPED"
    status = job_cli("job", "status", job_id, "--address", job_cli.address, "--json")
    assert json.loads(status.stdout)["status"] == "STOPPED"


def test_missing_or_wrong_token_is_one_clear_error(job_cli: Any, tmp_path: Path) -> None:
    no_token = job_cli("job", "list", "--address", job_cli.address, extra_env={"RAGOPS_HEADS_DIR": str(tmp_path)})
    assert no_token.exit_code == 1
    assert "requires a token" in _flat(no_token.stderr) and "RAY_AUTH_TOKEN" in _flat(no_token.stderr)
    assert "Traceback" not in no_token.output
    wrong = job_cli(
        "job", "list", "--address", job_cli.address,
        extra_env={"RAGOPS_HEADS_DIR": str(tmp_path), "RAY_AUTH_TOKEN": "not-the-token"},
    )  # fmt: skip
    assert wrong.exit_code == 1 and "rejected the token from RAY_AUTH_TOKEN" in _flat(wrong.stderr)
    assert "not-the-token" not in wrong.output


def test_embedded_store_job_refused_on_multi_node_cluster(job_cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from ragops.cluster import connection

    before = len(json.loads(job_cli("job", "list", "--address", job_cli.address, "--json").stdout)["jobs"])
    # Three alive nodes, as the State API of a real multi-node cluster reports them.
    monkeypatch.setattr(connection, "alive_nodes", lambda conn: [{"state": "ALIVE"}] * 3)
    r = job_cli("job", "submit", "--address", job_cli.address, "--no-working-dir", "--", "ragops", "ingest", "/data/docs")
    assert r.exit_code == 2
    assert "embedded Qdrant Edge store" in _flat(r.stderr) and "3 nodes" in _flat(r.stderr) and "vectorstore.backend=qdrant" in _flat(r.stderr)
    monkeypatch.undo()
    after = len(json.loads(job_cli("job", "list", "--address", job_cli.address, "--json").stdout)["jobs"])
    assert after == before  # nothing was submitted


@pytest.mark.skipif(not _train_registered(), reason="`ragops train` is not registered in cli.py yet")
def test_train_sft_runs_as_a_job(job_cli: Any, tiny_llm_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "sft.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": str(2 * i)}]}
        for i in range(8)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = job_cli(
        "job", "submit", "--address", job_cli.address, "--no-working-dir", "--",
        "ragops", "train", "sft", "--data", str(data), "--base", str(tiny_llm_dir), "--max-steps", "2",
        "--workers", "1", "--data-dir", str(tmp_path / "data"), "--set", "finetune.cpus_per_worker=1",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "SUCCEEDED" in _flat(r.stderr)


def test_train_with_more_workers_than_cpus_fails_at_once(job_cli: Any, tiny_llm_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "sft.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"{i}?"}, {"role": "assistant", "content": str(i)}]} for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = _bounded(lambda: job_cli(
        "job", "submit", "--address", job_cli.address, "--no-working-dir", "--",
        "ragops", "train", "sft", "--data", str(data), "--base", str(tiny_llm_dir), "--max-steps", "2",
        "--workers", "3", "--data-dir", str(tmp_path / "data"),
    ))  # fmt: skip
    assert r.exit_code == 1, r.output
    text = _flat(r.stdout + r.stderr)
    assert "finetune.cpus_per_worker=1 × finetune.workers=3 needs 3 CPUs in all (3 × 1 CPU)" in text
    assert "room for 2 of 3: lower it or add nodes" in text
