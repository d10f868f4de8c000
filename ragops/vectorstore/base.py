"""The vector-store protocol every backend implements, and the neutral types it speaks.

Backends: :mod:`ragops.vectorstore.edge` (Qdrant Edge, embedded, single writer) and
:mod:`ragops.vectorstore.server` (qdrant-client: a Qdrant server, or its local mode in tests).
Callers never import qdrant types: they build :class:`Filter` / :class:`SearchRequest` here and
each backend translates them, so retrieval and ingest code is backend-agnostic.

A collection holds named vectors: ``dense`` (the embedder's, cosine) and, when enabled,
``bm25`` (sparse term weights, IDF applied by the engine). Fusion of the two runs inside the
engine through the query API's prefetch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

DENSE_VECTOR = "dense"
SPARSE_VECTOR = "bm25"

SearchMode = Literal["dense", "sparse", "hybrid"]
FusionMethod = Literal["rrf", "dbsf"]


@dataclass(frozen=True)
class CollectionSpec:
    """What a collection was built with; a mismatch with the configured embedder is refused.

    Attributes:
        name: Collection name.
        dim: Dense vector size.
        embedder: Embedder identity (registry name or path) that produced the vectors.
        distance: Dense distance ('cosine' or 'dot').
        sparse: Whether the collection has the ``bm25`` sparse vector.
    """

    name: str
    dim: int
    embedder: str
    distance: str = "cosine"
    sparse: bool = True


@dataclass
class SparseVector:
    """Sparse vector as parallel index/value lists (indices unique, unsigned 32-bit)."""

    indices: list[int]
    values: list[float]


@dataclass
class Point:
    """One point to upsert: id (UUID string), dense vector, optional sparse vector, payload."""

    id: str
    vector: Sequence[float]
    payload: dict[str, Any]
    sparse: SparseVector | None = None


@dataclass
class Record:
    """A stored point as read back by scroll/retrieve (vectors only when asked for)."""

    id: str
    payload: dict[str, Any]
    vector: list[float] | None = None
    sparse: SparseVector | None = None


@dataclass
class Hit:
    """A search result."""

    id: str
    score: float
    payload: dict[str, Any]


@dataclass
class Match:
    """Condition: payload ``key`` equals one of ``values`` (a single value is fine too)."""

    key: str
    values: list[Any]


@dataclass
class Filter:
    """Conjunction of ``must`` conditions, minus anything matching a ``must_not`` one."""

    must: list[Match] = field(default_factory=list)
    must_not: list[Match] = field(default_factory=list)

    def is_empty(self) -> bool:
        """True when the filter constrains nothing."""
        return not self.must and not self.must_not


@dataclass
class SearchRequest:
    """One query. ``dense`` is needed for dense/hybrid, ``sparse`` for sparse/hybrid."""

    k: int = 10
    mode: SearchMode = "dense"
    dense: Sequence[float] | None = None
    sparse: SparseVector | None = None
    fusion: FusionMethod = "rrf"
    prefetch: int = 50
    filter: Filter | None = None
    score_threshold: float | None = None
    with_payload: bool = True


@runtime_checkable
class VectorStore(Protocol):
    """Operations ingest, retrieval and serving need from a Qdrant backend."""

    collection: str

    def get_spec(self) -> CollectionSpec | None:
        """The collection's spec, or None when it does not exist."""
        ...

    def ensure_collection(self, spec: CollectionSpec) -> None:
        """Create the collection, or check that the existing one matches ``spec``.

        Raises:
            CollectionError: it exists with another embedder, dimension or sparse setting.
        """
        ...

    def upsert(self, points: Sequence[Point]) -> None:
        """Insert or overwrite points by id (idempotent)."""
        ...

    def delete(self, flt: Filter) -> None:
        """Delete every point matching ``flt``."""
        ...

    def delete_documents(self, doc_ids: Iterable[str]) -> None:
        """Delete every point of the given documents."""
        ...

    def count(self, flt: Filter | None = None) -> int:
        """Number of points (matching ``flt``)."""
        ...

    def search(self, request: SearchRequest) -> list[Hit]:
        """Run one query; hybrid fuses inside the engine."""
        ...

    def search_batch(self, requests: Sequence[SearchRequest]) -> list[list[Hit]]:
        """Run several queries at once."""
        ...

    def scroll(
        self,
        flt: Filter | None = None,
        fields: Sequence[str] | None = None,
        batch_size: int = 1024,
        with_vectors: bool = False,
        with_sparse: bool = False,
    ) -> Iterator[Record]:
        """Iterate over all (matching) points; ``fields`` limits the payload returned.

        ``with_sparse`` also returns the stored BM25 vector (what ``ragops index reembed``
        carries over unchanged).
        """
        ...

    def retrieve(self, ids: Sequence[str]) -> list[Record]:
        """Points by id (missing ids are skipped)."""
        ...

    def facet(self, key: str, limit: int = 10_000) -> dict[Any, int]:
        """Distinct values of a payload field with their point counts."""
        ...

    def drop(self) -> None:
        """Delete the collection and its data."""
        ...

    def flush(self) -> None:
        """Make written data durable."""
        ...

    def close(self) -> None:
        """Release the store (for Edge: the shard's lock)."""
        ...
