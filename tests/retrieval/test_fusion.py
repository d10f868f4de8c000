"""RRF and DBSF reference implementations, checked by hand and against Qdrant's definitions."""

from __future__ import annotations

import doctest
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ragops.retrieval import fusion
from ragops.retrieval.fusion import (
    PAPER_RRF_K,
    QDRANT_RRF_K,
    distribution_based_score_fusion,
    reciprocal_rank_fusion,
)

# --- RRF ----------------------------------------------------------------------------------


def test_rrf_matches_qdrant_unit_test() -> None:
    # The case from Qdrant's reciprocal_rank_fusion.rs tests (k=2, 0-based positions):
    # 1: 1/(2+1) + 1/(2+0) + 1/(2+2) = 0.3333 + 0.5 + 0.25 = 1.0833
    # 2: 1/2 + 1/3 = 0.8333;  3: 1/4 + 1/3 = 0.5833;  5: 1/2 = 0.5
    fused = reciprocal_rank_fusion([[2, 1], [1, 2, 3], [5, 3, 1]])
    assert [i for i, _ in fused] == [1, 2, 3, 5]
    assert [s for _, s in fused] == pytest.approx([13 / 12, 5 / 6, 7 / 12, 0.5])


def test_rrf_paper_constant() -> None:
    # Paper: 1/(60 + rank), rank from 1 == 1/(61 + pos), pos from 0.
    fused = dict(reciprocal_rank_fusion([["a", "b"], ["b"]], k=PAPER_RRF_K))
    assert fused["a"] == pytest.approx(1 / 61)
    assert fused["b"] == pytest.approx(1 / 62 + 1 / 61)
    assert QDRANT_RRF_K == 2


def test_rrf_weights_follow_qdrant_formula() -> None:
    # score = 1/((pos+1)/w + k - 1), k=2.
    # a: list0 pos0 w3 -> 1/(1/3 + 1) = 0.75;   list1 pos1 w1 -> 1/(2 + 1) = 1/3  => 1.0833
    # b: list0 pos1 w3 -> 1/(2/3 + 1) = 0.6;    list1 pos0 w1 -> 1/(1 + 1) = 0.5  => 1.1
    fused = reciprocal_rank_fusion([["a", "b"], ["b", "a"]], weights=[3.0, 1.0])
    assert fused == [("b", pytest.approx(1.1)), ("a", pytest.approx(0.75 + 1 / 3))]


def test_rrf_zero_weight_silences_a_list() -> None:
    assert reciprocal_rank_fusion([["a"], ["b"]], weights=[1.0, 0.0]) == [("a", 0.5), ("b", 0.0)]


def test_rrf_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="k must be 1"):
        reciprocal_rank_fusion([["a"]], k=0)
    with pytest.raises(ValueError, match="one weight per ranking"):
        reciprocal_rank_fusion([["a"], ["b"]], weights=[1.0])


def test_rrf_repeated_id_counts_once_at_best_position() -> None:
    assert reciprocal_rank_fusion([["a", "b", "a"]]) == [("a", 0.5), ("b", pytest.approx(1 / 3))]


def test_rrf_empty() -> None:
    assert reciprocal_rank_fusion([]) == []
    assert reciprocal_rank_fusion([[], []]) == []


rankings_st = st.lists(
    st.lists(st.integers(0, 30), max_size=15, unique=True), min_size=1, max_size=4
)


@given(rankings_st)
def test_rrf_list_order_does_not_matter(rankings: list[list[int]]) -> None:
    forward = dict(reciprocal_rank_fusion(rankings))
    backward = dict(reciprocal_rank_fusion(rankings[::-1]))
    assert forward.keys() == backward.keys()
    for key, score in forward.items():
        assert backward[key] == pytest.approx(score)


@given(rankings_st)
def test_rrf_scores_bounded_and_sorted(rankings: list[list[int]]) -> None:
    fused = reciprocal_rank_fusion(rankings)
    scores = [s for _, s in fused]
    assert scores == sorted(scores, reverse=True)
    # Each list adds at most 1/k (its top position).
    assert all(0 < s <= len(rankings) / QDRANT_RRF_K for s in scores)
    assert len(fused) == len({i for r in rankings for i in r})


# --- DBSF ---------------------------------------------------------------------------------


