"""Dense, BM25 and hybrid search over an ingested collection.

:class:`Retriever` turns a query into hits:

1. encode it (:class:`~ragops.retrieval.encoder.QueryEncoder`: dense vector with the query
   instruction, plus the BM25 vector);
2. run one request against the vector store: ``dense``, ``sparse`` or ``hybrid``, where
   hybrid fuses the two branches *inside* Qdrant (RRF or DBSF over prefetches), and filters
   are applied by the engine in every branch;
3. optionally rerank ``rerank.candidates`` hits with a cross-encoder down to ``k``.

Filters (:class:`SearchFilters`) are conjunctions across keys; several values of one key
match any of them. A ``source`` glob is resolved to the concrete stored ``source`` values
(via the store's facet) before searching, so filtering still happens inside the engine.
"""

from __future__ import annotations

import fnmatch
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ragops.config import Settings
from ragops.errors import CollectionError, InputError
from ragops.retrieval.encoder import EncodedQuery, QueryEncoder
from ragops.retrieval.rerank import Reranker
from ragops.tracking import telemetry
from ragops.vectorstore.base import CollectionSpec, Filter, Hit, Match, SearchRequest, VectorStore

log = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("dense", "sparse", "hybrid")
FUSIONS: tuple[str, ...] = ("rrf", "dbsf")
FILTER_KEYS: tuple[str, ...] = ("source", "doc_id", "tag", "metadata.<field>")

#: Most distinct ``source`` values a glob is resolved against (the facet's limit).
MAX_SOURCES = 1_000_000

_GLOB_CHARS = frozenset("*?[")


# ---------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------


@dataclass
class SearchHit:
    """One retrieved chunk.

    Attributes:
        rank: 1-based position in the result.
        score: Retrieval score (cosine, BM25, fused) or, after reranking, the cross-encoder's.
        doc_id: Id of the source document.
        chunk_id: Id of the chunk (the point id in the store).
        text: The chunk text.
        source: Where the document came from (path or URI).
        metadata: The document's metadata (type, tags, front matter, JSONL fields).
        title: Document title ('' when none).
        heading_path: Headings above the chunk.
        chunk_index: Position of the chunk in its document (-1 when unknown).
        n_chunks: Chunks in the document (0 when unknown).
        retrieval_score: The retrieval score when ``score`` is a rerank score, else None.
    """

    rank: int
    score: float
    doc_id: str
    chunk_id: str
    text: str
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)
    title: str = ""
    heading_path: list[str] = field(default_factory=list)
    chunk_index: int = -1
    n_chunks: int = 0
    retrieval_score: float | None = None

    @classmethod
    def from_store_hit(cls, hit: Hit, rank: int) -> SearchHit:
        """Build a hit from a store hit and its payload (see :mod:`ragops.ingest.sink`)."""
        p = hit.payload or {}
        return cls(
            rank=rank,
            score=float(hit.score),
            doc_id=str(p.get("doc_id", "")),
            chunk_id=str(p.get("chunk_id") or hit.id),
            text=str(p.get("text", "")),
            source=str(p.get("source", "")),
            metadata=dict(p.get("metadata") or {}),
            title=str(p.get("title") or ""),
            heading_path=[str(h) for h in p.get("heading_path") or []],
            chunk_index=int(p.get("chunk_index", -1)),
            n_chunks=int(p.get("n_chunks") or 0),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: rank, score, doc_id, chunk_id, text, source, metadata, then extras."""
        d: dict[str, Any] = {
            "rank": self.rank,
            "score": self.score,
            "doc_id": self.doc_id,
            "chunk_id": self.chunk_id,
            "text": self.text,
            "source": self.source,
            "metadata": self.metadata,
            "title": self.title,
            "heading_path": list(self.heading_path),
            "chunk_index": self.chunk_index,
        }
        if self.retrieval_score is not None:
            d["retrieval_score"] = self.retrieval_score
        return d


@dataclass
class SearchResult:
    """Hits of one query with how long each stage took.

    Attributes:
        hits: Best first, ranks ``1..n``.
        timings: Seconds per stage: ``encode_s``, ``search_s``, ``rerank_s`` (when reranked)
            and ``total_s``. For :meth:`Retriever.search_batch` these are the whole batch's.
        query_truncated: The query was longer than the dense model's limit and was cut.
        mode: The search mode used.
        fusion: The fusion method (meaningful for hybrid).
        reranked: Whether a cross-encoder ordered the hits.
    """

    hits: list[SearchHit]
    timings: dict[str, float]
    query_truncated: bool = False
    mode: str = "hybrid"
    fusion: str = "rrf"
    reranked: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``ragops search --json``)."""
        return {
            "hits": [h.to_dict() for h in self.hits],
            "timings": dict(self.timings),
            "query_truncated": self.query_truncated,
            "mode": self.mode,
            "fusion": self.fusion,
            "reranked": self.reranked,
        }


# ---------------------------------------------------------------------------------------
# Filters
# ---------------------------------------------------------------------------------------


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple, set, frozenset)):
        return list(value)
    return [value]


