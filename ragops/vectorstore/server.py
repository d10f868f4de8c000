"""Server backend: a Qdrant server through ``qdrant-client`` (or the client's local mode).

The same code drives a real server (``http(s)://...``, writers in parallel) and qdrant-client's
pure-Python local mode (``:memory:`` or an on-disk folder), which speaks the exact client API
and so runs this backend in tests without a server.

Where things live:

* the :class:`~ragops.vectorstore.base.CollectionSpec` is stored in the collection's own
  metadata (``create_collection(metadata=...)``, Qdrant >= 1.16 / qdrant-client >= 1.16) under
  the key ``ragops_spec``; a collection created by another tool has none, and reads back with
  an "unknown" embedder so :meth:`QdrantServerStore.ensure_collection` refuses to mix into it;
* keyword payload indexes are created on a server only: local mode ignores them (with a
  warning), and filters work there without them;
* ``facet``: the server answers only for fields with a payload index (HTTP 400 otherwise), so
  such fields are counted by scrolling; local mode facets any field.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from qdrant_client import QdrantClient
from qdrant_client import models as qm
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from ragops.errors import ConfigError, RagopsError, StoreLockedError
from ragops.vectorstore.base import (
    DENSE_VECTOR,
    SPARSE_VECTOR,
    CollectionSpec,
    Filter,
    Hit,
    Match,
    Point,
    Record,
    SearchRequest,
)
from ragops.vectorstore.translate import (
    INDEXED_FIELDS,
    SPEC_METADATA_KEY,
    as_float_list,
    check_spec,
    client_filter,
    count_facet,
    has_terms,
    missing_collection,
    normalize_spec,
    plan_mode,
    sparse_from_engine,
    spec_from_dict,
    spec_to_dict,
)

log = logging.getLogger(__name__)

_DISTANCE = {"cosine": qm.Distance.COSINE, "dot": qm.Distance.DOT}
_DISTANCE_BACK = {qm.Distance.COSINE: "cosine", qm.Distance.DOT: "dot"}
UNKNOWN_EMBEDDER = "(unknown: collection not created by ragops)"


def connect(url: str, *, api_key_env: str = "QDRANT_API_KEY", timeout_s: float = 30.0) -> tuple[QdrantClient, bool, str]:
    """Build a client for ``url``.

    Args:
        url: ``http(s)://host:port`` for a server, ``:memory:`` for the in-process local
            mode, or ``path:DIR`` for the local mode persisted in ``DIR``.
        api_key_env: Environment variable holding the server's API key (read, never logged).
        timeout_s: Request timeout for a server.

    Returns:
        The client, whether it is the local mode, and a printable location (no secrets).

    Raises:
        ConfigError: the URL has none of the accepted forms.
        StoreLockedError: the ``path:`` folder is open in another client.
    """
    if url == ":memory:":
        return QdrantClient(location=":memory:"), True, "qdrant-client local mode (:memory:)"
    if url.startswith("path:"):
        folder = Path(os.path.expanduser(url[len("path:"):]))
        try:
            client = QdrantClient(path=str(folder))
        except RuntimeError as exc:
            if "already accessed" in str(exc):
                raise StoreLockedError(
                    f"the local Qdrant folder {folder} is in use by another process; stop it, "
                    "or use a Qdrant server for concurrent access"
                ) from None
            raise
        return client, True, f"qdrant-client local mode ({folder})"
    if url.startswith(("http://", "https://")):
        api_key = os.environ.get(api_key_env) or None
        client = QdrantClient(url=url, api_key=api_key, timeout=max(1, math.ceil(timeout_s)))
        return client, False, f"the Qdrant server at {url}"
    raise ConfigError(
        f"vectorstore.url {url!r} is not understood: use http(s)://HOST:PORT for a Qdrant server, "
        "':memory:' for the in-process local mode, or 'path:DIR' for a local folder"
    )


class QdrantServerStore:
    """A collection on a Qdrant server, or in qdrant-client's local mode.

    Args:
        client: A connected :class:`qdrant_client.QdrantClient`.
        collection: Collection name.
        local: Whether ``client`` runs the local mode (no payload indexes there); None
            detects it.
        where: Printable location for messages (must not contain secrets).
        owns_client: Close ``client`` in :meth:`close`.
    """

    def __init__(
        self,
        client: QdrantClient,
        collection: str,
        *,
        local: bool | None = None,
        where: str | None = None,
        owns_client: bool = True,
    ) -> None:
        self.collection = collection
        self.client = client
        # qdrant-client keeps the local engine in a private attribute; only used as a default.
        self.local = local if local is not None else type(getattr(client, "_client", None)).__name__ == "QdrantLocal"
        self.where = where or ("qdrant-client local mode" if self.local else "the Qdrant server")
        self._owns_client = owns_client
        self._spec: CollectionSpec | None = None  # cached: searches need spec.sparse each call

    @classmethod
    def from_url(
        cls, url: str, collection: str, *, api_key_env: str = "QDRANT_API_KEY", timeout_s: float = 30.0
    ) -> QdrantServerStore:
        """Connect with :func:`connect` and open ``collection``."""
        client, local, where = connect(url, api_key_env=api_key_env, timeout_s=timeout_s)
        return cls(client, collection, local=local, where=where)

    def __enter__(self) -> QdrantServerStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"QdrantServerStore(collection={self.collection!r}, {self.where})"

    @contextlib.contextmanager
    def _reach(self) -> Iterator[None]:
        """Turn transport failures into one user-facing message."""
        try:
            yield
        except ResponseHandlingException as exc:
            raise RagopsError(
                f"cannot reach {self.where} ({exc.source}); check vectorstore.url and that the server is running"
            ) from None
        except UnexpectedResponse as exc:
            if exc.status_code in (401, 403):
                raise RagopsError(
                    f"{self.where} refused the request ({exc.status_code}): set the API key in the "
                    "environment variable named by vectorstore.api_key_env"
                ) from None
            raise

    # -- spec --------------------------------------------------------------------------

    def _read_spec(self) -> CollectionSpec | None:
        if not self.client.collection_exists(self.collection):
            return None
        info = self.client.get_collection(self.collection)
        metadata = info.config.metadata or {}
        if isinstance(metadata.get(SPEC_METADATA_KEY), dict):
            return spec_from_dict({**metadata[SPEC_METADATA_KEY], "name": self.collection})
        # Not created by ragops: describe what is there so the mismatch message is useful.
        vectors = info.config.params.vectors
        dense = vectors.get(DENSE_VECTOR) if isinstance(vectors, dict) else None
        return CollectionSpec(
            name=self.collection,
            dim=dense.size if dense is not None else 0,
            embedder=UNKNOWN_EMBEDDER,
            distance=_DISTANCE_BACK.get(dense.distance, str(dense.distance)) if dense is not None else "cosine",
            sparse=SPARSE_VECTOR in (info.config.params.sparse_vectors or {}),
        )

    def get_spec(self) -> CollectionSpec | None:
        """The collection's spec, or None when it does not exist."""
        with self._reach():
            self._spec = self._read_spec()
        return self._spec

    def _require(self) -> CollectionSpec:
        if self._spec is None:
            with self._reach():
                self._spec = self._read_spec()
            if self._spec is None:
                raise missing_collection(self.collection, self.where)
        return self._spec

    def _ensure_indexes(self) -> None:
        if self.local:
            return  # ignored by local mode, which warns on every call
        present = self.client.get_collection(self.collection).payload_schema or {}
        for name in INDEXED_FIELDS:
            if name not in present:
                self.client.create_payload_index(
                    self.collection, field_name=name, field_schema=qm.PayloadSchemaType.KEYWORD, wait=True
                )

    def ensure_collection(self, spec: CollectionSpec) -> None:
        """Create the collection with its spec in the metadata, or check the existing one.

        Safe with parallel writers: a creation that loses the race checks the winner's spec.

        Raises:
            CollectionError: it exists with another embedder, dimension, distance or sparse
                setting (or was not created by ragops).
        """
        spec = normalize_spec(spec, self.collection)
        with self._reach():
            existing = self._read_spec()
            if existing is None:
                try:
                    self.client.create_collection(
                        self.collection,
                        vectors_config={DENSE_VECTOR: qm.VectorParams(size=spec.dim, distance=_DISTANCE[spec.distance])},
                        sparse_vectors_config=(
                            {SPARSE_VECTOR: qm.SparseVectorParams(modifier=qm.Modifier.IDF)} if spec.sparse else None
                        ),
                        metadata={SPEC_METADATA_KEY: spec_to_dict(spec)},
                    )
                except (UnexpectedResponse, ValueError):
                    existing = self._read_spec()  # another writer created it first
                    if existing is None:
                        raise
            if existing is not None:
                check_spec(existing, spec)
            self._ensure_indexes()
            self._spec = existing or spec

    # -- writes ------------------------------------------------------------------------

    def upsert(self, points: Sequence[Point]) -> None:
        """Insert or overwrite points by id (idempotent); waits until applied.

        Raises:
            ValueError: a dense vector has the wrong dimension.
        """
        spec = self._require()
        if not points:
            return
        out = []
        for p in points:
            dense = as_float_list(p.vector)
            if len(dense) != spec.dim:
                raise ValueError(f"point {p.id}: dense vector has {len(dense)} dims, collection expects {spec.dim}")
            vector: dict[str, Any] = {DENSE_VECTOR: dense}
            if spec.sparse and has_terms(p.sparse):
                assert p.sparse is not None
                vector[SPARSE_VECTOR] = qm.SparseVector(indices=list(p.sparse.indices), values=as_float_list(p.sparse.values))
            out.append(qm.PointStruct(id=p.id, vector=vector, payload=p.payload))
        with self._reach():
            self.client.upsert(self.collection, points=out, wait=True)

    def delete(self, flt: Filter) -> None:
        """Delete every point matching ``flt`` (an empty filter matches every point)."""
        self._require()
        selector = qm.FilterSelector(filter=client_filter(flt) or qm.Filter())
        with self._reach():
            self.client.delete(self.collection, points_selector=selector, wait=True)

    def delete_documents(self, doc_ids: Iterable[str]) -> None:
        """Delete every point whose payload ``doc_id`` is one of ``doc_ids``."""
        ids = list(dict.fromkeys(doc_ids))
        if ids:
            self.delete(Filter(must=[Match("doc_id", ids)]))

    # -- reads -------------------------------------------------------------------------

    def count(self, flt: Filter | None = None) -> int:
        """Exact number of points (matching ``flt``)."""
        self._require()
        with self._reach():
            return self.client.count(self.collection, count_filter=client_filter(flt), exact=True).count

    def _query_kwargs(self, req: SearchRequest, mode: str) -> dict[str, Any]:
        flt = client_filter(req.filter)
        dense = as_float_list(req.dense) if req.dense is not None else None
        sparse = (
            qm.SparseVector(indices=list(req.sparse.indices), values=as_float_list(req.sparse.values))
            if req.sparse is not None
            else None
        )
        if mode == "hybrid":
            # Each branch carries the filter; no threshold (fused scores are not similarities).
            # FusionQuery(RRF) uses the engine's k=2, the same RRF_K the Edge backend passes.
            limit = max(req.prefetch, req.k)
            fusion = qm.Fusion.RRF if req.fusion == "rrf" else qm.Fusion.DBSF
            return {
                "prefetch": [
                    qm.Prefetch(query=dense, using=DENSE_VECTOR, filter=flt, limit=limit),
                    qm.Prefetch(query=sparse, using=SPARSE_VECTOR, filter=flt, limit=limit),
                ],
                "query": qm.FusionQuery(fusion=fusion),
                "limit": req.k,
                "with_payload": req.with_payload,
                "with_vector": False,
            }
        return {
            "query": dense if mode == "dense" else sparse,
            "using": DENSE_VECTOR if mode == "dense" else SPARSE_VECTOR,
            "filter": flt,
            "score_threshold": req.score_threshold,
            "limit": req.k,
            "with_payload": req.with_payload,
            "with_vector": False,
        }

    @staticmethod
    def _hits(points: Sequence[qm.ScoredPoint]) -> list[Hit]:
        return [Hit(id=str(p.id), score=float(p.score), payload=p.payload or {}) for p in points]

    def search(self, request: SearchRequest) -> list[Hit]:
        """Run one query (``query_points``); hybrid fuses inside the engine via prefetch.

        ``score_threshold`` applies to dense and sparse searches; hybrid ignores it.
        """
        spec = self._require()
        mode = plan_mode(request, spec.sparse)
        if mode is None:
            return []
        kw = self._query_kwargs(request, mode)
        kw["query_filter"] = kw.pop("filter", None)
        kw["with_vectors"] = kw.pop("with_vector")
        with self._reach():
            return self._hits(self.client.query_points(self.collection, **kw).points)

    def search_batch(self, requests: Sequence[SearchRequest]) -> list[list[Hit]]:
        """Run several queries in one round trip (``query_batch_points``)."""
        spec = self._require()
        results: list[list[Hit]] = [[] for _ in requests]
        planned = [(i, plan_mode(r, spec.sparse)) for i, r in enumerate(requests)]
        todo = [(i, qm.QueryRequest(**self._query_kwargs(requests[i], mode))) for i, mode in planned if mode is not None]
        if todo:
            with self._reach():
                answers = self.client.query_batch_points(self.collection, requests=[q for _, q in todo])
            for (i, _), answer in zip(todo, answers):
                results[i] = self._hits(answer.points)
        return results

    def scroll(
        self,
        flt: Filter | None = None,
        fields: Sequence[str] | None = None,
        batch_size: int = 1024,
        with_vectors: bool = False,
        with_sparse: bool = False,
    ) -> Iterator[Record]:
        """Iterate over all (matching) points, ``batch_size`` per request.

        Args:
            flt: Only points matching this filter.
            fields: Payload keys to return; None returns the whole payload, ``[]`` none.
            batch_size: Points fetched per page.
            with_vectors: Also return the dense vector (as stored: normalised for cosine).
            with_sparse: Also return the BM25 sparse vector (None where the point has none).
        """
        self._require()
        translated = client_filter(flt)
        with_payload: bool | list[str] = True if fields is None else (list(fields) or False)
        wanted = [DENSE_VECTOR] * with_vectors + [SPARSE_VECTOR] * with_sparse
        with_vec: bool | list[str] = wanted or False
        offset: Any = None
        while True:
            with self._reach():
                records, offset = self.client.scroll(
                    self.collection,
                    scroll_filter=translated,
                    limit=batch_size,
                    offset=offset,
                    with_payload=with_payload,
                    with_vectors=with_vec,
                )
            for r in records:
                vectors = r.vector if isinstance(r.vector, dict) else {}
                vector = vectors.get(DENSE_VECTOR) if with_vectors else None
                sparse = sparse_from_engine(vectors.get(SPARSE_VECTOR)) if with_sparse else None
                yield Record(id=str(r.id), payload=r.payload or {}, vector=vector, sparse=sparse)  # type: ignore[arg-type]
            if offset is None:
                return

    def retrieve(self, ids: Sequence[str]) -> list[Record]:
        """Points by id, in the order asked; missing ids are skipped."""
        self._require()
        if not ids:
            return []
        with self._reach():
            got = self.client.retrieve(self.collection, ids=list(ids), with_payload=True, with_vectors=False)
        found = {str(r.id): r for r in got}
        return [Record(id=i, payload=found[i].payload or {}) for i in ids if i in found]

    def facet(self, key: str, limit: int = 10_000) -> dict[Any, int]:
        """Distinct values of a payload field with their point counts, most frequent first.

        The server facets only fields with a payload index and answers 400 for others; those
        are counted by scrolling the one field (correct, O(points)).
        """
        self._require()
        try:
            with self._reach():
                response = self.client.facet(self.collection, key=key, limit=limit, exact=True)
        except UnexpectedResponse as exc:
            if exc.status_code != 400:
                raise
            log.debug("server facet on %r refused (%s); counting by scroll", key, exc.reason_phrase)
            return count_facet((r.payload for r in self.scroll(fields=[key])), key, limit)
        return {h.value: h.count for h in response.hits}

    # -- lifecycle ---------------------------------------------------------------------

    def drop(self) -> None:
        """Delete the collection and its data (no-op when it does not exist)."""
        with self._reach():
            self.client.delete_collection(self.collection)
        self._spec = None

    def flush(self) -> None:
        """No-op: writes wait for the server (its WAL makes them durable); local mode persists each write."""

    def close(self) -> None:
        """Close the client (when this store created it). Safe to call twice."""
        if self._owns_client:
            self._owns_client = False
            self.client.close()
