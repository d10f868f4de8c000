"""Collection-level operations behind ``ragops index``: stats and drop (reembed: :mod:`ragops.ingest.reembed`)."""

from __future__ import annotations

from typing import Any

from ragops.config import Settings
from ragops.errors import CollectionError
from ragops.manifest import read_records
from ragops.vectorstore import open_store
from ragops.vectorstore.base import Filter, Match


def collection_stats(settings: Settings, collection: str | None = None) -> dict[str, Any]:
    """``{collection, documents, points, dim, embedder, last_ingest}`` for one collection.

    For an alias (see ``ragops index reembed``) the live collection is described, with
    ``alias: {collection, chain}`` added: the physical collection and those it replaced.

    Raises:
        CollectionError: the collection does not exist.
    """
    from ragops.vectorstore.aliases import lineage_chain, open_catalog

    logical = collection or settings.vectorstore.collection
    catalog = open_catalog(settings.vectorstore, settings.data_dir)
    try:
        physical = catalog.resolve(logical)
        alias = {"collection": physical, "chain": lineage_chain(catalog, physical)} if physical else None
    finally:
        catalog.close()
    store = open_store(settings.vectorstore, settings.data_dir, physical or logical)
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
    finally:
        store.close()
    # Ingest runs are recorded under the name given (reembed/rollback records sit beside them).
    last = next((r for r in reversed(read_records(settings.data_dir, logical)) if "kind" not in r), None)
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
            "embedder_backend": last.get("embedder_backend", "torch"),  # runs before the field: torch
        }
    stats: dict[str, Any] = {
        "collection": logical,
        "documents": documents,
        "points": points,
        "dim": spec.dim,
        "embedder": spec.embedder,
        "sparse": spec.sparse,
        "last_ingest": last_ingest,
    }
    if alias:
        stats["alias"] = alias
    return stats


def drop_collection(settings: Settings, collection: str) -> bool:
    """Delete a physical collection. Returns False when it did not exist.

    A name that is also an alias (an embedded collection from before its first re-embed)
    drops the old collection of that name, never the one the alias serves.

    Raises:
        CollectionError: the collection is served by an alias: roll back or re-embed first.
    """
    from ragops.vectorstore.aliases import open_catalog

    catalog = open_catalog(settings.vectorstore, settings.data_dir)
    try:
        live = catalog.resolve(collection)
        if live == collection or (live is not None and collection not in catalog.collections()):
            raise CollectionError(
                f"'{collection}' is an alias serving '{live}': the live collection cannot be dropped; drop the "
                "collections it no longer serves by their own names (`ragops index stats` lists them)"
            )
        serving = [] if live is not None else _aliases_serving(catalog, collection)
        if serving:
            raise CollectionError(
                f"collection '{collection}' is served by alias '{serving[0]}': roll back or re-embed "
                f"'{serving[0]}' first (`ragops index reembed --help`)"
            )
        store = catalog.open(collection)
        try:
            if store.get_spec() is None:
                return False
            store.drop()
            return True
        finally:
            store.close()
    finally:
        catalog.close()


def _aliases_serving(catalog: Any, physical: str) -> list[str]:
    """Aliases whose live collection is ``physical``."""
    from ragops.vectorstore.aliases import EdgeCatalog

    if isinstance(catalog, EdgeCatalog):
        root = catalog.data_dir / "aliases"
        names = [p.stem for p in root.glob("*.json")] if root.is_dir() else []
    else:
        names = [a.alias_name for a in catalog.client.get_aliases().aliases]
    return [n for n in names if n != physical and catalog.resolve(n) == physical]
