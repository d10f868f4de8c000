"""Rank fusion in pure Python, defined exactly as Qdrant's query API defines it.

The vector stores fuse dense and sparse results inside Qdrant (``FusionQuery`` over
prefetches). These functions are the reference for that: tests and benchmarks compare the
engine's output with them, and a backend that cannot fuse in the engine can fuse with them.

Definitions, from Qdrant's source (``lib/segment/src/common/reciprocal_rank_fusion.rs`` and
``lib/segment/src/common/score_fusion.rs``) and the same code in qdrant-client's local mode
(``qdrant_client/hybrid/fusion.py``):

- **RRF**: ``score(d) = sum_i 1 / ((pos_i(d) + 1) / w_i + k - 1)`` with ``pos`` **0-based**
  and list weights ``w_i`` (default 1). With weight 1 that is ``1 / (k + pos)``. Qdrant's
  default ``k`` is **2**, not the paper's 60, and its ``k`` is the paper's ``k + 1`` because
  the paper counts ranks from 1: the paper's ``k = 60`` is ``k = 61`` here. A weight ``<= 0``
  contributes 0. Only positions matter, never the input scores.
- **DBSF**: each list is normalized on its own with ``(s - (mu - 3 sd)) / (6 sd)``, using the
  mean and the *sample* standard deviation (``n - 1``) of that list's scores; the normalized
  scores of a point are summed across lists. A list of one point, or of equal scores, gives
  0.5 to each. Qdrant does **not** clip: a score more than 3 sd from the mean (possible from 11
  points on) falls outside [0, 1]. ``clip=True`` clips, which is not Qdrant's behaviour.

Conventions of these functions (Qdrant's inputs never break them, so results still match):
an id repeated in one list counts once, at its first (best) position; equal fused scores keep
the order in which ids were first seen (Qdrant leaves ties unordered, so compare scores per id,
or orders only where scores differ). Qdrant computes in f32, these in f64: compare with a
tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import TypeVar

__all__ = [
    "QDRANT_RRF_K",
    "PAPER_RRF_K",
    "reciprocal_rank_fusion",
    "distribution_based_score_fusion",
]

Id = TypeVar("Id", bound=Hashable)

#: Qdrant's default ``k`` (``DEFAULT_RRF_K``), used by ``FusionQuery(fusion=Fusion.RRF)``.
QDRANT_RRF_K = 2
#: The ``k`` of Cormack et al. (2009) expressed in Qdrant's 0-based formula (their 60, plus 1).
PAPER_RRF_K = 61


def _first_occurrences(items: Sequence[Id]) -> list[tuple[int, Id]]:
    """(position, id) for each id's first occurrence, positions as in the input."""
    seen: set[Id] = set()
    out = []
    for pos, item in enumerate(items):
        if item not in seen:
            seen.add(item)
            out.append((pos, item))
    return out


def _sorted_desc(scores: dict[Id, float]) -> list[tuple[Id, float]]:
    # dicts keep insertion order and sorted() is stable, so ties stay in first-seen order.
    return sorted(scores.items(), key=lambda kv: kv[1], reverse=True)


