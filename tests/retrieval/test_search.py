"""Retriever and QueryEncoder against a real Edge collection built by the real ingest pipeline."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ragops.errors import CollectionError, InputError
from ragops.retrieval.encoder import QueryEncoder
from ragops.retrieval.fusion import distribution_based_score_fusion, reciprocal_rank_fusion
from ragops.retrieval.search import Retriever, SearchFilters, SearchHit, source_matches
from tests.retrieval._helpers import chunks_of, embedded_text, ingest, settings_for, write_corpus

# ---------------------------------------------------------------------------------------
# Fixtures: one ingested collection per module
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, tiny_embedder: Path) -> Iterator[dict[str, Any]]:
    """The corpus ingested once; a retriever that owns the store, shared by the tests."""
    root = tmp_path_factory.mktemp("search")
    docs = write_corpus(root / "docs")
    settings = settings_for(root / "data", tiny_embedder)
    ingest(settings, docs)
    retriever = Retriever(settings)
    retriever.warm_up()
    yield {"settings": settings, "docs": docs, "retriever": retriever, "store": retriever.store}
    retriever.close()


@pytest.fixture
def retriever(corpus: dict[str, Any]) -> Retriever:
    return corpus["retriever"]


def _doc_ids(result: Any) -> list[str]:
    return [h.doc_id for h in result.hits]


# ---------------------------------------------------------------------------------------
# Modes and fusion
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sparse", "hybrid"])
def test_keyword_modes_find_the_obvious_document(retriever: Retriever, mode: str) -> None:
    result = retriever.search("zebrafish accelerators", mode=mode, k=3)
    assert result.hits[0].doc_id == "gpus.md"
    assert result.mode == mode
    assert [h.rank for h in result.hits] == list(range(1, len(result.hits) + 1))
    assert set(result.timings) >= {"encode_s", "search_s", "total_s"}
    assert result.query_truncated is False


def test_dense_finds_a_chunk_from_its_own_text(retriever: Retriever, corpus: dict[str, Any]) -> None:
    # A random tiny embedder only guarantees one thing: the same input gives the same vector.
    target = chunks_of(corpus["store"], "storage.md")[0]
    result = retriever.search(embedded_text(target), mode="dense", k=3)
    assert result.hits[0].chunk_id == target["chunk_id"]
    assert result.hits[0].score == pytest.approx(1.0, abs=1e-4)


def test_sparse_only_returns_chunks_with_a_query_term(retriever: Retriever) -> None:
    result = retriever.search("kraken", mode="sparse", k=10)
    assert _doc_ids(result) == ["storage.md"]
    # Sparse search needs no dense model: nothing was encoded densely.
    assert retriever.search("the of and", mode="sparse").hits == []


@pytest.mark.parametrize("fusion", ["rrf", "dbsf"])
def test_hybrid_fuses_in_the_engine_like_the_reference(retriever: Retriever, fusion: str) -> None:
    query = "walrus zebrafish"
    k = 50  # >= every chunk: both branches return complete lists (prefetch is 50 too)
    dense = retriever.search(query, mode="dense", k=k).hits
    sparse = retriever.search(query, mode="sparse", k=k).hits
    hybrid = retriever.search(query, mode="hybrid", fusion=fusion, k=5)
    if fusion == "rrf":
        expected = reciprocal_rank_fusion([[h.chunk_id for h in dense], [h.chunk_id for h in sparse]])
    else:
        expected = distribution_based_score_fusion(
            [[(h.chunk_id, h.score) for h in dense], [(h.chunk_id, h.score) for h in sparse]]
        )
    want = dict(expected)
    assert hybrid.fusion == fusion
    assert len(hybrid.hits) == 5
    for hit in hybrid.hits:
        assert hit.score == pytest.approx(want[hit.chunk_id], rel=1e-4, abs=1e-5)
    top_scores = sorted(want.values(), reverse=True)[:5]
    assert [h.score for h in hybrid.hits] == pytest.approx(top_scores, rel=1e-4, abs=1e-5)


def test_hybrid_without_query_terms_falls_back_to_dense(retriever: Retriever) -> None:
    # Only stop words: no BM25 terms, so the engine runs the dense branch alone.
    hybrid = retriever.search("the of and", mode="hybrid", k=3)
    dense = retriever.search("the of and", mode="dense", k=3)
    assert [h.chunk_id for h in hybrid.hits] == [h.chunk_id for h in dense.hits]


def test_defaults_come_from_settings(retriever: Retriever, corpus: dict[str, Any]) -> None:
    result = retriever.search("pelican procedure")
    rc = corpus["settings"].retrieval
    assert (result.mode, result.fusion) == (rc.mode, rc.fusion)
    assert len(result.hits) <= rc.k


def test_search_batch_matches_single_searches(retriever: Retriever) -> None:
    queries = ["zebrafish accelerators", "kraken bucket", "flamingo gauge"]
    batch = retriever.search_batch(queries, mode="hybrid", k=3)
    assert len(batch) == 3
    for query, result in zip(queries, batch):
        single = retriever.search(query, mode="hybrid", k=3)
        # Fused ties (equal RRF scores) come back in no set order: compare scores per chunk.
        batch_scores = {h.chunk_id: h.score for h in result.hits}
        single_scores = {h.chunk_id: h.score for h in single.hits}
        assert sorted(batch_scores.values()) == pytest.approx(sorted(single_scores.values()), rel=1e-5)
        for chunk_id in batch_scores.keys() & single_scores.keys():
            assert batch_scores[chunk_id] == pytest.approx(single_scores[chunk_id], rel=1e-5)
    assert [r.hits[0].doc_id for r in batch] == ["gpus.md", "storage.md", "long.md"]
    assert retriever.search_batch([], k=3) == []


def test_hit_payload_and_to_dict(retriever: Retriever, corpus: dict[str, Any]) -> None:
    hit = retriever.search("zebrafish accelerators", mode="sparse", k=1).hits[0]
    assert hit.text == "The zebrafish cluster runs on H100 accelerators with NVLink."
    assert hit.source == str(corpus["docs"] / "gpus.md")
    assert hit.title == "Alpha GPUs"
    assert hit.heading_path == ["Alpha GPUs"]
    assert hit.chunk_index == 0
    assert hit.metadata["tags"] == ["gpu", "nvidia"]
    d = hit.to_dict()
    assert list(d)[:7] == ["rank", "score", "doc_id", "chunk_id", "text", "source", "metadata"]
    assert d["rank"] == 1 and d["doc_id"] == "gpus.md"
    result = retriever.search("zebrafish accelerators", mode="sparse", k=1).to_dict()
    assert set(result) >= {"hits", "timings", "query_truncated"}


# ---------------------------------------------------------------------------------------
# Filters
# ---------------------------------------------------------------------------------------


def test_filter_doc_id(retriever: Retriever) -> None:
    result = retriever.search("zebrafish", mode="sparse", filters=SearchFilters(doc_id=["notes.txt"]))
    assert _doc_ids(result) == ["notes.txt"]
    several = retriever.search("zebrafish", mode="sparse", filters={"doc_id": ["notes.txt", "gpus.md"]})
    assert sorted(_doc_ids(several)) == ["gpus.md", "notes.txt"]


def test_filter_tag(retriever: Retriever) -> None:
    result = retriever.search("zebrafish walrus kraken", mode="sparse", filters=["tag=gpu"])
    assert _doc_ids(result) == ["gpus.md"]
    either = retriever.search("zebrafish walrus kraken", mode="sparse", filters=["tag=gpu", "tag=storage"])
    assert sorted(_doc_ids(either)) == ["gpus.md", "storage.md"]


@pytest.mark.parametrize("mode", ["dense", "sparse", "hybrid"])
def test_filter_source_glob(retriever: Retriever, mode: str) -> None:
    result = retriever.search("zebrafish walrus", mode=mode, k=10, filters=["source=*.txt"])
    assert set(_doc_ids(result)) == {"notes.txt"}
    md = retriever.search("zebrafish walrus kraken pelican", mode=mode, k=50, filters=["source=*.md"])
    assert set(_doc_ids(md)) == {"gpus.md", "storage.md", "long.md"}


def test_filter_source_relative_and_exact(retriever: Retriever, corpus: dict[str, Any]) -> None:
    relative = retriever.search("zebrafish", mode="dense", k=10, filters=["source=docs/gpus.md"])
    assert set(_doc_ids(relative)) == {"gpus.md"}
    exact = str(corpus["docs"] / "storage.md")
    absolute = retriever.search("zebrafish", mode="dense", k=10, filters=[f"source={exact}"])
    assert set(_doc_ids(absolute)) == {"storage.md"}


def test_filter_source_matching_nothing_returns_no_hits(retriever: Retriever) -> None:
    result = retriever.search("zebrafish", mode="hybrid", filters=["source=*.pdf"])
    assert result.hits == []
    assert "search_s" in result.timings


def test_filter_metadata(retriever: Retriever) -> None:
    by_type = retriever.search("zebrafish walrus", mode="sparse", k=10, filters=["metadata.type=txt"])
    assert _doc_ids(by_type) == ["notes.txt"]
    nested = retriever.search("zebrafish walrus", mode="sparse", k=10, filters=["metadata.front_matter.team=infra"])
    assert _doc_ids(nested) == ["gpus.md"]
    # CLI values are strings; an integer payload value still matches.
    size = len(b"The walrus scheduler walrus queue mentions zebrafish.\n")
    by_size = retriever.search("zebrafish", mode="dense", k=10, filters=[f"metadata.size={size}"])
    assert set(_doc_ids(by_size)) == {"notes.txt"}


def test_filters_combine_with_and(retriever: Retriever) -> None:
    result = retriever.search("zebrafish walrus", mode="sparse", filters=["source=*.md", "tag=storage"])
    assert result.hits == []  # storage.md has neither word
    result = retriever.search("kraken", mode="sparse", filters=["source=*.md", "tag=storage"])
    assert _doc_ids(result) == ["storage.md"]


def test_filter_parsing() -> None:
    f = SearchFilters.from_pairs(["source=*.md", "doc_id=a.md", "tag=gpu", "metadata.year=2024", "metadata.lang=en"])
    assert f.source == ["*.md"] and f.doc_id == ["a.md"] and f.tag == ["gpu"]
    assert f.metadata == {"year": ["2024", 2024], "lang": ["en"]}
    assert SearchFilters.from_dict({"metadata": {"year": 2024}, "tags": "gpu"}).metadata == {"year": [2024]}
    assert SearchFilters.coerce(None).is_empty()
    with pytest.raises(InputError, match=r"unknown filter key 'colour'.*source, doc_id, tag, metadata\.<field>"):
        SearchFilters.from_pairs(["colour=red"])
    with pytest.raises(InputError, match="expected key=value"):
        SearchFilters.from_pairs(["tag"])
    with pytest.raises(InputError, match="empty"):
        SearchFilters.from_pairs(["tag="])
    with pytest.raises(InputError, match="unknown filter key 'metadata.'"):
        SearchFilters.from_pairs(["metadata.=x"])


def test_source_glob_rules() -> None:
    assert source_matches("s3://bucket/docs/a.md", "*.md")
    assert source_matches("s3://bucket/docs/a.md", "docs/*.md")
    assert source_matches("s3://bucket/docs/a.md", "a.md")
    assert not source_matches("s3://bucket/docs/ba.md", "a.md")  # anchored at a directory boundary
    assert source_matches("s3://bucket/docs/a.md", "s3://bucket/*")
    assert not source_matches("s3://bucket/docs/a.MD", "*.md")  # case-sensitive


# ---------------------------------------------------------------------------------------
# Score threshold
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_score_threshold(retriever: Retriever, mode: str) -> None:
    query = "walrus zebrafish pelican"
    everything = retriever.search(query, mode=mode, k=20).hits
    assert len(everything) >= 3
    cut = (everything[1].score + everything[2].score) / 2  # between the 2nd and 3rd score
    kept = retriever.search(query, mode=mode, k=20, score_threshold=cut).hits
    assert [h.chunk_id for h in kept] == [h.chunk_id for h in everything[:2]]
    assert all(h.score >= cut for h in kept)


def test_score_threshold_is_ignored_in_hybrid(retriever: Retriever, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ragops.retrieval.search"):
        result = retriever.search("zebrafish", mode="hybrid", k=3, score_threshold=100.0)
    assert result.hits
    assert "ignored in hybrid" in caplog.text


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("query", ["", "   \n\t"])
def test_empty_query_is_an_input_error(retriever: Retriever, query: str) -> None:
    with pytest.raises(InputError, match="empty query"):
        retriever.search(query)
    with pytest.raises(InputError, match="empty query"):
        retriever.search_batch(["fine", query])


def test_unknown_mode_and_fusion(retriever: Retriever) -> None:
    with pytest.raises(InputError, match="unknown search mode 'fuzzy'; allowed: dense, sparse, hybrid"):
        retriever.search("zebrafish", mode="fuzzy")
    with pytest.raises(InputError, match="unknown fusion method 'max'; allowed: rrf, dbsf"):
        retriever.search("zebrafish", fusion="max")
    with pytest.raises(InputError, match="k must be at least 1"):
        retriever.search("zebrafish", k=0)


def test_missing_collection(corpus: dict[str, Any]) -> None:
    retriever = Retriever(corpus["settings"], collection="nope")
    with pytest.raises(CollectionError, match=r"collection 'nope' does not exist; run `ragops ingest PATH --collection nope`"):
        retriever.search("zebrafish")
    retriever.close()


def test_embedder_mismatch(corpus: dict[str, Any], tiny_embedder: Path) -> None:
    other = settings_for(corpus["settings"].data_dir, tiny_embedder, "embedder.model=minilm-l6")
    retriever = Retriever(other, store=corpus["store"])
    with pytest.raises(CollectionError, match=rf"built with embedder '{tiny_embedder}'.*uses 'minilm-l6'"):
        retriever.search("zebrafish")
    retriever.close()  # does not close the shared store it was given
    assert corpus["retriever"].search("zebrafish", mode="sparse").hits


def test_own_store_lifecycle_and_collection_without_sparse_vectors(make_settings: Any, tmp_path: Path) -> None:
    # One fresh collection (creating an Edge shard costs ~1 s) serves both checks.
    from ragops.vectorstore import open_store

    settings = make_settings("ingest.sparse.enabled=false")
    ingest(settings, write_corpus(tmp_path / "docs", {"a.md": "# A\n\nzebrafish text\n"}))
    retriever = Retriever(settings)
    # Constructing the retriever opened nothing: the shard (and its lock) is still free.
    with open_store(settings.vectorstore, settings.data_dir) as store:
        assert store.count() == 1
    with retriever:
        with pytest.raises(CollectionError, match="without BM25 sparse vectors"):
            retriever.search("zebrafish", mode="sparse")
        # Hybrid degrades to dense on such a collection.
        assert retriever.search("zebrafish", mode="hybrid").hits[0].doc_id == "a.md"
    # The Edge lock is released on close: the shard opens again in this process.
    with open_store(settings.vectorstore, settings.data_dir) as again:
        assert again.count() == 1
    with pytest.raises(RuntimeError, match="closed"):
        retriever.search("zebrafish")


# ---------------------------------------------------------------------------------------
# Query encoder
# ---------------------------------------------------------------------------------------


def test_long_query_is_truncated_with_a_warning(retriever: Retriever, caplog: pytest.LogCaptureFixture) -> None:
    long_query = " ".join(["zebrafish accelerators"] * 200)
    with caplog.at_level(logging.WARNING, logger="ragops.retrieval.encoder"):
        result = retriever.search(long_query, mode="hybrid", k=3)
    assert result.query_truncated is True
    assert result.hits[0].doc_id == "gpus.md"  # BM25 still sees every word
    assert "truncated" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ragops.retrieval.encoder"):
        assert retriever.search("zebrafish", mode="hybrid").query_truncated is False
    assert "truncated" not in caplog.text


def test_query_encoder_instruction_and_query_tower(tiny_embedder: Path) -> None:
    from ragops.config import EmbedderConfig, SparseConfig
    from ragops.embeddings import TextEmbedder

    cfg = EmbedderConfig(model=str(tiny_embedder), query_instruction="query: ")
    enc = QueryEncoder(cfg, SparseConfig())
    q = enc.encode("zebrafish tanks")
    passage_side = TextEmbedder(cfg).encode_passages(["query: zebrafish tanks"])[0]
    np.testing.assert_allclose(q.dense, passage_side, rtol=1e-5, atol=1e-6)
    assert q.dense.dtype == np.float32 and q.dense.shape == (enc.dim,)
    assert len(q.sparse.indices) == 2 and q.sparse.values == [1.0, 1.0]
    assert q.truncated is False and q.tokens > 2

    tower = QueryEncoder(EmbedderConfig(model="minilm-l6", query_model=str(tiny_embedder)), SparseConfig())
    assert tower.model_name == str(tiny_embedder)
    assert tower.encode("zebrafish").dense.shape == (32,)

    batch = enc.encode_batch(["zebrafish tanks", "kraken"], with_dense=False)
    assert [b.dense for b in batch] == [None, None]
    with pytest.raises(InputError, match="empty query"):
        enc.encode("  ")


def test_query_tower_dimension_must_match(corpus: dict[str, Any], tmp_path: Path) -> None:
    from tests.conftest import build_tiny_sentence_model

    # A query tower of another size cannot search this collection: say so clearly.
    import torch

    torch.manual_seed(1)
    wide = build_tiny_sentence_model(tmp_path / "wide")
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense

    model = SentenceTransformer(str(wide))
    model.append(Dense(32, 16))
    model.save(str(tmp_path / "narrow"))
    settings = settings_for(corpus["settings"].data_dir, Path(corpus["settings"].embedder.model),
                            f"embedder.query_model={tmp_path / 'narrow'}")
    retriever = Retriever(settings, store=corpus["store"])
    with pytest.raises(CollectionError, match="16-dim vectors.*32-dim"):
        retriever.search("zebrafish", mode="dense")


def test_search_hit_from_store_hit_defaults() -> None:
    from ragops.vectorstore.base import Hit

    hit = SearchHit.from_store_hit(Hit(id="x", score=0.5, payload={"doc_id": "d", "text": "t"}), rank=3)
    assert (hit.rank, hit.chunk_id, hit.chunk_index, hit.title, hit.heading_path) == (3, "x", -1, "", [])
