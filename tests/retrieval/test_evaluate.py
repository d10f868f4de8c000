"""Retrieval evaluation on a tiny judged query set, metrics checked against hand computation."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ragops.errors import InputError
from ragops.retrieval.evaluate import evaluate_retrieval, read_jsonl, read_qrels, read_queries
from ragops.retrieval.search import Retriever
from tests.retrieval._helpers import ingest, settings_for, write_corpus


def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def retriever(tmp_path_factory: pytest.TempPathFactory, tiny_embedder: Path) -> Iterator[Retriever]:
    root = tmp_path_factory.mktemp("evaluate")
    settings = settings_for(root / "data", tiny_embedder)
    ingest(settings, write_corpus(root / "docs"))
    with Retriever(settings) as r:
        yield r


@pytest.fixture
def eval_files(tmp_path: Path) -> tuple[Path, Path]:
    queries = _write_jsonl(
        tmp_path / "queries.jsonl",
        [
            {"qid": "q1", "query": "zebrafish accelerators"},
            {"qid": "q2", "query": "kraken parquet"},
            {"_id": "q3", "text": "walrus zebrafish"},  # BEIR-style aliases
            {"qid": "q4", "query": "pelican"},  # no judgement: not evaluated
        ],
    )
    qrels = _write_jsonl(
        tmp_path / "qrels.jsonl",
        [
            {"qid": "q1", "doc_id": "gpus.md"},
            {"qid": "q1", "doc_id": "storage.md", "relevance": 0},  # judged not relevant
            {"query_id": "q2", "doc_ids": ["storage.md", "notes.txt"]},
            {"query_id": "q3", "doc_id": "gpus.md", "relevance": 2},
            {"query_id": "q9", "doc_id": "gpus.md"},  # no such query
        ],
    )
    return queries, qrels


def test_sparse_metrics_match_hand_computation(retriever: Retriever, eval_files: tuple[Path, Path]) -> None:
    # BM25 rankings (documents), checked in the test below:
    #   q1 "zebrafish accelerators" -> [gpus, notes]     relevant {gpus}
    #   q2 "kraken parquet"         -> [storage]         relevant {storage, notes}
    #   q3 "walrus zebrafish"       -> [notes, gpus]     relevant {gpus}
    out = evaluate_retrieval(retriever, *eval_files, k=10, modes=("sparse",), latency_samples=2)
    assert out["queries"] == 3 and out["unjudged"] == 1 and out["missing_queries"] == 1
    m = out["modes"]["sparse"]
    log2_3 = math.log2(3)
    assert m["recall@1"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert m["recall@5"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert m["recall@10"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert m["mrr@10"] == pytest.approx((1 + 1 + 0.5) / 3)
    # nDCG: q1 1; q2 1 / (1 + 1/log2 3); q3 (1/log2 3) / 1.
    assert m["ndcg@10"] == pytest.approx((1 + 1 / (1 + 1 / log2_3) + 1 / log2_3) / 3)
    assert m["queries"] == 3
    assert m["latency_p50_ms"] >= 0 and m["batch_ms_per_query"] >= 0


def test_the_rankings_behind_the_hand_computation(retriever: Retriever) -> None:
    def docs(q: str) -> list[str]:
        return list(dict.fromkeys(h.doc_id for h in retriever.search(q, mode="sparse", k=30).hits))

    assert docs("zebrafish accelerators") == ["gpus.md", "notes.txt"]
    assert docs("kraken parquet") == ["storage.md"]
    assert docs("walrus zebrafish") == ["notes.txt", "gpus.md"]


def test_several_modes_and_cutoffs(retriever: Retriever, eval_files: tuple[Path, Path]) -> None:
    out = evaluate_retrieval(retriever, *eval_files, k=5, modes=("dense", "hybrid"), batch_size=2, latency_samples=0)
    assert set(out["modes"]) == {"dense", "hybrid"}
    for metrics in out["modes"].values():
        assert set(metrics) >= {"recall@1", "recall@5", "mrr@5", "ndcg@5", "queries", "latency_p50_ms"}
        assert all(0.0 <= metrics[k] <= 1.0 for k in ("recall@1", "recall@5", "mrr@5", "ndcg@5"))
    assert out["chunks_fetched"] == 15


def test_evaluate_errors(retriever: Retriever, eval_files: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown search mode 'fuzzy'"):
        evaluate_retrieval(retriever, *eval_files, modes=("fuzzy",))
    other = _write_jsonl(tmp_path / "other-qrels.jsonl", [{"query_id": "zz", "doc_id": "a"}])
    with pytest.raises(InputError, match="no query .* has a judgement"):
        evaluate_retrieval(retriever, eval_files[0], other)


def test_read_jsonl_errors_name_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "q1", "text": "a"}\n\n{"id": "q2"\n', encoding="utf-8")
    with pytest.raises(InputError, match=rf"{bad}:3: invalid JSON"):
        read_jsonl(bad, ["id", "text"])
    bad.write_text('{"id": "q1", "text": "a"}\n["x"]\n', encoding="utf-8")
    with pytest.raises(InputError, match=rf"{bad}:2: expected a JSON object"):
        read_jsonl(bad)
    bad.write_text('{"id": "q1", "text": "a"}\n\n{"id": "q2"}\n', encoding="utf-8")
    with pytest.raises(InputError, match=rf"{bad}:3: missing required field\(s\) 'text'"):
        read_jsonl(bad, ["id", "text"])
    with pytest.raises(InputError, match="file not found"):
        read_jsonl(tmp_path / "absent.jsonl")
    assert read_jsonl(_write_jsonl(tmp_path / "ok.jsonl", [{"a": 1}, {"a": 2}]), ["a"]) == [{"a": 1}, {"a": 2}]


def test_read_queries_and_qrels_validation(tmp_path: Path) -> None:
    dup = _write_jsonl(tmp_path / "q.jsonl", [{"id": "q1", "text": "a"}, {"id": "q1", "text": "b"}])
    with pytest.raises(InputError, match=r"q\.jsonl:2: query id 'q1' appears twice"):
        read_queries(dup)
    empty = _write_jsonl(tmp_path / "e.jsonl", [{"id": "q1", "text": "  "}])
    with pytest.raises(InputError, match=r"e\.jsonl:1: missing or empty field 'query'"):
        read_queries(empty)
    no_doc = _write_jsonl(tmp_path / "r.jsonl", [{"query_id": "q1", "doc_id": "a"}, {"query_id": "q1"}])
    with pytest.raises(InputError, match=r"r\.jsonl:2: needs 'doc_id'"):
        read_qrels(no_doc)
    no_query = _write_jsonl(tmp_path / "n.jsonl", [{"doc_id": "a"}])
    with pytest.raises(InputError, match=r"n\.jsonl:1: missing required field 'qid'"):
        read_qrels(no_query)
    ok = _write_jsonl(tmp_path / "ok.jsonl", [{"query_id": 1, "doc_id": "a"}, {"query_id": 1, "doc_id": "b", "relevance": 0}])
    assert read_qrels(ok) == {"1": {"a"}}


def test_reads_the_shipped_sample_eval_set() -> None:
    from tests.conftest import REPO

    queries = read_queries(REPO / "samples" / "eval" / "queries.jsonl")
    qrels = read_qrels(REPO / "samples" / "eval" / "qrels.jsonl")
    assert len(queries) >= 10 and queries["q1"].strip()
    assert qrels.keys() <= queries.keys()