def reciprocal_rank_fusion(
    rankings: Sequence[Sequence[Id]],
    k: int = QDRANT_RRF_K,
    weights: Sequence[float] | None = None,
) -> list[tuple[Id, float]]:
    """Fuse ranked id lists by reciprocal rank, as Qdrant's ``Fusion.RRF`` / ``RrfQuery`` does.

    Each list adds ``1 / ((pos + 1) / w + k - 1)`` to an id at 0-based position ``pos`` (for
    ``w = 1``: ``1 / (k + pos)``, so the top hit adds ``1/k``). The default ``k = 2`` is Qdrant's; pass
    :data:`PAPER_RRF_K` (61) for the original paper's constant.

    Args:
        rankings: Id lists, best first (e.g. dense hits, sparse hits).
        k: Rank constant, at least 1 (Qdrant refuses smaller values).
        weights: One weight per list; a larger weight compresses that list's positions, a
            weight ``<= 0`` silences it (its ids still appear, with what other lists give).

    Returns:
        ``(id, score)`` pairs, highest score first, each id once.

    Raises:
        ValueError: ``k < 1``, or ``weights`` does not have one entry per list.

    Example:
        >>> reciprocal_rank_fusion([["a", "b"], ["b", "c"]])  # a: 1/2; b: 1/3 + 1/2; c: 1/3
        [('b', 0.8333333333333333), ('a', 0.5), ('c', 0.3333333333333333)]
    """
    if k < 1:
        raise ValueError(f"RRF k must be 1 or larger, got {k}")
    if weights is not None and len(weights) != len(rankings):
        raise ValueError(f"RRF needs one weight per ranking: got {len(weights)} weights for {len(rankings)} rankings")
    scores: dict[Id, float] = {}
    for i, ranking in enumerate(rankings):
        w = 1.0 if weights is None else float(weights[i])
        for pos, item in _first_occurrences(ranking):
            # Qdrant's form 1/((pos+1)/w + k - 1), kept literally so weighted scores match it.
            contribution = 1.0 / ((pos + 1) / w + k - 1) if w > 0 else 0.0
            scores[item] = scores.get(item, 0.0) + contribution
    return _sorted_desc(scores)


def _distribution_normalize(scores: Sequence[float], clip: bool) -> list[float]:
    """Map scores to ``(s - (mean - 3 sd)) / (6 sd)``; 0.5 for one score or zero spread."""
    n = len(scores)
    if n == 1:
        return [0.5]
    mean = math.fsum(scores) / n
    variance = math.fsum((s - mean) ** 2 for s in scores) / (n - 1)  # sample variance, as Qdrant
    low = mean - 3.0 * math.sqrt(variance)
    high = mean + 3.0 * math.sqrt(variance)
    if high == low:
        return [0.5] * n
    out = [(s - low) / (high - low) for s in scores]
    if clip:
        out = [min(1.0, max(0.0, v)) for v in out]
    return out


def distribution_based_score_fusion(
    scored: Sequence[Sequence[tuple[Id, float]]],
    *,
    clip: bool = False,
) -> list[tuple[Id, float]]:
    """Fuse scored lists by distribution-based score fusion, as Qdrant's ``Fusion.DBSF`` does.

    Each list is normalized with its own mean ``mu`` and sample standard deviation ``sd`` to
    ``(s - (mu - 3 sd)) / (6 sd)`` (so ``mu`` maps to 0.5 and ``mu ± 3 sd`` to 1 and 0), then
    each id's normalized scores are summed. Scores must be "higher is better" (similarities,
    BM25), as the lists Qdrant fuses for cosine/dot and sparse vectors are.

    Args:
        scored: Lists of ``(id, score)``, best first. Empty lists are ignored.
        clip: Clip normalized scores to [0, 1]. Off by default because Qdrant does not clip;
            turn it on only where matching Qdrant does not matter.

    Returns:
        ``(id, fused score)`` pairs, highest first, each id once.

    Example:
        >>> fused = distribution_based_score_fusion([[("a", 0.9)], [("a", 3.0), ("b", 1.0)]])
        >>> [(i, round(s, 4)) for i, s in fused]  # a: 0.5 + 0.6179; b: 0.3821
        [('a', 1.1179), ('b', 0.3821)]
    """
    fused: dict[Id, float] = {}
    for lst in scored:
        if not lst:
            continue
        # Normalize over the deduplicated list: a repeated id is not a second observation.
        positions = _first_occurrences([item for item, _ in lst])
        ids = [item for _, item in positions]
        normalized = _distribution_normalize([float(lst[pos][1]) for pos, _ in positions], clip)
        for item, value in zip(ids, normalized):
            fused[item] = fused.get(item, 0.0) + value
    return _sorted_desc(fused)
