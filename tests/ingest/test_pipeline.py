"""The ingest pipeline end to end on a real Qdrant Edge shard, with a tiny embedder."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from ragops.ingest.pipeline import run_ingest

from ragops.errors import CollectionError, InputError
from ragops.index import collection_stats, drop_collection
from ragops.manifest import read_records
from ragops.vectorstore import open_store

REPO = Path(__file__).resolve().parents[2]


def _write_corpus(root: Path, n: int = 6) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"doc{i}.md").write_text(
            f"# Document {i}\n\nIntro paragraph {i} about topic{i} and gpus.\n\n"
            f"## Details\n\n" + " ".join(f"word{i}_{j}" for j in range(120)) + "\n"
        )
    (root / "notes.txt").write_text("Plain text notes about kuberay and ray serve.\n")
    return root


def _point_ids(settings) -> set[str]:
    store = open_store(settings.vectorstore, settings.data_dir)
    try:
        return {r.id for r in store.scroll()}
    finally:
        store.close()


def test_first_ingest_then_unchanged_rerun_writes_nothing(make_settings, tmp_path: Path) -> None:
    docs = _write_corpus(tmp_path / "docs")
    s = make_settings()
    first = run_ingest(s, [str(docs)])
    assert first.ok and first.new == 7 and first.updated == 0 and first.unchanged == 0
    assert first.points_written == first.chunks > 7
    ids = _point_ids(s)
    assert len(ids) == first.points_written

    second = run_ingest(s, [str(docs)])
    assert second.ok and second.unchanged == 7 and second.new == second.updated == 0
    assert second.points_written == 0 and second.chunks == 0
    assert _point_ids(s) == ids

    stats = collection_stats(s)
    assert stats["documents"] == 7 and stats["points"] == len(ids) and stats["dim"] == 32
    assert stats["last_ingest"]["unchanged"] == 7 and stats["last_ingest"]["embedder_backend"] == "torch"
    records = read_records(s.data_dir, "ragops")
    assert len(records) == 2
    # Each run records where its time went; the phases add up to no more than the whole run.
    phases = records[0]["timings"]
    assert {"discover", "scan", "pipeline", "write", "optimize"} <= set(phases) and min(phases.values()) >= 0
    assert sum(phases.values()) <= records[0]["duration_s"] + 0.01
    assert "optimize" not in records[1]["timings"]  # nothing written, nothing to optimize


def test_changed_document_replaces_its_chunks(make_settings, tmp_path: Path) -> None:
    docs = _write_corpus(tmp_path / "docs")
    s = make_settings()
    run_ingest(s, [str(docs)])
    before = _point_ids(s)
    (docs / "doc0.md").write_text("# Document 0\n\nCompletely new short text.\n")
    report = run_ingest(s, [str(docs)])
    assert report.updated == 1 and report.unchanged == 6 and report.new == 0
    store = open_store(s.vectorstore, s.data_dir)
    try:
        texts = [r.payload["text"] for r in store.scroll() if r.payload["doc_id"] == "doc0.md"]
    finally:
        store.close()
    assert texts and all("word0_" not in t for t in texts)  # old chunks gone, not beside the new
    after = _point_ids(s)
    assert len(after) < len(before)


def test_prune_deletes_documents_gone_from_source(make_settings, tmp_path: Path) -> None:
    docs = _write_corpus(tmp_path / "docs")
    s = make_settings()
    run_ingest(s, [str(docs)])
    (docs / "doc1.md").unlink()
    kept = run_ingest(s, [str(docs)])
    assert kept.deleted == 0 and collection_stats(s)["documents"] == 7
    pruned = run_ingest(s, [str(docs)], prune=True)
    assert pruned.deleted == 1 and collection_stats(s)["documents"] == 6


def test_bad_files_are_reported_and_the_rest_ingested(make_settings, tmp_path: Path) -> None:
    docs = _write_corpus(tmp_path / "docs", n=2)
    (docs / "binary.txt").write_bytes(b"\x00\x01\x02binary")
    (docs / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (docs / "empty.md").write_text("   \n")
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    (docs / "items.jsonl").write_text('{"id": "a", "text": "alpha text"}\nnot json\n{"id": "b", "text": "beta"}\n')
    s = make_settings()
    report = run_ingest(s, [str(docs)])
    assert not report.ok
    failed = {Path(f.source).name: f.reason for f in report.failed}
    assert {"binary.txt", "latin1.txt", "empty.md", "broken.pdf", "items.jsonl"} <= set(failed)
    assert report.new == 3 + 2  # doc0, doc1, notes + jsonl a, b
    assert collection_stats(s)["documents"] == 5


def test_collection_built_with_another_embedder_is_refused(make_settings, tmp_path: Path) -> None:
    docs = _write_corpus(tmp_path / "docs", n=1)
    s = make_settings()
    run_ingest(s, [str(docs)])
    other = make_settings("embedder.model=minilm-l6", data_dir=s.data_dir)
    with pytest.raises(CollectionError, match="drop"):
        run_ingest(other, [str(docs)])
    assert collection_stats(s)["documents"] == 2  # nothing damaged


def test_missing_root_is_an_input_error(make_settings, tmp_path: Path) -> None:
    with pytest.raises(InputError):
        run_ingest(make_settings(), [str(tmp_path / "nope")])


def test_drop(make_settings, tmp_path: Path) -> None:
    s = make_settings()
    run_ingest(s, [str(_write_corpus(tmp_path / "docs", n=1))])
    assert drop_collection(s, "ragops") is True
    assert drop_collection(s, "ragops") is False
    with pytest.raises(CollectionError):
        collection_stats(s)


def test_second_process_is_refused_while_index_is_open(make_settings, tmp_path: Path) -> None:
    s = make_settings()
    run_ingest(s, [str(_write_corpus(tmp_path / "docs", n=1))])
    store = open_store(s.vectorstore, s.data_dir)
    store.get_spec()
    try:
        code = textwrap.dedent(
            f"""
            from ragops.config import VectorStoreConfig
            from ragops.vectorstore import open_store
            from ragops.errors import StoreLockedError
            from pathlib import Path
            try:
                st = open_store(VectorStoreConfig(), Path({str(s.data_dir)!r}))
                st.get_spec()
                st.count()
            except StoreLockedError as e:
                print("LOCKED", e)
            """
        )
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert "LOCKED" in res.stdout and str(os.getpid()) in res.stdout, res.stdout + res.stderr
    finally:
        store.close()


KILL_SCRIPT = """
import os, signal, sys
from ragops.config import load_settings
from ragops.ingest.pipeline import run_ingest
settings = load_settings([], sys.argv[3:], data_dir=sys.argv[2], environ={})
def die(p):
    # A hard kill once some points are durable: no cleanup, no flush, no manifest record.
    if p["points"] >= int(os.environ["KILL_AFTER_POINTS"]):
        os.kill(os.getpid(), signal.SIGKILL)