def _cli_value(raw: str) -> list[Any]:
    """Values a CLI ``metadata.x=v`` matches: the string, and the integer when it is one.

    Payload values keep their JSON type (a JSONL ``"year": 2024`` is an integer), while a
    command line only has strings; matching both forms makes ``metadata.year=2024`` work.
    """
    text = raw.strip()
    try:
        number = int(text)
    except ValueError:
        return [text]
    return [text, number] if str(number) == text else [text]


@dataclass
class SearchFilters:
    """Payload filters applied inside the engine.

    Keys combine with AND; several values of one key match ANY of them.

    Attributes:
        doc_id: Exact document ids.
        tag: Tags; a chunk matches when its ``tags`` contain one of them.
        source: Globs (``fnmatch``, case-sensitive) over the stored ``source`` values; a
            relative pattern also matches at any directory depth (``docs/*.md`` matches
            ``s3://bucket/docs/a.md``).
        metadata: ``field → values``, matched on ``metadata.<field>`` (dotted for nested
            fields: ``front_matter.team``).
    """

    doc_id: list[str] = field(default_factory=list)
    tag: list[str] = field(default_factory=list)
    source: list[str] = field(default_factory=list)
    metadata: dict[str, list[Any]] = field(default_factory=dict)

    def is_empty(self) -> bool:
        """True when nothing is filtered."""
        return not (self.doc_id or self.tag or self.source or self.metadata)

    @classmethod
    def from_pairs(cls, pairs: Iterable[str]) -> SearchFilters:
        """Parse CLI-style ``key=value`` strings.

        Example:
            >>> SearchFilters.from_pairs(["source=*.md", "doc_id=a.md", "tag=gpu", "metadata.type=md"])
            SearchFilters(doc_id=['a.md'], tag=['gpu'], source=['*.md'], metadata={'type': ['md']})

        Raises:
            InputError: a pair has no ``=``, an empty key or value, or an unknown key.
        """
        out = cls()
        for pair in pairs:
            if "=" not in pair:
                raise InputError(f"filter '{pair}': expected key=value, e.g. tag=gpu (keys: {', '.join(FILTER_KEYS)})")
            key, value = (s.strip() for s in pair.split("=", 1))
            if not value:
                raise InputError(f"filter '{pair}': the value is empty")
            out._add(key, _cli_value(value) if key.startswith("metadata.") else [value], origin=f"filter '{pair}'")
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchFilters:
        """Build filters from a mapping (an HTTP request body, a config).

        Accepts ``doc_id``, ``tag`` (or ``tags``), ``source`` with a value or a list of
        values, ``metadata`` as a mapping of field to value(s), and ``metadata.<field>`` keys.
        Values keep their JSON type.

        Raises:
            InputError: an unknown key or a malformed value.
        """
        out = cls()
        for key, value in data.items():
            if key == "metadata":
                if not isinstance(value, Mapping):
                    raise InputError(f"filter 'metadata' must be a mapping of field to value, got {type(value).__name__}")
                for sub, v in value.items():
                    out._add(f"metadata.{sub}", _as_list(v), origin="filter 'metadata'")
            else:
                out._add(str(key), _as_list(value), origin=f"filter '{key}'")
        return out

    def _add(self, key: str, values: list[Any], origin: str) -> None:
        if not values:
            return
        if key == "doc_id":
            self.doc_id.extend(str(v) for v in values)
        elif key in ("tag", "tags"):
            self.tag.extend(str(v) for v in values)
        elif key == "source":
            self.source.extend(str(v) for v in values)
        elif key.startswith("metadata.") and all(key.split(".")[1:]):
            for v in values:
                if not isinstance(v, (str, int)) or isinstance(v, bool):
                    raise InputError(f"{origin}: values must be strings or integers, got {type(v).__name__}")
            self.metadata.setdefault(key.removeprefix("metadata."), []).extend(values)
        else:
            raise InputError(f"{origin}: unknown filter key '{key}'; allowed: {', '.join(FILTER_KEYS)}")

    @staticmethod
    def coerce(filters: SearchFilters | Mapping[str, Any] | Sequence[str] | str | None) -> SearchFilters:
        """Accept filters as :class:`SearchFilters`, a mapping, ``key=value`` string(s) or None."""
        if filters is None:
            return SearchFilters()
        if isinstance(filters, SearchFilters):
            return filters
        if isinstance(filters, str):
            return SearchFilters.from_pairs([filters])
        if isinstance(filters, Mapping):
            return SearchFilters.from_dict(filters)
        if isinstance(filters, (list, tuple)) and all(isinstance(f, str) for f in filters):
            return SearchFilters.from_pairs(filters)
        raise InputError(f"filters must be a mapping or key=value strings, got {type(filters).__name__}")


