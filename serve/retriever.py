"""Retriever deployment: vector search and neighbour expansion.

Holds the one open vector store of the app. Queries arrive already encoded (by the query
embedder deployment); each call runs the library's :class:`~ragops.retrieval.search.Retriever`
with a stand-in encoder that hands those vectors back, so search, filters and fusion are
exactly ``ragops search``'s. Reranking (``retrieval.rerank.model``) is not done here: the
ingress asks this deployment for the reranker's candidates and sends them to the reranker
deployment (:mod:`ragops.serve.reranker`), so the cross-encoder scales apart from the store
(one replica with the embedded Edge store) and never holds a search thread.

The embedded Qdrant Edge shard can be opened by one process only: the app refuses more than
one replica of this deployment with the Edge backend, and a replica that starts while an old
one still holds the shard (a redeploy) waits for it to be released. With a Qdrant server the
deployment scales out and searches run ``serve.retriever.search_threads`` at a time.

After ``ragops index reembed`` moves the collection alias, each query is searched in the
collection its vectors were encoded for, and the new one becomes live within seconds
(:mod:`ragops.serve.live`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from ragops.errors import StoreLockedError
from ragops.retrieval.context import expand_neighbors
from ragops.retrieval.encoder import EncodedQuery
from ragops.retrieval.search import Retriever, SearchResult
from ragops.serve.live import LiveStores
from ragops.serve.replica import replica_settings
from ragops.tracking import telemetry
from ragops.vectorstore import VectorStore, open_store

log = logging.getLogger(__name__)

#: How long a new replica waits for a previous holder to release the Edge shard.
LOCK_WAIT_S = 60.0


class GivenQueryVectors:
    """A query-encoder stand-in returning vectors computed elsewhere (the embedder deployment).

    Args:
        encoded: One encoded query per query the retriever will be asked.
        model_name: The embedder's name (for the retriever's messages).
    """

    def __init__(self, encoded: Sequence[EncodedQuery], model_name: str) -> None:
        self._encoded = list(encoded)
        self.model_name = model_name

    @property
    def dim(self) -> int:
        """Dense vector size."""
        dense = self._encoded[0].dense if self._encoded else None
        return int(dense.shape[-1]) if dense is not None else 0

    def warm_up(self) -> None:
        """Nothing to load."""

    def encode_batch(self, queries: Sequence[str], *, with_dense: bool = True) -> list[EncodedQuery]:
        """The given vectors (dense dropped when not wanted, as the real encoder does)."""
        if len(queries) != len(self._encoded):
            raise ValueError(f"{len(queries)} queries but {len(self._encoded)} encoded vectors")
        if with_dense:
            return list(self._encoded)
        return [dataclasses.replace(q, dense=None) for q in self._encoded]


@serve.deployment(name="Retriever")
class RetrieverDeployment:
    """Searches the collection with pre-encoded queries.

    Args:
        settings: The app's settings as a dict.
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = replica_settings(settings, "retriever")
        edge = self.settings.vectorstore.backend == "edge"
        # Edge is single-process and its queries take about a millisecond: one thread.
        workers = 1 if edge else self.settings.serve.retriever.search_threads
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="search")
        # The live collection and any other a query was encoded for (ragops.serve.live).
        self._stores = LiveStores(self.settings, self._open)
        # The library retriever here never reranks (nor loads a cross-encoder): that is the
        # reranker deployment's work, on the candidates the ingress asks for.
        retrieval = self.settings.retrieval.model_copy(
            update={"rerank": self.settings.retrieval.rerank.model_copy(update={"model": None})}
        )
        self._search_settings = self.settings.model_copy(update={"retrieval": retrieval})
        # Fail at start (clear message) rather than on the first query.
        self._retriever([]).spec  # noqa: B018 - checks the collection and its embedder

    @property
    def _store(self) -> VectorStore:
        """The live collection's store."""
        return self._stores.store

    def _open(self, collection: str | None = None) -> VectorStore:
        s = self.settings
        waited = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                return open_store(s.vectorstore, s.data_dir, collection)
            except StoreLockedError:
                if time.monotonic() > waited:
                    raise
                time.sleep(0.5)  # the replica this one replaces may still be closing the shard

    def _retriever(self, encoded: Sequence[EncodedQuery], store: VectorStore | None = None) -> Retriever:
        store = store or self._store
        settings = self._stores.settings_for(store, self._search_settings)
        encoder = GivenQueryVectors(encoded, settings.embedder.model)
        return Retriever(settings, store=store, encoder=encoder)  # type: ignore[arg-type]

    async def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        # The pool thread runs in the caller's context, so the library's spans nest under this replica's.
        return await loop.run_in_executor(self._executor, telemetry.with_context(lambda: fn(*args, **kwargs)))

    async def search(self, query: str, encoded: EncodedQuery, params: dict[str, Any],
                     trace_context: dict[str, str] | None = None) -> SearchResult:  # fmt: skip
        """``ragops search`` for one query: params ``k``, ``mode``, ``fusion``, ``filters``, ``score_threshold``."""
        with telemetry.span("retriever.search", carrier=trace_context, kind=telemetry.SpanKind.SERVER):
            return await self._search(query, encoded, params)

    async def _search(self, query: str, encoded: EncodedQuery, params: dict[str, Any]) -> SearchResult:
        keys = ("k", "mode", "fusion", "filters", "score_threshold")

        def search() -> SearchResult:
            # The collection the query's vectors were made for (they may predate an alias move).
            store = self._stores.get(getattr(encoded, "collection", None))
            return self._retriever([encoded], store).search(query, **{k: params.get(k) for k in keys})

        return await self._run(search)

    async def retrieve(self, query: str, encoded: EncodedQuery, params: dict[str, Any],
                       trace_context: dict[str, str] | None = None) -> SearchResult:  # fmt: skip
        """Hits for answering: :meth:`search`, then :meth:`expand`."""
        with telemetry.span("retriever.retrieve", carrier=trace_context, kind=telemetry.SpanKind.SERVER):
            return await self._expand(await self._search(query, encoded, params))

    async def expand(self, result: SearchResult, trace_context: dict[str, str] | None = None) -> SearchResult:
        """Neighbour expansion of a result's hits (``retrieval.expand_neighbors``; 0: as is)."""
        with telemetry.span("retriever.expand", carrier=trace_context, kind=telemetry.SpanKind.SERVER):
            return await self._expand(result)

    async def _expand(self, result: SearchResult) -> SearchResult:
        n = self.settings.retrieval.expand_neighbors
        if n > 0 and result.hits:
            with telemetry.span("retrieval.expand_neighbors", {"ragops.neighbors": n, "ragops.hits": len(result.hits)}):
                hits = await self._run(expand_neighbors, result.hits, self._store, n)
            result = dataclasses.replace(result, hits=hits)
        return result

    async def health(self, trace_context: dict[str, str] | None = None) -> dict[str, Any]:
        """Whether the store answers: ``{ok, backend, collection, points}``."""
        try:
            points = await self._run(self._store.count)
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            return {"ok": False, "backend": self.settings.vectorstore.backend, "error": str(exc)}
        return {"ok": True, "backend": self.settings.vectorstore.backend, "collection": self._store.collection,
                "points": points}  # fmt: skip

    async def reload(self, trace_context: dict[str, str] | None = None) -> dict[str, Any]:
        """Close and reopen the store (e.g. after the collection was rebuilt on a Qdrant server)."""

        def reopen() -> None:
            self._stores.reopen()
            self._retriever([]).spec  # noqa: B018

        await self._run(reopen)
        return await self.health()

    def check_health(self) -> None:
        """Serve's periodic health check: the store is open and holds the collection."""
        if self._store.get_spec() is None:
            raise RuntimeError(f"collection '{self._store.collection}' is missing")

    def __del__(self) -> None:
        stores = getattr(self, "_stores", None)
        if stores is not None:
            stores.close()  # release the Edge locks for the next replica