run_ingest(settings, [sys.argv[1]], progress=die)
"""


def test_killed_ingest_rerun_equals_uninterrupted(make_settings, tmp_path: Path, tiny_embedder: Path) -> None:
    docs = _write_corpus(tmp_path / "docs", n=30)
    overrides = [
        f"embedder.model={tiny_embedder}",
        "ingest.runner=local",
        "ingest.chunker.chunk_tokens=64",
        "ingest.chunker.overlap_tokens=8",
        "ingest.write_batch_size=16",
        "ingest.docs_per_task=4",
        "ingest.embed_batch_size=16",
    ]
    killed_dir = tmp_path / "killed"
    env = dict(os.environ, KILL_AFTER_POINTS="40")
    res = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(docs), str(killed_dir), *overrides],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == -9, res.stderr  # it really died mid-run
    s_killed = make_settings(*overrides[4:], data_dir=killed_dir)
    partial = _point_ids(s_killed)
    assert 0 < len(partial)

    rerun = run_ingest(s_killed, [str(docs)])
    s_clean = make_settings(*overrides[4:], data_dir=tmp_path / "clean")
    clean = run_ingest(s_clean, [str(docs)])
    assert rerun.ok and clean.ok
    assert _point_ids(s_killed) == _point_ids(s_clean)
    assert collection_stats(s_killed)["documents"] == collection_stats(s_clean)["documents"] == 31
    again = run_ingest(s_killed, [str(docs)])
    assert again.unchanged == 31 and again.points_written == 0


@pytest.mark.usefixtures("ray_local")
def test_ray_runner_matches_local_runner(make_settings, tmp_path: Path) -> None:
    docs = _write_corpus(tmp_path / "docs", n=8)
    s_ray = make_settings("ingest.runner=ray", "ingest.cpus_per_actor=1", data_dir=tmp_path / "ray")
    s_local = make_settings(data_dir=tmp_path / "local")
    r1 = run_ingest(s_ray, [str(docs)])
    r2 = run_ingest(s_local, [str(docs)])
    assert r1.ok and r2.ok and r1.new == r2.new == 9
    assert _point_ids(s_ray) == _point_ids(s_local)
    again = run_ingest(s_ray, [str(docs)])
    assert again.unchanged == 9 and again.points_written == 0


@pytest.mark.usefixtures("ray_local")
def test_a_stalled_ray_pipeline_stops_with_what_is_pending_and_a_rerun_resumes(make_settings, tmp_path: Path) -> None:
    from ragops.watchdog import Stalled

    docs = _write_corpus(tmp_path / "docs", n=4)
    hold = tmp_path / "hold"
    hold.touch()  # the embedding stage waits while this file exists: no batch ever reaches the driver
    stalled = make_settings(
        "ingest.runner=ray", "ingest.cpus_per_actor=1", "runtime.stall_timeout_s=3", f"ingest.test_hold_file={hold}",
        data_dir=tmp_path / "data",
    )  # fmt: skip
    with pytest.raises(Stalled) as exc:
        run_ingest(stalled, [str(docs)])
    msg = str(exc.value)
    assert msg.startswith("ingest made no progress for") and "(0/5 files read, 0 chunks written)" in msg
    assert "pending resource demand:" in msg and "run the same command again to resume" in msg
    hold.unlink()
    again = run_ingest(make_settings("ingest.runner=ray", "ingest.cpus_per_actor=1", data_dir=tmp_path / "data"), [str(docs)])
    assert again.ok and again.new == 5  # every document, all new: nothing was half-written