def source_matches(source: str, pattern: str) -> bool:
    """Whether a stored ``source`` matches a ``source=`` glob (see :class:`SearchFilters`)."""
    if fnmatch.fnmatchcase(source, pattern):
        return True
    # A relative pattern ("docs/*.md", "a.md") is anchored at a directory boundary anywhere.
    relative = not pattern.startswith(("/", "*")) and "://" not in pattern
    return relative and fnmatch.fnmatchcase(source, "*/" + pattern)


class NothingMatches(Exception):
    """The filters select no point at all (a ``source`` glob matched no stored source)."""


def build_filter(filters: SearchFilters, store: VectorStore) -> Filter | None:
    """Translate filters into a store :class:`Filter`.

    ``source`` globs become a ``Match`` on the concrete values they select, found with the
    store's facet (one engine call), so the search itself is still filtered in the engine.

    Returns:
        The filter, or None when nothing is filtered.

    Raises:
        NothingMatches: a ``source`` glob matches no stored source, so no point can pass.
    """
    if filters.is_empty():
        return None
    must: list[Match] = []
    if filters.doc_id:
        must.append(Match("doc_id", list(dict.fromkeys(filters.doc_id))))
    if filters.tag:
        must.append(Match("tags", list(dict.fromkeys(filters.tag))))
    if filters.source:
        must.append(Match("source", _resolve_sources(filters.source, store)))
    for key, values in filters.metadata.items():
        must.append(Match(f"metadata.{key}", list(dict.fromkeys(values))))
    return Filter(must=must)


def _resolve_sources(patterns: list[str], store: VectorStore) -> list[str]:
    exact = [p for p in patterns if not (_GLOB_CHARS & set(p)) and (p.startswith("/") or "://" in p)]
    globs = [p for p in patterns if p not in exact]
    values = list(exact)
    if globs:
        known = store.facet("source", limit=MAX_SOURCES)
        values += [s for s in known if isinstance(s, str) and any(source_matches(s, g) for g in globs)]
    if not values:
        raise NothingMatches
    return list(dict.fromkeys(values))


# ---------------------------------------------------------------------------------------
# Retriever
# ---------------------------------------------------------------------------------------


