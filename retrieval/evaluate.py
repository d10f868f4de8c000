"""Retrieval evaluation against relevance judgements (qrels).

Inputs are two JSONL files (the format of ``samples/eval``):

* queries — one object per line: ``{"qid": "q1", "query": "how do I request a GPU?"}``
  (``id``, ``_id`` or ``query_id`` are accepted for ``qid``, ``text`` for ``query``);
* qrels — one judgement per line: ``{"qid": "q1", "doc_id": "gpus/requests.md"}``
  (``query_id`` is accepted for ``qid``), optionally with ``"relevance"`` (judgements with
  relevance ``<= 0`` are ignored), or several documents at once with ``"doc_ids": [...]``.

Metrics are document-level (:mod:`ragops.retrieval.metrics`): chunk hits are collapsed to a
document ranking, each document at its best chunk's position. Chunks are fetched with
oversampling (``k * oversample``) so that a document ranking of ``k`` documents is usually
complete even when a document has several matching chunks.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ragops.errors import InputError
from ragops.uris import read_text
from ragops.retrieval.metrics import dedupe_doc_ranking, evaluate_rankings
from ragops.retrieval.search import MODES, Retriever

log = logging.getLogger(__name__)

_ID_ALIASES = ("qid", "id", "_id", "query_id")
_QREL_ID_ALIASES = ("qid", "query_id")
_TEXT_ALIASES = ("query", "text")


def read_jsonl(path: str | Path, required_fields: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Read a JSONL file of objects, checking that each has the required fields.

    Blank lines are skipped.

    Args:
        path: The file.
        required_fields: Keys every object must have.

    Returns:
        The objects, in file order.

    Raises:
        InputError: the file is missing, or a line is not a JSON object or lacks a field;
            the message names the file and the line (``file.jsonl:3: ...``).
    """
    return [obj for _, obj in read_numbered_jsonl(path, required_fields)]


def read_numbered_jsonl(path: str | Path, required_fields: Iterable[str] = ()) -> list[tuple[int, dict[str, Any]]]:
    """:func:`read_jsonl` with each object's 1-based line number (for later error messages).

    Raises:
        InputError: as :func:`read_jsonl`.
    """
    p = str(path)
    raw = read_text(path)  # a local path or a URI (eval runs as a cluster job too)
    required = list(required_fields)
    out: list[tuple[int, dict[str, Any]]] = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{p}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{p}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        missing = [f for f in required if f not in obj]
        if missing:
            raise InputError(f"{p}:{lineno}: missing required field(s) {', '.join(repr(m) for m in missing)}")
        out.append((lineno, obj))
    return out


def _pick(obj: dict[str, Any], names: Sequence[str]) -> Any:
    return next((obj[n] for n in names if n in obj), None)


def read_queries(path: str | Path) -> dict[str, str]:
    """Query id → text from a queries JSONL file (see the module docstring).

    Raises:
        InputError: a line lacks an id or a text, the text is empty, or an id repeats.
    """
    out: dict[str, str] = {}
    for lineno, obj in read_numbered_jsonl(path):
        qid = _pick(obj, _ID_ALIASES)
        text = _pick(obj, _TEXT_ALIASES)
        if qid is None or isinstance(qid, (dict, list)):
            raise InputError(f"{path}:{lineno}: missing required field 'qid' (the query id)")
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{path}:{lineno}: missing or empty field 'query' (the query text)")
        if str(qid) in out:
            raise InputError(f"{path}:{lineno}: query id '{qid}' appears twice")
        out[str(qid)] = text
    return out


