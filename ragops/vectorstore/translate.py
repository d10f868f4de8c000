"""Helpers shared by the Qdrant backends: filter translation, spec bookkeeping, validation.

Both backends speak the neutral types of :mod:`ragops.vectorstore.base`; this module turns
them into each engine's own types (``qdrant_edge`` and ``qdrant_client.models`` have similar
but distinct classes) and holds the logic that must behave the same on both: what counts as a
collection mismatch, how a facet is counted when the engine cannot, what a search request must
carry.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

from ragops.errors import CollectionError
from ragops.vectorstore.base import CollectionSpec, Filter, Match, SearchRequest, SparseVector

if TYPE_CHECKING:  # imported lazily at run time: each backend needs only its own engine
    import qdrant_edge
    from qdrant_client import models as qmodels

#: Payload fields ingest and retrieval filter on; both backends give them a keyword index.
INDEXED_FIELDS: tuple[str, ...] = ("doc_id", "content_hash", "fingerprint", "source", "tags")

#: RRF rank constant. Qdrant server and qdrant-client use 2 when none is given; Edge needs it
#: spelled out, so both backends pass this one value and fuse identically.
RRF_K = 2

#: Key of the ragops spec inside a server collection's metadata.
SPEC_METADATA_KEY = "ragops_spec"

_DISTANCES = ("cosine", "dot")


# ---------------------------------------------------------------------------------------
# Collection spec
# ---------------------------------------------------------------------------------------


def sparse_from_engine(value: Any) -> SparseVector | None:
    """A stored sparse vector as read back by either engine (``.indices``/``.values``), or None."""
    if value is None or not hasattr(value, "indices"):
        return None
    return SparseVector(indices=[int(i) for i in value.indices], values=[float(v) for v in value.values])


def spec_to_dict(spec: CollectionSpec) -> dict[str, Any]:
    """JSON-ready form of a spec (what the spec file / collection metadata holds)."""
    return asdict(spec)


def spec_from_dict(data: dict[str, Any]) -> CollectionSpec:
    """Inverse of :func:`spec_to_dict`; unknown keys (from a newer ragops) are ignored."""
    known = set(CollectionSpec.__dataclass_fields__)
    return CollectionSpec(**{k: v for k, v in data.items() if k in known})


def normalize_spec(spec: CollectionSpec, collection: str) -> CollectionSpec:
    """Validate ``spec`` and name it after the store's collection (the store is the authority).

    Raises:
        ValueError: the distance or dimension is unusable.
    """
    if spec.distance not in _DISTANCES:
        raise ValueError(f"distance must be one of {_DISTANCES}, got {spec.distance!r}")
    if spec.dim < 1:
        raise ValueError(f"dim must be positive, got {spec.dim}")
    return replace(spec, name=collection) if spec.name != collection else spec


def _describe(spec: CollectionSpec) -> str:
    sparse = "with" if spec.sparse else "without"
    return f"embedder '{spec.embedder}' (dim {spec.dim}, {spec.distance}, {sparse} BM25 sparse vectors)"


def check_spec(existing: CollectionSpec, wanted: CollectionSpec) -> None:
    """Refuse to reuse a collection built with another embedder, dimension or sparse setting.

    Raises:
        CollectionError: the two specs differ in what the stored vectors mean.
    """
    same = (
        existing.dim == wanted.dim
        and existing.embedder == wanted.embedder
        and existing.sparse == wanted.sparse
        and existing.distance == wanted.distance
    )
    if same:
        return
    name = existing.name
    raise CollectionError(
        f"collection '{name}' was built with {_describe(existing)}, but the current configuration "
        f"uses {_describe(wanted)}. Vectors from different embedders cannot be mixed: use another "
        f"collection (--collection NAME), re-embed this one in place with `ragops index reembed "
        f"--embedder {wanted.embedder}`, or run `ragops index drop --collection {name}` and re-ingest."
    )


def missing_collection(name: str, where: str) -> CollectionError:
    """The error raised when an operation needs a collection that does not exist."""
    return CollectionError(
        f"collection '{name}' does not exist in {where}: run `ragops ingest` first, "
        f"or pick an existing collection with --collection"
    )


def dump_spec_json(spec: CollectionSpec) -> str:
    """Pretty JSON of a spec, for the Edge spec file."""
    return json.dumps(spec_to_dict(spec), indent=2, sort_keys=True) + "\n"


# ---------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------


def has_terms(sparse: SparseVector | None) -> bool:
    """True when a sparse vector carries at least one term (an all-stop-word query has none)."""
    return sparse is not None and len(sparse.indices) > 0


def plan_mode(request: SearchRequest, collection_sparse: bool) -> str | None:
    """The mode a request actually runs in, or None when it can only return nothing.

    Hybrid degrades to dense when the query has no terms or the collection has no sparse
    vector: the dense branch alone is then the right answer, and failing a chat request
    because every query word was a stop word would be worse.

    Raises:
        ValueError: a required query vector is missing.
        CollectionError: sparse search on a collection built without sparse vectors.
    """
    if request.k < 1:
        raise ValueError(f"k must be at least 1, got {request.k}")
    if request.mode in ("dense", "hybrid") and request.dense is None:
        raise ValueError(f"{request.mode} search needs a dense query vector")
    if request.mode == "sparse":
        if request.sparse is None:
            raise ValueError("sparse search needs a sparse query vector")
        if not collection_sparse:
            raise CollectionError(
                "sparse search on a collection built without BM25 sparse vectors: "
                "use --mode dense, or re-ingest with ingest.sparse.enabled=true"
            )
        return "sparse" if has_terms(request.sparse) else None
    if request.mode == "hybrid":
        return "hybrid" if collection_sparse and has_terms(request.sparse) else "dense"
    if request.mode == "dense":
        return "dense"
    raise ValueError(f"unknown search mode {request.mode!r}")


def as_float_list(vector: Sequence[float]) -> list[float]:
    """A plain ``list[float]`` from a list, tuple or numpy array (the engines take lists)."""
    if isinstance(vector, list):
        return vector
    tolist = getattr(vector, "tolist", None)
    if tolist is not None:  # numpy: one C call instead of a Python loop per element
        out = tolist()
        if isinstance(out, list):
            return out
    return [float(x) for x in vector]


# ---------------------------------------------------------------------------------------
# Facets
# ---------------------------------------------------------------------------------------


def _facet_values(payload: dict[str, Any], key: str) -> Iterable[Any]:
    """Values of ``key`` (dotted path) in a payload; arrays count each element once."""
    node: Any = payload
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return ()
        node = node[part]
    values = node if isinstance(node, list) else [node]
    # Facets count keyword/int/bool values only, like the engines' facet indexes do; a value
    # repeated inside one point's array counts once for that point.
    seen: set[tuple[type, Any]] = set()
    out: list[Any] = []
    for v in values:
        if isinstance(v, (str, int, bool)) and (type(v), v) not in seen:
            seen.add((type(v), v))
            out.append(v)
    return out


def count_facet(payloads: Iterable[dict[str, Any]], key: str, limit: int) -> dict[Any, int]:
    """Count distinct values of ``key`` across payloads, most frequent first.

    Used where the engine's facet cannot answer (no payload index on the field): scrolling
    the field is O(points) but always correct.
    """
    counts: Counter[tuple[type, Any]] = Counter()
    for payload in payloads:
        for v in _facet_values(payload or {}, key):
            # Tag by type so True and 1 (equal in Python) stay separate buckets.
            counts[(type(v), v)] += 1
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0][1])))
    return {value: n for (_, value), n in ordered[:limit]}


# ---------------------------------------------------------------------------------------
# Filters: Edge
# ---------------------------------------------------------------------------------------


def _check_values(m: Match) -> None:
    for v in m.values:
        if not isinstance(v, (str, int)):
            raise ValueError(
                f"filter on '{m.key}': values must be strings, integers or booleans, got {type(v).__name__}"
            )


def _edge_condition(m: Match) -> Any:
    import qdrant_edge as qe

    _check_values(m)
    if any(isinstance(v, bool) for v in m.values):
        # qdrant-edge 0.9 turns MatchValue(True) into the integer 1, which never matches a
        # stored JSON boolean; failing loudly beats silently matching nothing.
        raise ValueError(
            f"filter on '{m.key}': the embedded store (qdrant-edge) cannot match boolean payload "
            "values; store the flag as a string or an integer"
        )
    if len(m.values) == 1:
        return qe.FieldCondition(m.key, match=qe.MatchValue(m.values[0]))
    if all(isinstance(v, str) for v in m.values) or all(isinstance(v, int) for v in m.values):
        return qe.FieldCondition(m.key, match=qe.MatchAny(list(m.values)))
    # Mixed strings and integers: MatchAny takes one type, so OR single matches instead.
    return qe.Filter(should=[qe.FieldCondition(m.key, match=qe.MatchValue(v)) for v in m.values])


def edge_filter(flt: Filter | None) -> qdrant_edge.Filter | None:
    """Translate a neutral :class:`Filter` to ``qdrant_edge.Filter`` (None when empty)."""
    if flt is None or flt.is_empty():
        return None
    import qdrant_edge as qe

    return qe.Filter(
        must=[_edge_condition(m) for m in flt.must] or None,
        must_not=[_edge_condition(m) for m in flt.must_not] or None,
    )


# ---------------------------------------------------------------------------------------
# Filters: qdrant-client
# ---------------------------------------------------------------------------------------


def _client_condition(m: Match) -> Any:
    from qdrant_client import models as qm

    _check_values(m)
    if len(m.values) == 1:
        return qm.FieldCondition(key=m.key, match=qm.MatchValue(value=m.values[0]))
    if all(isinstance(v, str) for v in m.values) or all(
        isinstance(v, int) and not isinstance(v, bool) for v in m.values
    ):
        return qm.FieldCondition(key=m.key, match=qm.MatchAny(any=list(m.values)))
    # Booleans or mixed types: MatchAny takes strings or integers only.
    return qm.Filter(should=[qm.FieldCondition(key=m.key, match=qm.MatchValue(value=v)) for v in m.values])


def client_filter(flt: Filter | None) -> qmodels.Filter | None:
    """Translate a neutral :class:`Filter` to ``qdrant_client.models.Filter`` (None when empty)."""
    if flt is None or flt.is_empty():
        return None
    from qdrant_client import models as qm

    return qm.Filter(
        must=[_client_condition(m) for m in flt.must] or None,
        must_not=[_client_condition(m) for m in flt.must_not] or None,
    )
