"""Cross-encoder reranking with a tiny random cross-encoder, alone and inside the Retriever."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ragops.config import RerankConfig
from ragops.errors import ModelNotFoundError
from ragops.retrieval.rerank import Reranker, pair_text
from ragops.retrieval.search import Retriever, SearchHit
from tests.retrieval._helpers import build_tiny_cross_encoder, ingest, settings_for, write_corpus


@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("tiny-cross-encoder"))


@pytest.fixture(scope="module")
def reranker(cross_encoder_dir: Path) -> Reranker:
    r = Reranker(RerankConfig(model=str(cross_encoder_dir), batch_size=4))
    r.warm_up()
    return r


def _hit(i: int, text: str, **kw: Any) -> SearchHit:
    return SearchHit(rank=i, score=1.0 / i, doc_id=f"d{i}", chunk_id=f"c{i}", text=text, source=f"/s/{i}.md", **kw)


TEXTS = [
    "Parquet files land in the kraken bucket every night.",
    "The zebrafish cluster runs on H100 accelerators.",
    "Step 16 of the pelican procedure inspects the flamingo gauge.",
    "Walrus scheduler queue.",
    "A completely unrelated sentence about cooking pasta al dente.",
]


def test_rerank_orders_by_cross_encoder_score(reranker: Reranker) -> None:
    query = "where do parquet files land?"
    probe = [_hit(i, t) for i, t in enumerate(TEXTS, start=1)]
    scores = reranker.score(query, probe)
    assert len(set(scores)) == len(scores)  # distinct, so the expected order is unique
    # Feed the hits worst-first: the reranker must reverse them.
    ascending = sorted(range(len(TEXTS)), key=lambda i: scores[i])
    hits = [_hit(rank, TEXTS[i]) for rank, i in enumerate(ascending, start=1)]
    out = reranker.rerank(query, hits)
    assert [h.text for h in out] == [TEXTS[i] for i in reversed(ascending)]
    assert [h.rank for h in out] == [1, 2, 3, 4, 5]
    assert [h.score for h in out] == pytest.approx(sorted(scores, reverse=True), rel=1e-5)
    # The retrieval score travels along.
    by_text = {h.text: h for h in hits}
    assert all(h.retrieval_score == by_text[h.text].score for h in out)
    # Inputs are left untouched.
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5] and all(h.retrieval_score is None for h in hits)


def test_rerank_scores_equal_cross_encoder_predict(reranker: Reranker) -> None:
    hits = [_hit(i, t, title="Guide", heading_path=["Guide", "Storage"]) for i, t in enumerate(TEXTS, start=1)]
    out = reranker.rerank("kraken", hits, top_k=2)
    raw = reranker.model.predict([("kraken", pair_text(h)) for h in hits], show_progress_bar=False)
    expected = sorted(((float(s), h.chunk_id) for s, h in zip(raw, hits)), reverse=True)[:2]
    assert [(h.score, h.chunk_id) for h in out] == [(pytest.approx(s, rel=1e-5), c) for s, c in expected]


def test_pair_text_carries_heading_context() -> None:
    assert pair_text(_hit(1, "body", title="Guide", heading_path=["Guide", "Install"])) == "Guide > Install\n\nbody"
    assert pair_text(_hit(1, "body", title="Guide", heading_path=["Setup"])) == "Guide > Setup\n\nbody"
    assert pair_text(_hit(1, "body")) == "body"


def test_rerank_batch_and_empty(reranker: Reranker) -> None:
    a = [_hit(i, t) for i, t in enumerate(TEXTS[:3], start=1)]
    b = [_hit(i, t) for i, t in enumerate(TEXTS[2:], start=1)]
    batched = reranker.rerank_batch(["kraken", "walrus"], [a, b], top_k=2)
    assert [[h.chunk_id for h in hs] for hs in batched] == [
        [h.chunk_id for h in reranker.rerank("kraken", a, top_k=2)],
        [h.chunk_id for h in reranker.rerank("walrus", b, top_k=2)],
    ]
    assert reranker.rerank("kraken", []) == []
    with pytest.raises(ValueError, match="2 queries but 1 hit lists"):
        reranker.rerank_batch(["a", "b"], [a])


def test_hub_reranker_offline_fails_with_guidance() -> None:
    r = Reranker(RerankConfig(model="bge-reranker-base"))  # resolving is free; loading is lazy
    with pytest.raises(ModelNotFoundError, match="not in the local cache"):
        r.warm_up()
    with pytest.raises(ValueError, match="rerank.model"):
        Reranker(RerankConfig())


@pytest.fixture(scope="module")
def corpus_settings(tmp_path_factory: pytest.TempPathFactory, tiny_embedder: Path, cross_encoder_dir: Path) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("rerank")
    settings = settings_for(
        root / "data",
        tiny_embedder,
        f"retrieval.rerank.model={cross_encoder_dir}",
        "retrieval.rerank.candidates=6",
    )
    ingest(settings, write_corpus(root / "docs"))
    yield settings


def test_retriever_reranks_candidates_down_to_k(corpus_settings: Any) -> None:
    with Retriever(corpus_settings) as retriever:
        assert retriever.reranker is not None
        query = "pelican procedure bolt"
        plain = retriever.search(query, mode="hybrid", k=6, rerank=False)
        assert not plain.reranked and "rerank_s" not in plain.timings
        result = retriever.search(query, mode="hybrid", k=3)
        assert result.reranked and "rerank_s" in result.timings
        assert len(result.hits) == 3
        # The 3 kept are the cross-encoder's best among the 6 candidates, in its order.
        ce = dict(zip((h.chunk_id for h in plain.hits), retriever.reranker.score(query, plain.hits)))
        best = sorted(ce, key=lambda c: -ce[c])[:3]
        assert [h.chunk_id for h in result.hits] == best
        assert [h.score for h in result.hits] == pytest.approx([ce[c] for c in best], rel=1e-5)
        assert all(h.retrieval_score is not None for h in result.hits)
        assert "retrieval_score" in result.hits[0].to_dict()
        batch = retriever.search_batch([query, "kraken"], mode="hybrid", k=2)
        assert [h.chunk_id for h in batch[0].hits] == best[:2]
        assert all(r.reranked for r in batch)


def test_evaluate_retrieval_scores_with_and_without_the_reranker(corpus_settings: Any, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from ragops.retrieval.evaluate import evaluate_retrieval

    queries, qrels = tmp_path / "q.jsonl", tmp_path / "r.jsonl"
    queries.write_text(json.dumps({"qid": "q1", "query": "kraken parquet"}) + "\n", encoding="utf-8")
    qrels.write_text(json.dumps({"qid": "q1", "doc_id": "storage.md"}) + "\n", encoding="utf-8")
    with Retriever(corpus_settings) as retriever:
        calls: list[int] = []
        real = retriever.reranker.rerank_batch
        monkeypatch.setattr(retriever.reranker, "rerank_batch", lambda qs, *a, **kw: calls.append(len(qs)) or real(qs, *a, **kw))
        plain = evaluate_retrieval(retriever, queries, qrels, k=2, modes=("hybrid",), latency_samples=1, rerank=False)
        assert calls == []  # the first stage alone, on a retriever that has a reranker
        reranked = evaluate_retrieval(retriever, queries, qrels, k=2, modes=("hybrid",), latency_samples=1)
        assert calls == [1, 1]  # the batch and the latency query, by default through the cross-encoder
        assert plain["modes"]["hybrid"]["queries"] == reranked["modes"]["hybrid"]["queries"] == 1
