"""``ragops index reembed`` on real Qdrant Edge shards (and qdrant-client's local mode), tiny embedders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from ragops.errors import CollectionError, ModelNotFoundError, StoreLockedError
from ragops.index import collection_stats, drop_collection
from ragops.ingest.pipeline import run_ingest
from ragops.ingest.reembed import alias_status, rollback, run_reembed
from ragops.manifest import read_records
from ragops.retrieval.search import Retriever
from ragops.vectorstore import open_store
from ragops.vectorstore.aliases import EdgeCatalog, live_settings, slug
from tests.ingest._models import build_sentence_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wide_embedder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny embedder of another dimension (48) than the session's (32)."""
    return build_sentence_model(tmp_path_factory.mktemp("wide-embedder"), 48)


def _corpus(root: Path, n: int = 5) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"doc{i}.md").write_text(
            f"# Guide {i}\n\nIntro about topic{i} and gpus.\n\n## Details\n\n" + " ".join(f"w{i}x{j}" for j in range(90)) + "\n"
        )
    return root


def _points(settings: Any, collection: str | None = None) -> dict[str, Any]:
    """``id → (payload, sparse)`` of the collection ``collection`` resolves to."""
    store = open_store(settings.vectorstore, settings.data_dir, collection)
    try:
        spec = store.get_spec()
        return {r.id: (r.payload, r.sparse) for r in store.scroll(with_sparse=bool(spec and spec.sparse))}
    finally:
        store.close()


def _search_ids(settings: Any, query: str, mode: str, k: int = 5, collection: str | None = None) -> list[str]:
    with Retriever(settings, collection=collection) as r:
        return [h.chunk_id for h in r.search(query, k=k, mode=mode).hits]


def _bm25(settings: Any, query: str) -> dict[str, float]:
    """Chunk id → BM25 score of every match (ties make the order of equal scores arbitrary)."""
    with Retriever(settings) as r:
        return {h.chunk_id: round(h.score, 5) for h in r.search(query, k=100, mode="sparse").hits}


@pytest.fixture
def ingested(make_settings, tmp_path: Path) -> tuple[Any, Path]:
    docs = _corpus(tmp_path / "docs")
    settings = make_settings()
    assert run_ingest(settings, [str(docs)]).ok
    return settings, docs


def _without_fingerprint(payload: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in payload.items() if k != "fingerprint"}


def test_reembed_to_another_dimension_carries_chunks_and_switches(ingested, wide_embedder: Path) -> None:
    s, docs = ingested
    before = _points(s)
    sparse_hits = _bm25(s, "topic3 gpus")
    report = run_reembed(s, str(wide_embedder), batch_size=7)

    assert report.source == "ragops" and report.target == "ragops__wide-model-1"
    assert report.dim == 48 and report.previous_dim == 32 and report.previous_embedder == s.embedder.model
    assert report.points == report.written == len(before) and report.skipped == report.removed == 0
    assert report.fingerprints_updated == len(before) and report.fingerprints_kept == 0
    assert not report.resumed and not report.snapshot_read

    after = _points(s)
    assert set(after) == set(before)  # unchanged chunk ids
    for pid, (payload, sparse) in after.items():
        old_payload, old_sparse = before[pid]
        assert _without_fingerprint(payload) == _without_fingerprint(old_payload)
        assert sparse is not None and old_sparse is not None
        assert sparse.indices == old_sparse.indices and sparse.values == pytest.approx(old_sparse.values)
    with open_store(s.vectorstore, s.data_dir) as store:
        assert store.collection == report.target and store.get_spec().dim == 48

    # The configured (explicit) embedder is the one the alias served before: search follows it.
    followed, physical = live_settings(s)
    assert followed.embedder.model == str(wide_embedder) and physical == report.target
    assert _bm25(s, "topic3 gpus") == sparse_hits  # BM25 vectors (and so scores) untouched
    dense = _search_ids(s, "topic3 gpus", "dense", k=len(before))
    assert set(dense) == set(before)  # every chunk reachable with the new 48-dim query vectors

    # Re-ingesting the same folder is a no-op against the aliased collection.
    again = run_ingest(s, [str(docs)])
    assert again.ok and again.unchanged == 5 and again.points_written == 0 and again.collection == "ragops"
    kinds = [r.get("kind", "ingest") for r in read_records(s.data_dir, "ragops")]
    assert kinds == ["ingest", "reembed", "ingest"]
    stats = collection_stats(s)
    assert stats["collection"] == "ragops" and stats["dim"] == 48 and stats["embedder"] == str(wide_embedder)
    assert stats["alias"] == {"collection": report.target, "chain": [report.target, "ragops"]}
    assert stats["last_ingest"]["unchanged"] == 5

    # A changed document is re-chunked and embedded with the live (new) embedder.
    (docs / "doc1.md").write_text("# Guide 1\n\nRewritten about quantum annealing.\n")
    changed = run_ingest(s, [str(docs)])
    assert changed.ok and changed.updated == 1 and changed.unchanged == 4
    assert _search_ids(s, "quantum annealing", "sparse", k=1)