def read_qrels(path: str | Path) -> dict[str, set[str]]:
    """Query id → relevant document ids from a qrels JSONL file (see the module docstring).

    Raises:
        InputError: a line lacks ``qid`` or a ``doc_id``/``doc_ids``.
    """
    out: dict[str, set[str]] = {}
    for lineno, obj in read_numbered_jsonl(path):
        qid = _pick(obj, _QREL_ID_ALIASES)
        if qid is None or isinstance(qid, (dict, list)):
            raise InputError(f"{path}:{lineno}: missing required field 'qid' (the query id)")
        docs = obj.get("doc_ids", [obj["doc_id"]] if "doc_id" in obj else None)
        if not isinstance(docs, list) or not docs:
            raise InputError(f"{path}:{lineno}: needs 'doc_id' (a string) or 'doc_ids' (a non-empty list)")
        relevance = obj.get("relevance", 1)
        if not isinstance(relevance, (int, float)) or isinstance(relevance, bool):
            raise InputError(f"{path}:{lineno}: 'relevance' must be a number, got {relevance!r}")
        judged = out.setdefault(str(qid), set())
        if relevance > 0:
            judged.update(str(d) for d in docs)
    return out


def evaluate_retrieval(
    retriever: Retriever,
    queries_path: str | Path,
    qrels_path: str | Path,
    k: int = 10,
    modes: Sequence[str] = ("hybrid",),
    *,
    fusion: str | None = None,
    rerank: bool | None = None,
    batch_size: int = 64,
    oversample: int = 3,
    latency_samples: int = 20,
) -> dict[str, Any]:
    """Measure document-level retrieval quality and latency for each search mode.

    Args:
        retriever: An open retriever (its reranker, if any, is used).
        queries_path: Queries JSONL.
        qrels_path: Qrels JSONL.
        k: Metric depth: recall at 1, 5 and ``k`` (those ``<= k``), MRR and nDCG at ``k``.
        modes: Search modes to evaluate (``dense``, ``sparse``, ``hybrid``).
        fusion: Hybrid fusion (default ``retrieval.fusion``).
        rerank: Whether the retriever's cross-encoder orders the hits (default: when it has one),
            so one open retriever scores a first stage with and without its reranker.
        batch_size: Queries per batched search.
        oversample: Chunks fetched per document slot (``k * oversample`` chunks per query),
            so that ``k`` distinct documents are usually found.
        latency_samples: Queries searched one at a time (after a warm-up) to measure latency.

    Returns:
        ``{"k", "queries", "unjudged", "missing_queries", "modes": {mode: metrics}}`` where
        each mode's metrics hold ``recall@1``, ``recall@5``, ``recall@10``, ``mrr@10``,
        ``ndcg@10`` (for ``k=10``), ``queries``, ``latency_p50_ms`` (single query, end to
        end) and ``batch_ms_per_query`` (batched search time per query).

    Raises:
        InputError: bad files, unknown mode, ``k < 1``, or no query has judgements.
    """
    if k < 1:
        raise InputError(f"k must be at least 1, got {k}")
    for mode in modes:
        if mode not in MODES:
            raise InputError(f"unknown search mode '{mode}'; allowed: {', '.join(MODES)}")
    queries = read_queries(queries_path)
    qrels = {q: docs for q, docs in read_qrels(qrels_path).items() if docs}
    judged = [q for q in queries if q in qrels]
    missing = sorted(set(qrels) - set(queries))
    if missing:
        log.warning("%d judged query id(s) have no query text in %s: %s", len(missing), queries_path, missing[:5])
    if not judged:
        raise InputError(f"no query in {queries_path} has a judgement in {qrels_path}: check the query ids")
    ks = tuple(sorted({c for c in (1, 5, 10) if c <= k} | {k}))
    fetch = min(1000, k * max(1, oversample))
    texts = [queries[q] for q in judged]

    retriever.warm_up()
    results: dict[str, Any] = {}
    for mode in modes:
        runs: dict[str, list[str]] = {}
        batch_seconds = 0.0
        for start in range(0, len(judged), batch_size):
            ids = judged[start : start + batch_size]
            t0 = time.perf_counter()
            found = retriever.search_batch(texts[start : start + batch_size], k=fetch, mode=mode, fusion=fusion, rerank=rerank)
            batch_seconds += time.perf_counter() - t0
            for qid, res in zip(ids, found):
                runs[qid] = dedupe_doc_ranking(h.doc_id for h in res.hits)
        # Only judged queries are searched; qrels without a query stay out of the mean too
        # (they are reported as missing_queries instead of scoring 0).
        metrics: dict[str, Any] = dict(evaluate_rankings(runs, {q: qrels[q] for q in judged}, ks=ks))
        metrics.pop("skipped", None)
        metrics.pop("missing_runs", None)
        latencies = []
        for text in texts[: max(0, latency_samples)]:
            t0 = time.perf_counter()
            retriever.search(text, k=fetch, mode=mode, fusion=fusion, rerank=rerank)
            latencies.append((time.perf_counter() - t0) * 1000.0)
        metrics["latency_p50_ms"] = round(statistics.median(latencies), 3) if latencies else 0.0
        metrics["batch_ms_per_query"] = round(batch_seconds * 1000.0 / len(judged), 3)
        results[mode] = metrics
    return {
        "k": k,
        "chunks_fetched": fetch,
        "queries": len(judged),
        "unjudged": len(queries) - len(judged),
        "missing_queries": len(missing),
        "modes": results,
    }


