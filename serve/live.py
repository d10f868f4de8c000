"""How a running app follows ``ragops index reembed``: the live collection and its embedder.

``reembed`` moves the collection alias in one step (:mod:`ragops.vectorstore.aliases`). A
replica notices within :data:`~ragops.vectorstore.aliases.RESOLVE_TTL_S` seconds, and no
request fails during the move because a query's vectors and the collection they are searched
in are decided in one place:

* :class:`LiveEncoder` (query-embedder replicas) resolves the alias, loads the new embedder
  *beside* the old one, and only once it is loaded encodes with it — tagging every encoded
  query with the physical collection its vectors belong to (``EncodedQuery.collection``);
* :class:`LiveStores` (the retriever replica) searches the collection a query is tagged with,
  opening it on first use, so a query encoded a moment before the switch still meets the
  collection (and dimension) it was encoded for. Collections no query asked for in
  :data:`IDLE_CLOSE_S` seconds are closed, which releases an old Edge shard.

Chunk ids and payloads are the same in the old and new collection, so neighbour expansion and
the like may use whichever is live.

A served app always follows the alias's embedder: settings reach replicas as plain values,
without the record of which ones the user set explicitly, so the "explicit other embedder"
refusal of :func:`~ragops.vectorstore.aliases.live_settings` cannot apply there.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from ragops.config import Settings
from ragops.retrieval.encoder import QueryEncoder
from ragops.vectorstore import VectorStore
from ragops.vectorstore.aliases import RESOLVE_TTL_S, live_settings, open_catalog

log = logging.getLogger(__name__)

#: Seconds a collection that is no longer live stays open after its last query.
IDLE_CLOSE_S = 30.0


class LiveEncoder:
    """The query encoder of the collection the configured name serves now.

    Args:
        settings: The replica's settings.
        ttl_s: Seconds an alias resolution is reused.

    Raises:
        CollectionError: the configured embedder is refused for the live collection (see
            :func:`~ragops.vectorstore.aliases.live_settings`).
    """

    def __init__(self, settings: Settings, ttl_s: float = RESOLVE_TTL_S) -> None:
        self.settings = settings
        self.ttl_s = ttl_s
        self._catalog = open_catalog(settings.vectorstore, settings.data_dir)
        followed, physical = live_settings(settings, catalog=self._catalog)
        encoder = QueryEncoder(followed.embedder, followed.ingest.sparse)
        encoder.warm_up()
        self._current: tuple[str, Settings, QueryEncoder] = (physical, followed, encoder)
        self._checked = time.monotonic()
        self._loading = False
        self._lock = threading.Lock()

    def current(self) -> tuple[str, Settings, QueryEncoder]:
        """``(physical collection, settings, encoder)`` to encode the next queries with."""
        now = time.monotonic()
        with self._lock:
            due = now - self._checked >= self.ttl_s and not self._loading
            if due:
                self._checked = now
        if due:
            self._refresh()
        return self._current

    def _refresh(self) -> None:
        try:
            followed, physical = live_settings(self.settings, catalog=self._catalog)
        except Exception as exc:  # noqa: BLE001 - keep serving what works, say why
            log.warning("collection alias not followed (%s); still serving '%s'", exc, self._current[0])
            return
        live, _, encoder = self._current
        if physical == live:
            return
        if followed.embedder == self._current[1].embedder:
            self._current = (physical, followed, encoder)  # same model: switch at once
            return
        # Load the new model beside the old one; queries keep the old pair until it is ready.
        self._loading = True
        threading.Thread(target=self._load, args=(physical, followed), name="load-embedder", daemon=True).start()

    def _load(self, physical: str, followed: Settings) -> None:
        try:
            encoder = QueryEncoder(followed.embedder, followed.ingest.sparse)
            encoder.warm_up()
            self._current = (physical, followed, encoder)
            log.info("now encoding queries for '%s' with %s", physical, followed.embedder.model)
        except Exception:  # noqa: BLE001 - retried after the next TTL
            log.exception("could not load embedder %s for '%s'", followed.embedder.model, physical)
        finally:
            self._loading = False

    def close(self) -> None:
        """Release the catalog's connection."""
        self._catalog.close()


class LiveStores:
    """The open collections of a retriever replica: the live one, and any a query still needs.

    Args:
        settings: The replica's settings.
        open_fn: Opens one physical collection (waits for an Edge lock held by a predecessor).
        ttl_s: Seconds an alias resolution is reused.
    """

    def __init__(self, settings: Settings, open_fn: Callable[[str], VectorStore], ttl_s: float = RESOLVE_TTL_S) -> None:
        self.settings = settings
        self.ttl_s = ttl_s
        self._open_fn = open_fn
        self._catalog = open_catalog(settings.vectorstore, settings.data_dir)
        _, self.live = live_settings(settings, catalog=self._catalog)  # refuses a mismatched embedder now
        self._stores: dict[str, VectorStore] = {self.live: open_fn(self.live)}
        self._used: dict[str, float] = {self.live: time.monotonic()}
        self._checked = time.monotonic()
        self._for_collection: dict[str, Settings] = {}
        self._lock = threading.RLock()

    @property
    def store(self) -> VectorStore:
        """The live collection's store (re-resolving the alias when due)."""
        return self.get(None)

    def get(self, name: str | None) -> VectorStore:
        """The store of ``name`` (a physical collection a query was encoded for), or the live one."""
        with self._lock:
            now = time.monotonic()
            if now - self._checked >= self.ttl_s:
                self._checked = now
                try:
                    self.live = self._catalog.resolve(self.settings.vectorstore.collection) or self.settings.vectorstore.collection
                except Exception as exc:  # noqa: BLE001 - keep the current one
                    log.warning("collection alias not re-read (%s); still serving '%s'", exc, self.live)
            name = name or self.live
            store = self._stores.get(name)
            if store is None:
                store = self._stores[name] = self._open_fn(name)
            self._used[name] = now
            for other in [n for n in self._stores if n not in (name, self.live) and now - self._used[n] > IDLE_CLOSE_S]:
                self._stores.pop(other).close()
                self._used.pop(other, None)
            return store

    def settings_for(self, store: VectorStore, base: Settings) -> Settings:
        """``base`` with the embedder the store's collection was built with (the search check then holds)."""
        with self._lock:
            cached = self._for_collection.get(store.collection)
            if cached is None:
                spec = store.get_spec()
                if spec is None or spec.embedder == base.embedder.model:
                    cached = base
                else:
                    embedder = base.embedder.model_copy(update={"model": spec.embedder, "query_model": None})
                    cached = base.model_copy(update={"embedder": embedder})
                self._for_collection[store.collection] = cached
            return cached

    def reopen(self) -> None:
        """Close every store and open the live one again."""
        with self._lock:
            self.close_stores()
            self._checked = 0.0
            self.get(None)

    def close_stores(self) -> None:
        """Close every open store (the Edge locks go with them)."""
        with self._lock:
            for store in self._stores.values():
                store.close()
            self._stores.clear()
            self._used.clear()
            self._for_collection.clear()

    def close(self) -> None:
        """Close the stores and the catalog."""
        self.close_stores()
        self._catalog.close()

