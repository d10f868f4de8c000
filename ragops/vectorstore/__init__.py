"""Vector-store protocol and Qdrant backends.

Callers build neutral requests from :mod:`ragops.vectorstore.base` and get a backend from
:func:`open_store`; they never import ``qdrant_edge`` or ``qdrant_client``::

    store = open_store(settings.vectorstore, settings.data_dir)
    store.ensure_collection(CollectionSpec(name=store.collection, dim=384, embedder="minilm-l6"))
    store.upsert(points)
    hits = store.search(SearchRequest(mode="hybrid", dense=qvec, sparse=qsparse, k=10))
    store.close()

Backends are imported on first use so that importing this package stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ragops.vectorstore.base import (
    DENSE_VECTOR,
    SPARSE_VECTOR,
    CollectionSpec,
    Filter,
    FusionMethod,
    Hit,
    Match,
    Point,
    Record,
    SearchMode,
    SearchRequest,
    SparseVector,
    VectorStore,
)

if TYPE_CHECKING:
    from ragops.config import VectorStoreConfig

__all__ = [
    "DENSE_VECTOR",
    "SPARSE_VECTOR",
    "CollectionSpec",
    "Filter",
    "FusionMethod",
    "Hit",
    "Match",
    "Point",
    "Record",
    "SearchMode",
    "SearchRequest",
    "SparseVector",
    "VectorStore",
    "open_store",
]


def open_store(cfg: VectorStoreConfig, data_dir: Path, collection: str | None = None) -> VectorStore:
    """Open the configured backend on one collection.

    Args:
        cfg: ``settings.vectorstore``. ``backend='edge'`` opens the embedded shard under
            ``data_dir``; ``backend='qdrant'`` connects to ``cfg.url``: an ``http(s)://``
            server (API key from the env var named by ``cfg.api_key_env``), ``':memory:'``
            or ``'path:DIR'`` for qdrant-client's local mode.
        data_dir: The project's data directory (where Edge collections live).
        collection: Overrides ``cfg.collection``. An alias (see
            :mod:`ragops.vectorstore.aliases`) is resolved here, once: the store stays on the
            physical collection it was opened on, whatever the alias does later.

    Returns:
        A store; close it (or use it as a context manager) to release the Edge lock.

    Raises:
        StoreLockedError: the Edge shard (or local folder) is open in another process.
        ConfigError: ``cfg.url`` has no accepted form.
    """
    name = collection or cfg.collection
    if cfg.backend == "edge":
        from ragops.vectorstore.aliases import EdgeCatalog
        from ragops.vectorstore.edge import EdgeStore

        return EdgeStore(Path(data_dir), EdgeCatalog(Path(data_dir)).resolve(name) or name)
    if cfg.backend == "qdrant":
        from ragops.errors import ConfigError
        from ragops.vectorstore.aliases import ServerCatalog
        from ragops.vectorstore.server import QdrantServerStore, connect

        if not cfg.url:
            raise ConfigError("vectorstore.url is required when vectorstore.backend is 'qdrant'")
        client, local, where = connect(cfg.url, api_key_env=cfg.api_key_env, timeout_s=cfg.timeout_s)
        store = QdrantServerStore(client, name, local=local, where=where)
        try:
            store.collection = ServerCatalog(client, local=local, where=where).resolve(name) or name
        except Exception:  # noqa: BLE001 - unreachable: the store's first call reports it, as before
            pass
        return store
    raise ValueError(f"unknown vectorstore backend {cfg.backend!r}")
