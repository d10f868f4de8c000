"""Both vector-store backends against the same behaviour: Qdrant Edge on a tmp dir, and the
server backend on qdrant-client's local mode (``:memory:``), which speaks the server's API.

Data: 6 documents x 5 chunks, random unit vectors of dim 8, and hand-made sparse vectors in
which term ``i`` belongs to point ``i`` only and term ``100 + d`` to every chunk of doc ``d``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

from ragops.config import VectorStoreConfig
from ragops.errors import CollectionError, ConfigError, StoreLockedError
from ragops.vectorstore import (
    CollectionSpec,
    Filter,
    Match,
    Point,
    SearchRequest,
    SparseVector,
    VectorStore,
    open_store,
)
from ragops.vectorstore.edge import EdgeStore
from ragops.vectorstore.server import QdrantServerStore
from ragops.vectorstore.translate import client_filter, edge_filter

DIM = 8
DOCS = 6
CHUNKS = 5
N = DOCS * CHUNKS
SPEC = CollectionSpec(name="c", dim=DIM, embedder="test-embedder")
_rng = np.random.default_rng(7)
VECS = _rng.normal(size=(N, DIM)).astype(np.float32)
VECS /= np.linalg.norm(VECS, axis=1, keepdims=True)
IDS = [str(uuid.uuid5(uuid.NAMESPACE_URL, f"p{i}")) for i in range(N)]


def doc_of(i: int) -> int:
    return i // CHUNKS


def make_points(fingerprint: str = "f1", text_prefix: str = "chunk") -> list[Point]:
    return [
        Point(
            id=IDS[i],
            vector=VECS[i],  # numpy row: the backends must accept arrays
            sparse=SparseVector(indices=[i, 100 + doc_of(i)], values=[1.0, 0.5]),
            payload={
                "doc_id": f"d{doc_of(i)}",
                "chunk_index": i % CHUNKS,
                "content_hash": f"h{doc_of(i)}",
                "fingerprint": fingerprint,
                "source": f"/docs/d{doc_of(i)}.md",
                "tags": ["even" if doc_of(i) % 2 == 0 else "odd", "all"],
                "lang": "en" if i % 3 else "fr",
                "text": f"{text_prefix} {i}",
            },
        )
        for i in range(N)
    ]


def make_store(backend: str, data_dir: Path, collection: str = "c") -> VectorStore:
    if backend == "edge":
        cfg = VectorStoreConfig(backend="edge", collection=collection)
    else:
        cfg = VectorStoreConfig(backend="qdrant", url=":memory:", collection=collection)
    return open_store(cfg, data_dir)


@pytest.fixture(params=["edge", "qdrant"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def empty_store(backend: str, tmp_path: Path):
    store = make_store(backend, tmp_path)
    yield store
    store.close()


@pytest.fixture
def store(empty_store: VectorStore) -> VectorStore:
    empty_store.ensure_collection(SPEC)
    empty_store.upsert(make_points())
    return empty_store


def ids_of(hits) -> list[str]:
    return [h.id for h in hits]


# ---------------------------------------------------------------------------------------
# open_store and collections
# ---------------------------------------------------------------------------------------


def test_open_store_picks_backend_and_collection_override(tmp_path: Path) -> None:
    edge = open_store(VectorStoreConfig(), tmp_path, collection="other")
    server = open_store(VectorStoreConfig(backend="qdrant", url=":memory:"), tmp_path)
    try:
        assert isinstance(edge, EdgeStore) and edge.collection == "other"
        assert isinstance(server, QdrantServerStore) and server.collection == "ragops"
        assert isinstance(edge, VectorStore) and isinstance(server, VectorStore)
    finally:
        edge.close()
        server.close()
    with pytest.raises(ConfigError, match="not understood"):
        open_store(VectorStoreConfig(backend="qdrant", url="qdrant:6333"), tmp_path)


def test_edge_creates_nothing_until_ensure(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path, "lazy")
    assert store.get_spec() is None
    assert not (tmp_path / "collections").exists()
    store.ensure_collection(SPEC)
    coll = tmp_path / "collections" / "lazy"
    assert (coll / "shard").is_dir() and (coll / "collection.json").is_file()
    assert (coll / "ragops.pid").read_text().split("\n")[0] == str(os.getpid())
    store.close()
    assert not (coll / "ragops.pid").exists()


def test_ensure_collection_creates_then_checks(empty_store: VectorStore) -> None:
    assert empty_store.get_spec() is None
    empty_store.ensure_collection(SPEC)
    assert empty_store.get_spec() == SPEC
    empty_store.ensure_collection(SPEC)  # same spec again: fine
    for other in (
        CollectionSpec(name="c", dim=16, embedder="test-embedder"),
        CollectionSpec(name="c", dim=DIM, embedder="bge-small"),
        CollectionSpec(name="c", dim=DIM, embedder="test-embedder", sparse=False),
    ):
        with pytest.raises(CollectionError) as err:
            empty_store.ensure_collection(other)
        msg = str(err.value)
        assert "embedder 'test-embedder' (dim 8" in msg
        assert "--collection" in msg and "ragops index drop --collection c" in msg


def test_operations_on_missing_collection_fail_clearly(empty_store: VectorStore) -> None:
    with pytest.raises(CollectionError, match="does not exist"):
        empty_store.count()
    with pytest.raises(CollectionError, match="ragops ingest"):
        empty_store.upsert(make_points()[:1])


def test_server_spec_lives_in_collection_metadata() -> None:
    store = QdrantServerStore.from_url(":memory:", "c")
    store.ensure_collection(SPEC)
    metadata = store.client.get_collection("c").config.metadata
    assert metadata["ragops_spec"]["embedder"] == "test-embedder"
    # A collection made by another tool has no spec: ragops refuses to write into it.
    from qdrant_client import models as qm

    store.client.create_collection("foreign", vectors_config={"dense": qm.VectorParams(size=DIM, distance=qm.Distance.COSINE)})
    foreign = QdrantServerStore(store.client, "foreign", owns_client=False)
    assert foreign.get_spec().dim == DIM
    with pytest.raises(CollectionError, match="unknown"):
        foreign.ensure_collection(CollectionSpec(name="foreign", dim=DIM, embedder="x", sparse=False))
    store.close()


# ---------------------------------------------------------------------------------------
# writes
# ---------------------------------------------------------------------------------------


def test_upsert_is_idempotent_and_overwrites(store: VectorStore) -> None:
    assert store.count() == N
    store.upsert(make_points(text_prefix="new"))
    assert store.count() == N
    assert store.retrieve([IDS[3]])[0].payload["text"] == "new 3"


def test_upsert_rejects_wrong_dimension(store: VectorStore) -> None:
    with pytest.raises(ValueError, match="expects 8"):
        store.upsert([Point(id=IDS[0], vector=[0.1] * 3, payload={})])


def test_count_with_filter(store: VectorStore) -> None:
    assert store.count(Filter(must=[Match("doc_id", ["d1"])])) == CHUNKS
    assert store.count(Filter(must=[Match("doc_id", ["d1", "d2"])])) == 2 * CHUNKS
    assert store.count(Filter(must=[Match("tags", ["even"])])) == 3 * CHUNKS
    assert store.count(Filter(must=[Match("chunk_index", [0])])) == DOCS
    assert store.count(Filter(must_not=[Match("doc_id", ["d0"])])) == N - CHUNKS
    assert store.count(Filter(must=[Match("doc_id", ["d1"])], must_not=[Match("chunk_index", [0, 1])])) == 3


def test_delete_documents(store: VectorStore) -> None:
    store.delete_documents(["d0", "d3", "missing"])
    assert store.count() == N - 2 * CHUNKS
    assert set(store.facet("doc_id")) == {"d1", "d2", "d4", "d5"}
    store.delete_documents([])  # no-op, not "delete everything"
    assert store.count() == N - 2 * CHUNKS


def test_delete_with_must_not_keeps_the_new_version(store: VectorStore) -> None:
    # Re-ingest of d1 with a new fingerprint: first the new chunks, then the stale ones go.
    new = [Point(id=str(uuid.uuid4()), vector=VECS[i], payload={"doc_id": "d1", "fingerprint": "f2"}) for i in range(3)]
    store.upsert(new)
    store.delete(Filter(must=[Match("doc_id", ["d1"])], must_not=[Match("fingerprint", ["f2"])]))
    assert store.count(Filter(must=[Match("doc_id", ["d1"])])) == 3
    assert store.count(Filter(must=[Match("fingerprint", ["f2"])])) == 3
    assert store.count() == N - CHUNKS + 3


# ---------------------------------------------------------------------------------------
# search
# ---------------------------------------------------------------------------------------


def test_dense_search_finds_the_query_point(store: VectorStore) -> None:
    hits = store.search(SearchRequest(k=5, mode="dense", dense=VECS[7].tolist()))
    assert len(hits) == 5
    assert hits[0].id == IDS[7] and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert hits[0].payload["doc_id"] == "d1"
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_sparse_search_ranks_by_terms(store: VectorStore) -> None:
    hits = store.search(SearchRequest(k=10, mode="sparse", sparse=SparseVector([7], [1.0])))
    assert ids_of(hits) == [IDS[7]]
    # A doc term (shared by its 5 chunks) plus one chunk's own term: that chunk wins.
    hits = store.search(SearchRequest(k=10, mode="sparse", sparse=SparseVector([102, 11], [1.0, 1.0])))
    assert hits[0].id == IDS[11]
    assert set(ids_of(hits)) == {IDS[i] for i in range(10, 15)}


@pytest.mark.parametrize("fusion", ["rrf", "dbsf"])
def test_hybrid_search_fuses_both_branches(store: VectorStore, fusion: str) -> None:
    both = store.search(
        SearchRequest(k=3, mode="hybrid", dense=VECS[3], sparse=SparseVector([3], [1.0]), fusion=fusion)
    )
    assert both[0].id == IDS[3]
    # Dense points at 0, sparse at 20 (which dense also ranks): 20 first, then 0.
    split = store.search(
        SearchRequest(k=3, mode="hybrid", dense=VECS[0], sparse=SparseVector([20], [1.0]), fusion=fusion)
    )
    assert ids_of(split)[:2] == [IDS[20], IDS[0]]


def test_backends_agree(tmp_path: Path) -> None:
    stores = [make_store("edge", tmp_path), make_store("qdrant", tmp_path)]
    reqs = [
        SearchRequest(k=5, mode="dense", dense=VECS[11]),
        SearchRequest(k=5, mode="sparse", sparse=SparseVector([11, 12, 24], [1.0, 0.6, 0.3])),
        SearchRequest(k=5, mode="hybrid", dense=VECS[11], sparse=SparseVector([11, 12, 24], [1.0, 0.6, 0.3]), fusion="rrf"),
        SearchRequest(k=5, mode="hybrid", dense=VECS[11], sparse=SparseVector([11, 12, 24], [1.0, 0.6, 0.3]), fusion="dbsf"),
    ]
    try:
        for s in stores:
            s.ensure_collection(SPEC)
            s.upsert(make_points())
        edge, server = (s.search_batch(reqs) for s in stores)
        for a, b in zip(edge, server):
            # Query terms are unique to one point each, so no ties: ranks and fused scores match.
            assert ids_of(a) == ids_of(b)
            assert [h.score for h in a] == pytest.approx([h.score for h in b], rel=1e-4)
    finally:
        for s in stores:
            s.close()


def test_hybrid_without_query_terms_is_dense(store: VectorStore) -> None:
    dense = store.search(SearchRequest(k=4, mode="dense", dense=VECS[9]))
    hybrid = store.search(SearchRequest(k=4, mode="hybrid", dense=VECS[9], sparse=SparseVector([], [])))
    assert ids_of(hybrid) == ids_of(dense)
    assert store.search(SearchRequest(k=4, mode="sparse", sparse=SparseVector([], []))) == []


@pytest.mark.parametrize("mode", ["dense", "sparse", "hybrid"])
def test_search_honours_filters(store: VectorStore, mode: str) -> None:
    req = SearchRequest(
        k=10,
        mode=mode,
        dense=VECS[7],
        sparse=SparseVector([7, 102, 103], [1.0, 0.5, 0.5]),
        filter=Filter(must=[Match("doc_id", ["d2", "d3"])], must_not=[Match("chunk_index", [0])]),
    )
    hits = store.search(req)
    assert hits
    assert all(h.payload["doc_id"] in ("d2", "d3") and h.payload["chunk_index"] != 0 for h in hits)
    assert IDS[7] not in ids_of(hits)


def test_score_threshold(store: VectorStore) -> None:
    hits = store.search(SearchRequest(k=10, mode="dense", dense=VECS[5], score_threshold=0.999))
    assert ids_of(hits) == [IDS[5]]
    loose = store.search(SearchRequest(k=N, mode="dense", dense=VECS[5], score_threshold=0.0))
    assert 1 < len(loose) < N and all(h.score >= 0.0 for h in loose)
    sparse_all = store.search(SearchRequest(k=10, mode="sparse", sparse=SparseVector([5, 101], [1.0, 1.0])))
    cut = sparse_all[0].score - 1e-6
    sparse_cut = store.search(
        SearchRequest(k=10, mode="sparse", sparse=SparseVector([5, 101], [1.0, 1.0]), score_threshold=cut)
    )
    assert ids_of(sparse_cut) == [IDS[5]] and len(sparse_all) == CHUNKS


def test_search_batch_matches_single_searches(store: VectorStore) -> None:
    reqs = [
        SearchRequest(k=3, mode="dense", dense=VECS[1]),
        SearchRequest(k=3, mode="sparse", sparse=SparseVector([], [])),  # nothing to find
        SearchRequest(k=3, mode="hybrid", dense=VECS[2], sparse=SparseVector([2], [1.0]), fusion="dbsf"),
        SearchRequest(k=3, mode="sparse", sparse=SparseVector([4], [1.0]), filter=Filter(must=[Match("doc_id", ["d0"])])),
    ]
    batch = store.search_batch(reqs)
    assert [ids_of(b) for b in batch] == [ids_of(store.search(r)) for r in reqs]
    assert batch[1] == [] and batch[3][0].id == IDS[4]
    assert store.search_batch([]) == []


def test_search_without_payload(store: VectorStore) -> None:
    hits = store.search(SearchRequest(k=2, mode="dense", dense=VECS[0], with_payload=False))
    assert hits[0].id == IDS[0] and hits[0].payload == {}


def test_collection_without_sparse(empty_store: VectorStore) -> None:
    empty_store.ensure_collection(CollectionSpec(name="c", dim=DIM, embedder="test-embedder", sparse=False))
    empty_store.upsert(make_points())  # sparse vectors are ignored
    hybrid = empty_store.search(SearchRequest(k=2, mode="hybrid", dense=VECS[6], sparse=SparseVector([6], [1.0])))
    assert hybrid[0].id == IDS[6]
    with pytest.raises(CollectionError, match="without BM25"):
        empty_store.search(SearchRequest(k=2, mode="sparse", sparse=SparseVector([6], [1.0])))


# ---------------------------------------------------------------------------------------
# reads
# ---------------------------------------------------------------------------------------


def test_scroll_pages_with_field_subset(store: VectorStore) -> None:
    records = list(store.scroll(fields=["doc_id", "chunk_index"], batch_size=7))
    assert sorted(r.id for r in records) == sorted(IDS)
    assert all(set(r.payload) == {"doc_id", "chunk_index"} and r.vector is None for r in records)
    odd = list(store.scroll(Filter(must=[Match("tags", ["odd"])]), fields=["doc_id"], batch_size=4))
    assert len(odd) == 3 * CHUNKS and {r.payload["doc_id"] for r in odd} == {"d1", "d3", "d5"}
    with_vec = list(store.scroll(Filter(must=[Match("doc_id", ["d0"])]), fields=[], with_vectors=True))
    assert len(with_vec) == CHUNKS and all(r.payload == {} for r in with_vec)
    by_id = {r.id: r.vector for r in with_vec}
    # Cosine vectors come back normalised; ours already were.
    assert np.allclose(by_id[IDS[2]], VECS[2], atol=1e-5)


def test_facet(store: VectorStore) -> None:
    assert store.facet("doc_id") == {f"d{d}": CHUNKS for d in range(DOCS)}
    assert store.facet("tags") == {"all": N, "even": 3 * CHUNKS, "odd": 3 * CHUNKS}
    # 'lang' has no payload index: counted by scrolling on backends that need it.
    langs = store.facet("lang")
    assert langs == {"en": 20, "fr": 10} and list(langs) == ["en", "fr"]
    assert len(store.facet("doc_id", limit=2)) == 2


def test_retrieve_keeps_order_and_skips_missing(store: VectorStore) -> None:
    missing = str(uuid.uuid4())
    records = store.retrieve([IDS[4], missing, IDS[1]])
    assert [r.id for r in records] == [IDS[4], IDS[1]]
    assert records[0].payload["text"] == "chunk 4"
    assert store.retrieve([]) == []


def test_drop_then_recreate(store: VectorStore) -> None:
    store.drop()
    assert store.get_spec() is None
    with pytest.raises(CollectionError):
        store.count()
    store.ensure_collection(SPEC)
    assert store.count() == 0


# ---------------------------------------------------------------------------------------
# persistence and the Edge lock
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["edge", "qdrant-path"])
def test_reopen_after_close_keeps_data(tmp_path: Path, kind: str) -> None:
    def open_() -> VectorStore:
        if kind == "edge":
            return EdgeStore(tmp_path, "c")
        return open_store(VectorStoreConfig(backend="qdrant", url=f"path:{tmp_path / 'local'}", collection="c"), tmp_path)

    store = open_()
    store.ensure_collection(SPEC)
    store.upsert(make_points())
    store.delete_documents(["d5"])
    store.flush()
    store.close()
    store.close()  # twice is fine
    again = open_()
    try:
        assert again.get_spec() == SPEC
        assert again.count() == N - CHUNKS
        assert again.search(SearchRequest(k=1, dense=VECS[8]))[0].id == IDS[8]
        assert again.facet("doc_id")["d1"] == CHUNKS
    finally:
        again.close()


def test_edge_lock_names_the_holder(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path, "c")
    store.ensure_collection(SPEC)
    store.upsert(make_points()[:3])
    store.flush()
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from ragops.errors import StoreLockedError
        from ragops.vectorstore.edge import EdgeStore
        try:
            EdgeStore(Path({str(tmp_path)!r}), "c").close()
        except StoreLockedError as exc:
            print(exc)
            raise SystemExit(3)
        print("opened")
        """
    )
    try:
        # In this process too: a second store on an open collection is refused.
        with pytest.raises(StoreLockedError, match="already open in this process"):
            EdgeStore(tmp_path, "c")
        locked = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert locked.returncode == 3, locked.stderr
        assert f"in use by PID {os.getpid()}" in locked.stdout
        assert "pytest" in locked.stdout or "python" in locked.stdout  # the holder's command line
        assert "point --data-dir elsewhere" in locked.stdout
    finally:
        store.close()
    free = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert free.returncode == 0 and "opened" in free.stdout, free.stderr
    reopened = EdgeStore(tmp_path, "c")
    assert reopened.count() == 3
    reopened.close()