def evaluate_answers(
    pipeline: Any,
    data_path: str | Path,
    *,
    k: int | None = None,
    mode: str | None = None,
    reader: str | None = None,
    max_new_tokens: int | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Answer every question of an answers file and score the answers.

    The file holds one ``{"question", "answers": [...], "gold_doc_ids": [...]}`` per line.
    Metrics (means over questions): exact match, token F1 and answer-contains against the
    reference answers, and citation precision — the share of cited passages whose document is
    gold (questions whose answer cites nothing are left out of that mean and counted).

    Args:
        pipeline: A :class:`ragops.retrieval.rag.RAGPipeline`.
        data_path: The answers file.
        k, mode, reader, max_new_tokens: Passed to ``pipeline.ask``.
        progress: Optional callable ``(done, total)``.
    """
    from ragops.retrieval.metrics import answer_contains, citation_precision, exact_match, token_f1

    rows = read_numbered_jsonl(data_path, ("question", "answers"))
    if not rows:
        raise InputError(f"{data_path}: no questions to evaluate")
    per_question: list[dict[str, Any]] = []
    for i, (line, row) in enumerate(rows):
        answers = row["answers"] if isinstance(row["answers"], list) else [row["answers"]]
        if not answers or not all(isinstance(a, str) for a in answers):
            raise InputError(f"{data_path}:{line}: 'answers' must be a non-empty list of strings")
        gold = set(row.get("gold_doc_ids") or [])
        ans = pipeline.ask(str(row["question"]), k=k, mode=mode, reader=reader, max_new_tokens=max_new_tokens)
        cited = [c["doc_id"] for c in ans.citations]
        per_question.append(
            {
                "question": row["question"],
                "answer": ans.answer,
                "exact_match": exact_match(ans.answer, answers),
                "token_f1": token_f1(ans.answer, answers),
                "answer_contains": answer_contains(ans.answer, answers),
                "citation_precision": citation_precision(cited, gold) if gold else None,
                "cited_doc_ids": cited,
                "total_s": ans.timings.get("total_s"),
            }
        )
        if progress:
            progress(i + 1, len(rows))
    cp = [q["citation_precision"] for q in per_question if q["citation_precision"] is not None]
    n = len(per_question)
    return {
        "questions": n,
        "exact_match": round(sum(q["exact_match"] for q in per_question) / n, 4),
        "token_f1": round(sum(q["token_f1"] for q in per_question) / n, 4),
        "answer_contains": round(sum(q["answer_contains"] for q in per_question) / n, 4),
        "citation_precision": round(sum(cp) / len(cp), 4) if cp else None,
        "questions_without_citations": n - len(cp),
        "per_question": per_question,
    }