def test_rollback_switches_back_and_reembed_again_resumes(ingested, wide_embedder: Path) -> None:
    s, _ = ingested
    with pytest.raises(CollectionError, match="never been re-embedded"):
        rollback(s)
    before = _points(s)
    first = run_reembed(s, str(wide_embedder))
    back = rollback(s)
    assert back.source == first.target and back.target == "ragops" and back.dim == 32
    assert EdgeCatalog(s.data_dir).resolve("ragops") == "ragops"
    assert set(_points(s)) == set(before)
    assert _search_ids(s, "topic2", "dense")  # the old 32-dim collection, old embedder
    with pytest.raises(CollectionError, match="replaced no collection"):
        rollback(s)
    # The live collection cannot be dropped; the rolled-back-from one keeps its vectors.
    with pytest.raises(CollectionError, match="cannot be dropped"):
        drop_collection(s, "ragops")
    again = run_reembed(s, str(wide_embedder))
    assert again.resumed and again.target == first.target and again.written == 0 and again.skipped == len(before)
    assert alias_status(s)["chain"] == [first.target, "ragops"]


def test_killed_midway_leaves_alias_and_old_collection_then_resumes(ingested, wide_embedder: Path, monkeypatch) -> None:
    from ragops.embeddings import TextEmbedder

    s, _ = ingested
    before = _points(s)
    hits = _search_ids(s, "topic4", "hybrid")
    real = TextEmbedder.encode_passages
    calls = {"n": 0}

    def dies_on_third(self, texts, batch_size=None):  # noqa: ANN001
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # what Ctrl-C mid-run raises
        return real(self, texts, batch_size)

    monkeypatch.setattr(TextEmbedder, "encode_passages", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_reembed(s, str(wide_embedder), batch_size=4)
    cat = EdgeCatalog(s.data_dir)
    assert cat.resolve("ragops") is None  # nothing served changed
    assert _points(s) == before and _search_ids(s, "topic4", "hybrid") == hits
    assert cat.lineage("ragops__wide-model-1").state == "building"

    monkeypatch.setattr(TextEmbedder, "encode_passages", real)
    done = run_reembed(s, str(wide_embedder), batch_size=4)
    assert done.resumed and done.target == "ragops__wide-model-1"
    assert done.skipped == 8 and done.written == len(before) - 8 and done.points == len(before)
    assert cat.lineage(done.target).state == "complete" and cat.resolve("ragops") == done.target


def test_resume_drops_points_of_chunks_gone_from_the_source(ingested, wide_embedder: Path, monkeypatch) -> None:
    from ragops.embeddings import TextEmbedder

    s, docs = ingested
    real = TextEmbedder.encode_passages
    calls = {"n": 0}

    def dies_late(self, texts, batch_size=None):  # noqa: ANN001
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("killed")
        return real(self, texts, batch_size)

    monkeypatch.setattr(TextEmbedder, "encode_passages", dies_late)
    with pytest.raises(RuntimeError):
        run_reembed(s, str(wide_embedder), batch_size=4)
    monkeypatch.setattr(TextEmbedder, "encode_passages", real)
    (docs / "doc0.md").unlink()
    assert run_ingest(s, [str(docs)], prune=True).deleted == 1  # the source changes between the two runs
    done = run_reembed(s, str(wide_embedder), batch_size=4)
    assert done.resumed and set(_points(s)) == set(_points(s, "ragops__wide-model-1"))
    with open_store(s.vectorstore, s.data_dir, "ragops") as live:
        assert live.count() == done.points and not [r for r in live.scroll() if r.payload["doc_id"] == "doc0.md"]


def test_bad_inputs_change_nothing(ingested, wide_embedder: Path, make_settings, tiny_embedder: Path) -> None:
    s, _ = ingested
    with pytest.raises(ModelNotFoundError):
        run_reembed(s, "/nonexistent/embedder")
    with pytest.raises(ModelNotFoundError):
        run_reembed(s, "no-such-registry-model")
    with pytest.raises(CollectionError, match="already embedded"):
        run_reembed(s, str(tiny_embedder))
    with pytest.raises(CollectionError, match="does not exist"):
        run_reembed(s, str(wide_embedder), collection="missing")
    assert EdgeCatalog(s.data_dir).collections() == ["ragops"] and not (s.data_dir / "aliases" / "ragops.json").exists()

    run_reembed(s, str(wide_embedder))
    # An explicitly configured embedder the alias never served is refused, naming both fixes.
    other = make_settings("embedder.model=minilm-l6", data_dir=s.data_dir)
    with pytest.raises(CollectionError) as exc:
        Retriever(other)
    assert "--set embedder.model=" in str(exc.value) and "ragops index reembed --embedder minilm-l6" in str(exc.value)
    # The physical collections stay addressable by name, with the usual embedder check.
    assert _search_ids(s, "topic1", "dense", collection="ragops")
    with pytest.raises(CollectionError, match="reembed"):
        _search_ids(s, "topic1", "dense", collection="ragops__wide-model-1")


def test_drop_old_collection_then_rollback_has_nowhere_to_go(ingested, wide_embedder: Path) -> None:
    s, _ = ingested
    report = run_reembed(s, str(wide_embedder))
    with pytest.raises(CollectionError, match="is served by alias 'ragops'"):
        drop_collection(s, report.target)  # the live one, by its own name
    assert drop_collection(s, "ragops")  # the pre-alias collection of that name, no longer served
    assert _search_ids(s, "topic1", "dense")  # still served by the new one
    with pytest.raises(CollectionError, match="no longer exists"):
        rollback(s)


def test_slug_names() -> None:
    assert slug("bge-small") == "bge-small"
    assert slug("/models/my model/st") == "my-model"
    assert slug("org/Some_Model.v2") == "Some_Model.v2"


_HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from ragops.vectorstore.edge import EdgeStore
    store = EdgeStore(Path(sys.argv[1]), "ragops")
    Path(sys.argv[2]).write_text("open")
    time.sleep(120)
""")


def _hold(data_dir: Path, tmp_path: Path, *extra: str) -> subprocess.Popen:
    ready = tmp_path / f"ready-{len(extra)}"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(data_dir), str(ready), *extra], cwd=REPO)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    return proc


def test_shard_held_by_a_reader_is_read_from_a_copy_and_a_writer_refuses(ingested, wide_embedder: Path,
                                                                          tmp_path: Path) -> None:  # fmt: skip
    s, _ = ingested
    before = _points(s)
    writer = _hold(s.data_dir, tmp_path, "ingest")  # its command line looks like an ingest's
    try:
        with pytest.raises(StoreLockedError, match="in use by PID"):
            run_reembed(s, str(wide_embedder))
    finally:
        writer.kill()
        writer.wait()
    reader = _hold(s.data_dir, tmp_path)  # e.g. `ragops serve`
    try:
        report = run_reembed(s, str(wide_embedder))
    finally:
        reader.kill()
        reader.wait()
    assert report.snapshot_read and report.points == len(before)
    assert not (s.data_dir / "tmp" / f"reembed-{os.getpid()}").exists()
    assert set(_points(s)) == set(before)


def test_cli_reembed_json_and_rollback(ingested, wide_embedder: Path, tiny_embedder: Path) -> None:
    from cli import app

    s, _ = ingested
    base = ["--data-dir", str(s.data_dir), "--set", f"embedder.model={tiny_embedder}", "--set", "ingest.chunker.chunk_tokens=64",
            "--set", "ingest.chunker.overlap_tokens=8"]  # fmt: skip
    runner = CliRunner()
    helptext = " ".join(runner.invoke(app, ["index", "reembed", "--help"]).output.split())
    assert "--rollback" in helptext and "--batch-size" in helptext and "Embedded (Edge) store" in helptext
    both = runner.invoke(app, ["index", "reembed", *base, "--embedder", str(wide_embedder), "--rollback"])
    assert both.exit_code != 0 and "either --embedder" in both.output
    res = runner.invoke(app, ["index", "reembed", *base, "--embedder", str(wide_embedder), "--batch-size", "5", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["action"] == "reembed" and data["target"] == "ragops__wide-model-1" and data["dim"] == 48
    assert data["chunks_per_s"] > 0
    hits = runner.invoke(app, ["search", "topic2", *base, "--mode", "dense", "--json"])
    assert hits.exit_code == 0 and json.loads(hits.stdout)["hits"]
    back = runner.invoke(app, ["index", "reembed", *base, "--rollback", "--json"])
    assert back.exit_code == 0 and json.loads(back.stdout)["target"] == "ragops"
    bad = runner.invoke(app, ["index", "reembed", *base, "--rollback"])
    assert bad.exit_code != 0 and "nothing to roll back to" in " ".join(bad.output.split())


def test_qdrant_client_local_mode_uses_native_aliases(make_settings, tmp_path: Path, wide_embedder: Path) -> None:
    from qdrant_client import QdrantClient

    folder = tmp_path / "qdrant"
    s = make_settings("vectorstore.backend=qdrant", f"vectorstore.url=path:{folder}")
    docs = _corpus(tmp_path / "docs", 3)
    assert run_ingest(s, [str(docs)]).ok
    before = _points(s)
    # Qdrant refuses an alias named like a collection: a plain one is re-embedded under a new name.
    with pytest.raises(CollectionError, match="--alias NEW_NAME"):
        run_reembed(s, str(wide_embedder))
    report = run_reembed(s, str(wide_embedder), alias="docs")
    assert report.source == "ragops" and report.target == "docs__wide-model-1"
    client = QdrantClient(path=str(folder))
    try:
        aliases = {a.alias_name: a.collection_name for a in client.get_aliases().aliases}
        metadata = client.get_collection(report.target).config.metadata
    finally:
        client.close()
    assert aliases == {"docs": report.target}
    assert metadata["ragops_reembed"]["replaces"] == "ragops" and metadata["ragops_reembed"]["state"] == "complete"
    assert set(_points(s, "docs")) == set(before)
    assert _search_ids(s, "topic1", "dense", collection="docs")
    # A second re-embed of the alias switches in place (delete + create alias in one request).
    second = run_reembed(s, "minilm-l6", collection="docs")  # a registry name (the packaged MiniLM)
    assert second.source == report.target and second.target == "docs__minilm-l6-2" and second.dim == 384
    assert rollback(s, collection="docs").target == report.target
    assert rollback(s, collection="docs").target == "ragops"