def _check_choice(kind: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise InputError(f"unknown {kind} '{value}'; allowed: {', '.join(allowed)}")
    return value


class Retriever:
    """Searches one collection: dense, BM25 or hybrid, with filters and optional reranking.

    The store opens lazily (first search or :meth:`warm_up`) unless one is given; the
    collection must exist and have been built with ``settings.embedder.model``. A collection
    name that is an alias (``ragops index reembed``) is resolved once, here, together with
    the embedder of the collection it points at (:func:`~ragops.vectorstore.aliases.live_settings`).

    Args:
        settings: Full settings (embedder, ingest.sparse, vectorstore, retrieval).
        store: An open store to search; the retriever then never closes it. None opens
            ``settings.vectorstore`` on first use and closes it in :meth:`close`.
        collection: Collection name; defaults to the store's, else ``vectorstore.collection``.
        encoder: A query encoder to share (e.g. between Serve deployments); built from the
            settings when None.
        reranker: A reranker to share; built from ``retrieval.rerank`` when that names a model.

    Example:
        >>> with Retriever(settings) as r:  # doctest: +SKIP
        ...     for hit in r.search("how do I request a GPU?", k=3).hits:
        ...         print(hit.rank, hit.doc_id, round(hit.score, 3))
    """

    def __init__(
        self,
        settings: Settings,
        store: VectorStore | None = None,
        collection: str | None = None,
        *,
        encoder: QueryEncoder | None = None,
        reranker: Reranker | None = None,
    ) -> None:
        if store is not None and collection is not None and collection != store.collection:
            raise ValueError(f"collection '{collection}' differs from the given store's '{store.collection}'")
        self.collection = store.collection if store is not None else (collection or settings.vectorstore.collection)
        self._physical = self.collection
        if store is None:
            from ragops.vectorstore.aliases import live_settings

            settings, self._physical = live_settings(settings, self.collection)
        self.settings = settings
        self.encoder = encoder or QueryEncoder(settings.embedder, settings.ingest.sparse)
        rerank_cfg = settings.retrieval.rerank
        self.reranker = reranker or (Reranker(rerank_cfg, device=settings.embedder.device) if rerank_cfg.model else None)
        self._store = store
        self._owns_store = store is None
        self._spec: CollectionSpec | None = None
        self._dim_checked = False
        self._lock = threading.Lock()
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> Retriever:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the store if this retriever opened it (releases the Edge lock). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._store is not None and self._owns_store:
                self._store.close()
            self._store = None

    def warm_up(self) -> None:
        """Open and check the collection, and load the models, before the first query."""
        self._ready()
        self.encoder.warm_up()
        self._check_dim(self.encoder.dim)
        if self.reranker is not None:
            self.reranker.warm_up()

    @property
    def store(self) -> VectorStore:
        """The (checked) store being searched."""
        return self._ready()[0]

    @property
    def spec(self) -> CollectionSpec:
        """What the collection was built with."""
        return self._ready()[1]

    def _ready(self) -> tuple[VectorStore, CollectionSpec]:
        if self._store is not None and self._spec is not None:
            return self._store, self._spec
        with self._lock:
            if self._closed:
                raise RuntimeError("the retriever is closed")
            if self._store is None:
                from ragops.vectorstore import open_store

                self._store = open_store(self.settings.vectorstore, self.settings.data_dir, self._physical)
            try:
                self._spec = self._check_spec(self._store.get_spec())
            except Exception:
                if self._owns_store:  # do not keep the Edge lock for a collection we refuse
                    self._store.close()
                    self._store = None
                raise
            return self._store, self._spec

    def _check_spec(self, spec: CollectionSpec | None) -> CollectionSpec:
        name = self.collection
        if spec is None:
            raise CollectionError(f"collection '{name}' does not exist; run `ragops ingest PATH --collection {name}`")
        from ragops.embeddings import embedder_identity

        configured = embedder_identity(self.settings.embedder)
        if spec.embedder != configured:
            raise CollectionError(
                f"collection '{name}' was built with embedder '{spec.embedder}', but the configuration uses "
                f"'{configured}': query vectors from another embedder do not live in the same space as the "
                f"stored ones. Search with --set embedder.model={spec.embedder}, re-embed the collection "
                f"with `ragops index reembed --embedder {configured}`, or re-ingest into another "
                f"collection with the current embedder (ragops ingest PATH --collection NAME)."
            )
        return spec

    def _check_dim(self, dim: int) -> None:
        if self._dim_checked:
            return
        spec = self._ready()[1]
        if dim != spec.dim:
            raise CollectionError(
                f"the query encoder '{self.encoder.model_name}' makes {dim}-dim vectors but collection "
                f"'{self.collection}' holds {spec.dim}-dim vectors: embedder.query_model must be the query "
                "tower of the passage model the collection was built with"
            )
        self._dim_checked = True

    # -- search --------------------------------------------------------------------------
    def search(
        self,
        query: str,
        *,
        k: int | None = None,
        mode: str | None = None,
        fusion: str | None = None,
        filters: SearchFilters | Mapping[str, Any] | Sequence[str] | None = None,
        score_threshold: float | None = None,
        rerank: bool | None = None,
    ) -> SearchResult:
        """Search for one query.

        Args:
            query: The query text.
            k: Hits to return (default ``retrieval.k``).
            mode: ``dense``, ``sparse`` or ``hybrid`` (default ``retrieval.mode``).
            fusion: ``rrf`` or ``dbsf`` for hybrid (default ``retrieval.fusion``).
            filters: :class:`SearchFilters`, a mapping, or ``key=value`` strings.
            score_threshold: Drop hits scoring below this (default
                ``retrieval.score_threshold``). Applies to dense and sparse scores; hybrid
                search ignores it, since fused scores are ranks, not similarities.
            rerank: Use the cross-encoder (default: when ``retrieval.rerank.model`` is set).

        Returns:
            The hits, stage timings and whether the query was truncated.

        Raises:
            InputError: empty query, unknown mode/fusion/filter key, or ``k < 1``.
            CollectionError: the collection is missing, was built with another embedder,
                or has no BM25 vectors for a sparse search.
        """
        return self.search_batch(
            [query], k=k, mode=mode, fusion=fusion, filters=filters, score_threshold=score_threshold, rerank=rerank
        )[0]

    def search_batch(
        self,
        queries: Sequence[str],
        *,
        k: int | None = None,
        mode: str | None = None,
        fusion: str | None = None,
        filters: SearchFilters | Mapping[str, Any] | Sequence[str] | None = None,
        score_threshold: float | None = None,
        rerank: bool | None = None,
    ) -> list[SearchResult]:
        """Search for several queries: one batched encode, one batched store call.

        Same arguments as :meth:`search`, shared by every query. Each result's ``timings``
        are those of the whole batch.
        """
        started = time.perf_counter()
        rc = self.settings.retrieval
        k = rc.k if k is None else int(k)
        if k < 1:
            raise InputError(f"k must be at least 1, got {k}")
        mode = _check_choice("search mode", mode or rc.mode, MODES)
        fusion = _check_choice("fusion method", fusion or rc.fusion, FUSIONS)
        threshold = rc.score_threshold if score_threshold is None else score_threshold
        if mode == "hybrid" and score_threshold is not None:
            log.warning("score_threshold is ignored in hybrid mode (fused scores are not similarities)")
        use_rerank = (self.reranker is not None) if rerank is None else bool(rerank)
        if use_rerank and self.reranker is None:
            raise InputError("reranking was asked for but retrieval.rerank.model is not set")
        flt_spec = SearchFilters.coerce(filters)
        if not queries:
            return []

        store, spec = self._ready()
        if mode == "sparse" and not spec.sparse:
            raise CollectionError(
                f"collection '{self.collection}' was built without BM25 sparse vectors, so sparse search "
                "cannot run: use --mode dense, or re-ingest with ingest.sparse.enabled=true"
            )

        t0 = time.perf_counter()
        with telemetry.span("retrieval.encode", {"ragops.queries": len(queries), "ragops.dense": mode != "sparse"}):
            encoded = self.encoder.encode_batch(queries, with_dense=mode != "sparse")
        if mode != "sparse" and encoded:
            assert encoded[0].dense is not None
            self._check_dim(int(encoded[0].dense.shape[-1]))
        timings = {"encode_s": time.perf_counter() - t0}

        t0 = time.perf_counter()
        fetch = max(k, self.settings.retrieval.rerank.candidates) if use_rerank else k
        # Hybrid search is one engine call: Qdrant runs the dense and the BM25 branch as
        # prefetches and fuses them inside the query, so their times cannot be told apart from
        # here; the span says which branches and which fusion ran instead of inventing timings.
        query_attrs = {
            "ragops.retrieval.mode": mode,
            "ragops.retrieval.branches": {"hybrid": "dense,sparse"}.get(mode, mode),
            "ragops.retrieval.fusion": fusion if mode == "hybrid" else None,
            "ragops.retrieval.prefetch": self.settings.retrieval.prefetch if mode == "hybrid" else None,
            "ragops.retrieval.k": fetch,
            "db.system.name": "qdrant",
        }
        with telemetry.span("retrieval.query", query_attrs) as query_span:
            try:
                flt = build_filter(flt_spec, store)
            except NothingMatches:
                hit_lists: list[list[SearchHit]] = [[] for _ in encoded]
            else:
                requests = [self._request(q, fetch, mode, fusion, flt, threshold) for q in encoded]
                raw = [store.search(requests[0])] if len(requests) == 1 else store.search_batch(requests)
                hit_lists = [[SearchHit.from_store_hit(h, i) for i, h in enumerate(hs, start=1)] for hs in raw]
            query_span.set_attribute("ragops.retrieval.hits", sum(len(h) for h in hit_lists))
        timings["search_s"] = time.perf_counter() - t0

        if use_rerank:
            assert self.reranker is not None
            t0 = time.perf_counter()
            with telemetry.span("rerank", {"ragops.candidates": sum(len(h) for h in hit_lists), "ragops.k": k}):
                hit_lists = self.reranker.rerank_batch(list(queries), hit_lists, top_k=k)
            timings["rerank_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - started
        return [
            SearchResult(
                hits=hits,
                timings=dict(timings),
                query_truncated=q.truncated,
                mode=mode,
                fusion=fusion,
                reranked=use_rerank,
            )
            for q, hits in zip(encoded, hit_lists)
        ]

    def _request(
        self, q: EncodedQuery, k: int, mode: str, fusion: str, flt: Filter | None, threshold: float | None
    ) -> SearchRequest:
        return SearchRequest(
            k=k,
            mode=mode,  # type: ignore[arg-type]  # validated against MODES
            dense=q.dense,
            sparse=q.sparse,
            fusion=fusion,  # type: ignore[arg-type]  # validated against FUSIONS
            prefetch=self.settings.retrieval.prefetch,
            filter=flt,
            score_threshold=threshold if mode != "hybrid" else None,
        )