def test_dbsf_hand_computed() -> None:
    # List 1: [3, 1]: mean 2, sample var ((1)^2 + (-1)^2)/1 = 2, sd = sqrt 2,
    #   range [2 - 3 sqrt2, 2 + 3 sqrt2], width 6 sqrt2:
    #   a -> (3 - 2 + 3 sqrt2)/(6 sqrt2) = 0.5 + 1/(6 sqrt2) = 0.61785; b -> 0.5 - 0.11785 = 0.38215
    # List 2: [("b", 0.7)] alone -> 0.5. List 3 empty: ignored.
    fused = distribution_based_score_fusion([[("a", 3.0), ("b", 1.0)], [("b", 0.7)], []])
    d = 1 / (6 * math.sqrt(2))
    assert fused == [("b", pytest.approx(1.0 - d)), ("a", pytest.approx(0.5 + d))]


def test_dbsf_equal_scores_are_one_half() -> None:
    assert distribution_based_score_fusion([[("a", 2.0), ("b", 2.0)]]) == [("a", 0.5), ("b", 0.5)]


def test_dbsf_does_not_clip_like_qdrant_unless_asked() -> None:
    # Ten equal scores and one outlier: the outlier lies (n-1)/sqrt(n) = 10/sqrt(11) = 3.015 sd
    # above the mean, beyond the +3 sd end of the range, so it normalizes above 1.
    lst = [(i, 0.0) for i in range(10)] + [("top", 1.0)]
    assert dict(distribution_based_score_fusion([lst]))["top"] > 1.0
    assert dict(distribution_based_score_fusion([lst], clip=True))["top"] == 1.0


def test_matches_qdrant_client_local_mode() -> None:
    # qdrant-client's local mode is Qdrant's definition in Python; fuse the same lists both ways.
    qfusion = pytest.importorskip("qdrant_client.hybrid.fusion")
    models = pytest.importorskip("qdrant_client.http.models")
    lists = [[(1, 0.91), (2, 0.85), (3, 0.4), (4, 0.39)], [(3, 12.0), (5, 7.5), (1, 2.0)], [(6, 0.2), (2, 0.1)]]

    def points(lst):
        return [models.ScoredPoint(id=i, version=0, score=s) for i, s in lst]

    for k in (2, 60):
        theirs = {p.id: p.score for p in qfusion.reciprocal_rank_fusion([points(x) for x in lists], limit=100, ranking_constant_k=k)}
        ours = dict(reciprocal_rank_fusion([[i for i, _ in x] for x in lists], k=k))
        assert ours == pytest.approx(theirs)
    theirs_w = {
        p.id: p.score
        for p in qfusion.reciprocal_rank_fusion([points(x) for x in lists], limit=100, weights=[2.0, 0.5, 1.0])
    }
    assert dict(reciprocal_rank_fusion([[i for i, _ in x] for x in lists], weights=[2.0, 0.5, 1.0])) == pytest.approx(theirs_w)
    theirs_d = {p.id: p.score for p in qfusion.distribution_based_score_fusion([points(x) for x in lists], limit=100)}
    assert dict(distribution_based_score_fusion(lists)) == pytest.approx(theirs_d)


scored_st = st.lists(
    st.dictionaries(st.integers(0, 20), st.floats(-100, 100, allow_nan=False), max_size=12).map(
        lambda d: sorted(d.items(), key=lambda kv: -kv[1])
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=60)
@given(scored_st)
def test_dbsf_clipped_scores_bounded_by_list_count(scored: list[list[tuple[int, float]]]) -> None:
    fused = distribution_based_score_fusion(scored, clip=True)
    n_lists = sum(1 for lst in scored if lst)
    assert all(0.0 <= s <= n_lists + 1e-9 for _, s in fused)
    assert [s for _, s in fused] == sorted((s for _, s in fused), reverse=True)


@settings(max_examples=60)
@given(scored_st)
def test_dbsf_preserves_order_within_one_list(scored: list[list[tuple[int, float]]]) -> None:
    # Normalization is an increasing affine map, so a single list keeps its order.
    lst = scored[0]
    fused = dict(distribution_based_score_fusion([lst]))
    for (a, sa), (b, sb) in zip(lst, lst[1:]):
        if sa > sb:
            assert fused[a] >= fused[b]


def test_docstring_examples() -> None:
    result = doctest.testmod(fusion)
    assert result.attempted > 0 and result.failed == 0