# ---------------------------------------------------------------------------------------
# filter translation
# ---------------------------------------------------------------------------------------


def test_filter_translation_shapes() -> None:
    from qdrant_client import models as qm

    flt = Filter(must=[Match("doc_id", ["a"]), Match("doc_id", ["a", "b"]), Match("n", ["x", 1])], must_not=[Match("n", [2])])
    c = client_filter(flt)
    assert isinstance(c.must[0].match, qm.MatchValue)
    assert isinstance(c.must[1].match, qm.MatchAny) and c.must[1].match.any == ["a", "b"]
    assert isinstance(c.must[2], qm.Filter) and len(c.must[2].should) == 2  # mixed types: OR
    assert client_filter(None) is None and client_filter(Filter()) is None
    assert edge_filter(Filter()) is None and edge_filter(flt) is not None
    with pytest.raises(ValueError, match="boolean"):
        edge_filter(Filter(must=[Match("flag", [True])]))
    with pytest.raises(ValueError, match="strings, integers"):
        client_filter(Filter(must=[Match("x", [1.5])]))


def test_mixed_type_filter_matches_on_both(store: VectorStore) -> None:
    assert store.count(Filter(must=[Match("chunk_index", [0, "d1"])])) == DOCS


@pytest.mark.filterwarnings("ignore:Api key is used with an insecure connection")
@pytest.mark.filterwarnings("ignore:Failed to obtain server version")
def test_unreachable_server_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ragops.errors import RagopsError

    monkeypatch.setenv("RAGOPS_TEST_QDRANT_KEY", "sekrit-key")
    cfg = VectorStoreConfig(backend="qdrant", url="http://127.0.0.1:1", api_key_env="RAGOPS_TEST_QDRANT_KEY", timeout_s=2)
    before = set(threading.enumerate())
    store = open_store(cfg, tmp_path)
    with pytest.raises(RagopsError, match="cannot reach the Qdrant server at http://127.0.0.1:1") as err:
        store.get_spec()
    assert "sekrit-key" not in str(err.value) and "sekrit-key" not in repr(store)
    store.close()
    # qdrant-client checks the server version in a background thread: let it warn inside
    # this test (where the warning is filtered), not in a later one.
    for thread in set(threading.enumerate()) - before:
        thread.join(timeout=10)
