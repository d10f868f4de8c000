"""The reranker deployment: served search equals ``ragops search`` with the same rerank settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from tests.conftest import SAMPLE_DOCS
from tests.serve.conftest import RERANK_CANDIDATES, Served, index_overrides

pytestmark = pytest.mark.e2e

QUERIES = (
    "What is MIG?",
    "How do I request a GPU in Kubernetes?",
    "How does time-slicing share a GPU?",
    "Ray Serve autoscaling replicas",
    "vector search filters",
)


@pytest.fixture(scope="module")
def index_copy(tmp_path_factory: pytest.TempPathFactory, tiny_embedder: Path) -> Path:
    """The test app's index built again in another data dir: the app's retriever holds its Edge shard."""
    from ragops.config import load_settings
    from ragops.ingest.pipeline import run_ingest

    data_dir = tmp_path_factory.mktemp("serve-rerank") / "data"
    report = run_ingest(load_settings([], index_overrides(tiny_embedder), data_dir=data_dir, environ={}), [str(SAMPLE_DOCS)])
    assert report.ok
    return data_dir


def _rerank_overrides(served: Served) -> list[str]:
    rerank = served.settings.retrieval.rerank  # type: ignore[attr-defined]
    return [f"retrieval.rerank.model={rerank.model}", f"retrieval.rerank.candidates={rerank.candidates}"]


def _cli_search(data_dir: Path, overrides: list[str], query: str, k: int) -> dict[str, Any]:
    from cli import app

    args = ["search", query, "--k", str(k), "--mode", "dense", "--json", "--data-dir", str(data_dir)]
    for o in overrides:
        args += ["--set", o]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _same_hits(served: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert [(h["rank"], h["doc_id"], h["chunk_id"]) for h in served] == [
        (h["rank"], h["doc_id"], h["chunk_id"]) for h in expected
    ]
    for s, e in zip(served, expected, strict=True):
        assert s["score"] == pytest.approx(e["score"], rel=1e-5, abs=1e-6)
        assert s["retrieval_score"] == pytest.approx(e["retrieval_score"], rel=1e-5, abs=1e-6)
        assert s["text"] == e["text"]


def test_served_search_is_ragops_search_with_the_same_rerank_settings(
    served: Served, api: httpx.Client, index_copy: Path, tiny_embedder: Path
) -> None:
    # Dense mode: distinct scores, so the order is fully determined (hybrid RRF scores can tie).
    base = index_overrides(tiny_embedder)
    reranked = base + _rerank_overrides(served)
    changed = 0
    for query in QUERIES:
        expected = _cli_search(index_copy, reranked, query, k=1)
        plain = _cli_search(index_copy, base, query, k=1)
        # Counts the queries where the cross-encoder's best is not the retriever's best: proof
        # that the served reranker chose among the candidates, not only among the k hits.
        changed += expected["hits"][0]["chunk_id"] != plain["hits"][0]["chunk_id"]
        r = api.post("/v1/search", json={"query": query, "k": 1, "mode": "dense"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["reranked"] is True and body["timings"]["rerank_s"] >= 0
        _same_hits(body["hits"], expected["hits"])
    assert changed >= 1
    # More hits than candidates: the retriever's top k, ordered by the cross-encoder.
    k = RERANK_CANDIDATES + 2
    body = api.post("/v1/search", json={"query": QUERIES[1], "k": k, "mode": "dense"}).json()
    expected = _cli_search(index_copy, reranked, QUERIES[1], k=k)
    _same_hits(body["hits"], expected["hits"])
    scores = [h["score"] for h in body["hits"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == k


def _reranked_count(api: httpx.Client) -> float:
    for line in api.get("/metrics").text.splitlines():
        if line.startswith("ragops_rerank_duration_seconds_count"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_chat_passages_are_reranked_by_the_reranker_deployment(api: httpx.Client) -> None:
    assert api.get("/healthz").json()["deployments"]["Reranker"] == "HEALTHY"
    before = _reranked_count(api)
    chat = api.post("/v1/chat/completions", json={"model": "ragops", "max_tokens": 2, "rag": {"k": 2, "mode": "dense", "reader": "fid"},
                                                  "messages": [{"role": "user", "content": QUERIES[0]}]})  # fmt: skip
    assert chat.status_code == 200, chat.text
    assert _reranked_count(api) == before + 1
    # The cited passages (FiD always cites) carry the cross-encoder's scores, as /v1/search reports them.
    hits = api.post("/v1/search", json={"query": QUERIES[0], "k": 2, "mode": "dense"}).json()["hits"]
    by_chunk = {h["chunk_id"]: h["score"] for h in hits}
    cited = chat.json()["citations"]
    assert cited and all(c["score"] == pytest.approx(by_chunk[c["chunk_id"]], rel=1e-5) for c in cited)
