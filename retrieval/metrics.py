"""Retrieval and answer metrics for evaluation runs.

Retrieval metrics are document-level: a search returns chunks, several of which may come from
one document, so a chunk ranking is first collapsed with :func:`dedupe_doc_ranking` (every
metric here does that itself). Relevance is binary: a document is in the query's qrels or not.

Answer metrics follow the SQuAD evaluation script: answers are compared after
:func:`normalize_answer`, and a prediction scores its best match over the reference answers.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Collection, Hashable, Iterable, Mapping, Sequence
from typing import TypeVar

__all__ = [
    "dedupe_doc_ranking",
    "recall_at_k",
    "mrr_at_k",
    "ndcg_at_k",
    "evaluate_rankings",
    "normalize_answer",
    "exact_match",
    "token_f1",
    "answer_contains",
    "citation_precision",
]

DocId = TypeVar("DocId", bound=Hashable)


# ---------------------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------------------


def dedupe_doc_ranking(ranked_doc_ids: Iterable[DocId]) -> list[DocId]:
    """Collapse repeated document ids, keeping each at its first (best) position.

    Turns the doc ids of chunk hits into a document ranking:
    ``[d1, d1, d2, d1, d3]`` → ``[d1, d2, d3]``.
    """
    return list(dict.fromkeys(ranked_doc_ids))


def _top_k(ranked_doc_ids: Iterable[DocId], k: int) -> list[DocId]:
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    return dedupe_doc_ranking(ranked_doc_ids)[:k]


def _require_relevant(relevant: Collection[DocId]) -> None:
    # A metric over no relevant documents is undefined; averaging a made-up 0 or 1 would
    # silently move the mean, so callers must skip such queries (evaluate_rankings does).
    if not relevant:
        raise ValueError("relevant is empty: the metric is undefined for a query without relevant documents")


def recall_at_k(ranked_doc_ids: Iterable[DocId], relevant: Collection[DocId], k: int) -> float:
    """Share of the relevant documents found in the top ``k`` distinct documents.

    Args:
        ranked_doc_ids: Document ids, best first (repeats are collapsed).
        relevant: The relevant document ids (non-empty).
        k: Cut-off, at least 1.

    Raises:
        ValueError: ``relevant`` is empty or ``k < 1``.
    """
    _require_relevant(relevant)
    relevant = set(relevant)
    return sum(1 for d in _top_k(ranked_doc_ids, k) if d in relevant) / len(relevant)


def mrr_at_k(ranked_doc_ids: Iterable[DocId], relevant: Collection[DocId], k: int) -> float:
    """Reciprocal rank (1-based) of the first relevant document in the top ``k``; 0 if none.

    Raises:
        ValueError: ``relevant`` is empty or ``k < 1``.
    """
    _require_relevant(relevant)
    for rank, d in enumerate(_top_k(ranked_doc_ids, k), start=1):
        if d in relevant:
            return 1.0 / rank
    return 0.0


def ndcg_at_k(ranked_doc_ids: Iterable[DocId], relevant: Collection[DocId], k: int) -> float:
    """Normalized DCG at ``k`` with binary gains and a ``log2(rank + 1)`` discount.

    ``DCG = sum over relevant hits at rank r of 1 / log2(r + 1)``; the ideal DCG puts
    ``min(|relevant|, k)`` relevant documents at ranks 1, 2, ...

    Raises:
        ValueError: ``relevant`` is empty or ``k < 1``.
    """
    _require_relevant(relevant)
    dcg = sum(1.0 / math.log2(rank + 1) for rank, d in enumerate(_top_k(ranked_doc_ids, k), start=1) if d in relevant)
    ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(len(relevant), k) + 1))
    return dcg / ideal


def evaluate_rankings(
    runs: Mapping[str, Sequence[DocId]],
    qrels: Mapping[str, Collection[DocId]],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Mean retrieval metrics of a run over the queries that have relevance judgements.

    A query in ``runs`` without (or with empty) qrels is skipped and counted in ``skipped``;
    a query judged in ``qrels`` but absent from ``runs`` counts as an empty ranking (it
    retrieved nothing) and is counted in ``missing_runs``.

    Args:
        runs: Query id → document ids, best first (chunk-level repeats are collapsed).
        qrels: Query id → relevant document ids.
        ks: Cut-offs for recall; MRR and nDCG use the largest.

    Returns:
        ``recall@k`` for each ``k``, ``mrr@K`` and ``ndcg@K`` for ``K = max(ks)`` (all 0.0
        when nothing was evaluated), plus ``queries`` (evaluated), ``skipped`` and
        ``missing_runs``. With the default ``ks``: recall@1, recall@5, recall@10, mrr@10,
        ndcg@10.

    Raises:
        ValueError: ``ks`` is empty or has a value below 1.
    """
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be non-empty cut-offs of at least 1, got {tuple(ks)}")
    top = max(ks)
    names = [f"recall@{k}" for k in ks] + [f"mrr@{top}", f"ndcg@{top}"]
    totals = dict.fromkeys(names, 0.0)
    evaluated = skipped = missing = 0
    for qid in dict.fromkeys([*runs, *qrels]):
        relevant = qrels.get(qid)
        if not relevant:
            skipped += 1
            continue
        if qid in runs:
            ranking = dedupe_doc_ranking(runs[qid])
        else:
            ranking = []
            missing += 1
        evaluated += 1
        for k in ks:
            totals[f"recall@{k}"] += recall_at_k(ranking, relevant, k)
        totals[f"mrr@{top}"] += mrr_at_k(ranking, relevant, top)
        totals[f"ndcg@{top}"] += ndcg_at_k(ranking, relevant, top)
    out: dict[str, float] = {name: (total / evaluated if evaluated else 0.0) for name, total in totals.items()}
    out.update(queries=evaluated, skipped=skipped, missing_runs=missing)
    return out


