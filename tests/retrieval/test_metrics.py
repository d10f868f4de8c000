"""Retrieval and answer metrics, by hand and by property."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ragops.retrieval.metrics import (
    answer_contains,
    citation_precision,
    dedupe_doc_ranking,
    evaluate_rankings,
    exact_match,
    mrr_at_k,
    ndcg_at_k,
    normalize_answer,
    recall_at_k,
    token_f1,
)

# --- retrieval, by hand -------------------------------------------------------------------


def test_dedupe_keeps_first_occurrence() -> None:
    assert dedupe_doc_ranking(["d1", "d1", "d2", "d1", "d3", "d2"]) == ["d1", "d2", "d3"]


def test_recall() -> None:
    ranking = ["x", "a", "y", "b"]
    assert recall_at_k(ranking, {"a", "b", "c"}, 1) == 0.0
    assert recall_at_k(ranking, {"a", "b", "c"}, 2) == pytest.approx(1 / 3)
    assert recall_at_k(ranking, {"a", "b", "c"}, 10) == pytest.approx(2 / 3)


def test_metrics_work_on_chunk_rankings() -> None:
    # Chunk hits x, x, x, a: as documents [x, a], so "a" is at rank 2 and inside k=2.
    assert recall_at_k(["x", "x", "x", "a"], {"a"}, 2) == 1.0
    assert mrr_at_k(["x", "x", "x", "a"], {"a"}, 2) == 0.5


def test_mrr() -> None:
    assert mrr_at_k(["x", "y", "a", "b"], {"a", "b"}, 10) == pytest.approx(1 / 3)
    assert mrr_at_k(["x", "y", "a"], {"a"}, 2) == 0.0


def test_ndcg_hand_computed() -> None:
    # Relevant {a, b, c}; ranking [a, x, b], k=3.
    # DCG  = 1/log2(2) + 1/log2(4) = 1 + 0.5 = 1.5
    # IDCG = 1/log2(2) + 1/log2(3) + 1/log2(4) = 1 + 0.63093 + 0.5 = 2.13093
    ideal = 1 + 1 / math.log2(3) + 0.5
    assert ndcg_at_k(["a", "x", "b"], {"a", "b", "c"}, 3) == pytest.approx(1.5 / ideal)
    # Ideal from min(|relevant|, k): 3 relevant, k=1 -> IDCG = 1, and a hit at rank 1 is perfect.
    assert ndcg_at_k(["a"], {"a", "b", "c"}, 1) == 1.0
    # One relevant at rank 2: 1/log2(3) = 0.63093.
    assert ndcg_at_k(["x", "a"], {"a"}, 10) == pytest.approx(1 / math.log2(3))


def test_retrieval_metrics_reject_undefined_inputs() -> None:
    with pytest.raises(ValueError, match="relevant is empty"):
        recall_at_k(["a"], set(), 1)
    with pytest.raises(ValueError, match="k must be"):
        ndcg_at_k(["a"], {"a"}, 0)


def test_evaluate_rankings() -> None:
    runs = {"q1": ["a", "a", "x", "b"], "q2": ["y", "c"], "q3": ["z"]}
    qrels = {"q1": {"a", "b"}, "q2": {"c"}, "q4": {"d"}}
    out = evaluate_rankings(runs, qrels, ks=(1, 5, 10))
    # q1 as documents [a, x, b]: recall@1 = 1/2, @5 = @10 = 1, mrr = 1,
    #    ndcg = (1 + 1/log2(4)) / (1 + 1/log2(3)) = 1.5 / 1.63093 = 0.91972
    # q2 [y, c]: recall@1 = 0, @5 = 1, mrr = 1/2, ndcg = 1/log2(3) = 0.63093
    # q3 has no qrels: skipped. q4 has no run: all zeros.
    assert out["recall@1"] == pytest.approx((0.5 + 0 + 0) / 3)
    assert out["recall@5"] == out["recall@10"] == pytest.approx(2 / 3)
    assert out["mrr@10"] == pytest.approx(1.5 / 3)
    assert out["ndcg@10"] == pytest.approx((1.5 / (1 + 1 / math.log2(3)) + 1 / math.log2(3)) / 3)
    assert (out["queries"], out["skipped"], out["missing_runs"]) == (3, 1, 1)
    assert list(out)[:5] == ["recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10"]


def test_evaluate_rankings_without_qrels() -> None:
    out = evaluate_rankings({"q": ["a"]}, {})
    assert out["queries"] == 0 and out["skipped"] == 1 and out["ndcg@10"] == 0.0
    with pytest.raises(ValueError):
        evaluate_rankings({}, {}, ks=())


# --- retrieval, properties ----------------------------------------------------------------

docs = st.integers(0, 15)


@given(st.lists(docs, max_size=30), st.sets(docs, min_size=1), st.integers(1, 20))
def test_metrics_are_in_unit_interval(ranking: list[int], relevant: set[int], k: int) -> None:
    for metric in (recall_at_k, mrr_at_k, ndcg_at_k):
        assert 0.0 <= metric(ranking, relevant, k) <= 1.0 + 1e-12


@given(st.sets(docs, min_size=1), st.lists(docs, max_size=10), st.integers(1, 20))
def test_perfect_ranking_scores_one(relevant: set[int], tail: list[int], k: int) -> None:
    ranking = sorted(relevant) + [d for d in tail if d not in relevant]
    assert ndcg_at_k(ranking, relevant, k) == pytest.approx(1.0)
    assert mrr_at_k(ranking, relevant, k) == 1.0
    if k >= len(relevant):
        assert recall_at_k(ranking, relevant, k) == 1.0


@given(st.lists(docs, max_size=30), st.sets(docs, min_size=1), st.integers(1, 19))
def test_recall_grows_with_k(ranking: list[int], relevant: set[int], k: int) -> None:
    assert recall_at_k(ranking, relevant, k) <= recall_at_k(ranking, relevant, k + 1)


# --- answers ------------------------------------------------------------------------------


def test_normalize_answer() -> None:
    assert normalize_answer("  The  Eiffel-Tower, in Paris! ") == "eiffeltower in paris"
    assert normalize_answer("“An” apple’s core") == "apples core"


def test_exact_match() -> None:
    assert exact_match("The Eiffel Tower.", ["eiffel tower", "tour eiffel"]) == 1.0
    assert exact_match("Eiffel", "eiffel tower") == 0.0


def test_token_f1_hand_computed() -> None:
    # pred [eiffel, tower, paris], gold [eiffel, tower]: common 2, P = 2/3, R = 1, F1 = 0.8
    assert token_f1("the Eiffel Tower, Paris", "Eiffel Tower") == pytest.approx(0.8)
    # max over answers: second answer matches exactly
    assert token_f1("paris", ["lyon", "Paris"]) == 1.0
    assert token_f1("", "") == 1.0 and token_f1("", "x y") == 0.0 and token_f1("x", []) == 0.0


def test_answer_contains_whole_words() -> None:
    assert answer_contains("It was built in 1889 for the fair.", ["1889"]) == 1.0
    assert answer_contains("It has 10 floors", "1") == 0.0
    assert answer_contains("anything", ["the"]) == 0.0  # normalizes to nothing


def test_citation_precision() -> None:
    # Cited passages from docs a, a, b, c; gold {a, c}: 3 of 4 passages are gold.
    assert citation_precision(["a", "a", "b", "c"], {"a", "c"}) == 0.75
    assert citation_precision([], {"a"}) is None


@given(st.text(max_size=40), st.lists(st.text(max_size=40), max_size=3))
def test_answer_metrics_in_unit_interval(prediction: str, answers: list[str]) -> None:
    em, f1, contains = exact_match(prediction, answers), token_f1(prediction, answers), answer_contains(prediction, answers)
    assert 0.0 <= em <= f1 <= 1.0  # an exact match is also a full token match
    assert 0.0 <= contains <= 1.0
    if em == 1.0 and normalize_answer(prediction):
        assert contains == 1.0
