"""Collection-level operations behind ``ragops index``: stats and drop."""

from __future__ import annotations

from typing import Any

from ragops.config import Settings
from ragops.errors import CollectionError
from ragops.manifest import last_record
from ragops.vectorstore import open_store
from ragops.vectorstore.base import Filter, Match


def collection_stats(settings: Settings, collection: str | None = None) -> dict[str, Any]:
    """``{collection, documents, points, dim, embedder, last_ingest}`` for one collection.

    Raises:
        CollectionError: the collection does not exist.
    """
    store = open_store(settings.vectorstore, settings.data_dir, collection)
    try:
        spec = store.get_spec()
        if spec is None:
            raise CollectionError(
                f"collection '{store.collection}' does not exist under {settings.data_dir}; "
                "create it with `ragops ingest PATH`"
            )
        points = store.count()
        # Every complete document has exactly one chunk 0: counting them counts documents
        # without reading the payloads.
        documents = store.count(Filter(must=[Match("chunk_index", [0])]))
        name = store.collection
    finally:
        store.close()
    last = last_record(settings.data_dir, name)
    last_ingest = None
    if last:
        last_ingest = {
            "run_id": last.get("run_id"),
            "started_at": last.get("started_at"),
            "duration_s": last.get("duration_s"),
            "new": last.get("new"),
            "updated": last.get("updated"),
            "unchanged": last.get("unchanged"),
            "deleted": last.get("deleted"),
            "failed": last.get("failed_count"),
        }
    return {
        "collection": name,
        "documents": documents,
        "points": points,
        "dim": spec.dim,
        "embedder": spec.embedder,
        "sparse": spec.sparse,
        "last_ingest": last_ingest,
    }


def drop_collection(settings: Settings, collection: str) -> bool:
    """Delete a collection. Returns False when it did not exist."""
    store = open_store(settings.vectorstore, settings.data_dir, collection)
    try:
        if store.get_spec() is None:
            return False
        store.drop()
        return True
    finally:
        store.close()