# ---------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lower-case, drop punctuation (and backticks) and articles, collapse whitespace.

    Punctuation is any Unicode punctuation character (SQuAD's script knows only ASCII), so
    the curly quotes and dashes generators like to emit are removed too.
    """
    text = text.lower()
    # Backticks (a symbol, not punctuation, in Unicode) too: answers quote code as `name`.
    text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P") and ch != "`")
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _as_list(answers: str | Iterable[str]) -> list[str]:
    return [answers] if isinstance(answers, str) else list(answers)


def exact_match(prediction: str, answers: str | Iterable[str]) -> float:
    """1.0 when the normalized prediction equals a normalized answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in _as_list(answers)))


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:
        # SQuAD 2.0's rule: an empty side scores 1 only when both are empty.
        return float(pred_tokens == gold_tokens)
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: str | Iterable[str]) -> float:
    """Best SQuAD token F1 of the prediction against the answers (0.0 without answers)."""
    pred = normalize_answer(prediction).split()
    return max((_f1(pred, normalize_answer(a).split()) for a in _as_list(answers)), default=0.0)


def answer_contains(prediction: str, answers: str | Iterable[str]) -> float:
    """1.0 when a normalized answer occurs in the normalized prediction as whole words.

    Long generated answers rarely match exactly; this asks whether the answer is stated.
    Whole words, so "1" is not found in "10". Answers that normalize to nothing never match.
    """
    pred = f" {normalize_answer(prediction)} "
    for a in _as_list(answers):
        gold = normalize_answer(a)
        if gold and f" {gold} " in pred:
            return 1.0
    return 0.0


def citation_precision(cited_doc_ids: Sequence[DocId], gold_doc_ids: Collection[DocId]) -> float | None:
    """Share of cited passages whose document is a gold document.

    Args:
        cited_doc_ids: The document id of each cited passage (a document cited through two
            passages appears twice and counts twice).
        gold_doc_ids: Documents that support the answer.

    Returns:
        The share in [0, 1], or None when nothing was cited (precision is undefined then;
        report citation coverage separately).
    """
    if not cited_doc_ids:
        return None
    gold = set(gold_doc_ids)
    return sum(1 for d in cited_doc_ids if d in gold) / len(cited_doc_ids)
