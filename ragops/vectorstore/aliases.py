"""Collection aliases: a logical collection name → the physical collection that serves it.

``ragops index reembed`` builds a new physical collection beside the live one and then moves
the alias in one step, so searches switch from one complete collection to the other and never
see a half-built one. What lives where:

* **The alias.** Qdrant Edge has no aliases, so for the embedded store it is a small JSON file,
  ``<data_dir>/aliases/<name>.json`` (``{"name", "collection", "updated_at", "history"}``),
  replaced atomically (temp file + ``os.replace``): a reader sees the old record or the new
  one, never half of one. On a Qdrant server it is the server's native alias, moved by one
  ``update_collection_aliases`` request (delete + create, applied atomically by Qdrant), so
  every client of the server switches, ragops or not.
* **The lineage.** Each collection ``reembed`` builds records where it came from
  (:class:`Lineage`: logical name, the collection it replaces, embedder, state): Edge in
  ``collections/<physical>/reembed.json``, a server in the collection's metadata
  (``ragops_reembed``). ``--rollback`` follows ``replaces``; a rerun after a crash finds its
  unfinished build through ``state == "building"``. Keeping it on the collection (not only in
  a local file) lets a rollback run from any machine that reaches the server.

No alias means the name *is* the physical collection: data directories from before aliases
keep working unchanged, and the first reembed simply points a new alias over the old name.
(On a server that is impossible: Qdrant refuses an alias named like an existing collection,
see :func:`check_aliasable`.)
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ragops.errors import CollectionError
from ragops.vectorstore.base import CollectionSpec, VectorStore

if TYPE_CHECKING:
    from ragops.config import Settings, VectorStoreConfig

LINEAGE_FILE = "reembed.json"
LINEAGE_METADATA_KEY = "ragops_reembed"


def now_iso() -> str:
    """UTC time stamp for records."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Lineage:
    """What ``reembed`` records on a collection it builds.

    Attributes:
        logical: The alias the collection was built for.
        embedder: Embedder identity of its dense vectors.
        dim: Their dimension.
        replaces: The physical collection that was live when the build started (the rollback
            target); None when nothing was.
        replaces_embedder: That collection's embedder (remembered even once it is dropped, so
            a configuration written for it is still recognised).
        state: ``building`` until every point is written, then ``complete``.
        started_at, finished_at: UTC time stamps.
        points: Points written (set when complete).
    """

    logical: str
    embedder: str
    dim: int
    replaces: str | None
    replaces_embedder: str | None = None
    state: str = "building"
    started_at: str = field(default_factory=now_iso)
    finished_at: str | None = None
    points: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Lineage:
        """Inverse of :meth:`to_dict`; unknown keys are ignored."""
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` so that a reader (or a crash) sees the old file or the new one, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise CollectionError(f"{path} is unreadable ({exc}); fix or delete it") from None
    return data if isinstance(data, dict) else None


class Catalog(Protocol):
    """The collections and aliases of one configured backend, and a way to open them."""

    where: str

    def resolve(self, name: str) -> str | None:
        """The physical collection ``name`` aliases, or None when it is no alias."""
        ...

    def switch(self, name: str, target: str) -> None:
        """Point alias ``name`` at ``target`` in one atomic step."""
        ...

    def spec(self, physical: str) -> CollectionSpec | None:
        """A collection's spec without opening it for search (no Edge lock), or None."""
        ...

    def lineage(self, physical: str) -> Lineage | None:
        """What reembed recorded on a collection, or None."""
        ...

    def set_lineage(self, physical: str, lineage: Lineage) -> None:
        """Record ``lineage`` on an existing (or, for Edge, about to be created) collection."""
        ...

    def collections(self) -> list[str]:
        """Physical collection names."""
        ...

    def open(self, physical: str) -> VectorStore:
        """Open one physical collection (close it when done)."""
        ...

    def close(self) -> None:
        """Release the catalog's connection."""
        ...


class EdgeCatalog:
    """Aliases as JSON files beside the embedded collections (see the module docstring).

    Args:
        data_dir: The project's data directory.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.where = str(self.data_dir)

    def alias_path(self, name: str) -> Path:
        """Where alias ``name`` is recorded."""
        return self.data_dir / "aliases" / f"{name}.json"

    def record(self, name: str) -> dict[str, Any] | None:
        """The alias record (``collection``, ``updated_at``, ``history``), or None."""
        return _read_json(self.alias_path(name))

    def resolve(self, name: str) -> str | None:
        """The physical collection ``name`` aliases, or None when it is no alias."""
        rec = self.record(name)
        return str(rec["collection"]) if rec and rec.get("collection") else None

    def switch(self, name: str, target: str) -> None:
        """Replace the alias file atomically; the collection it pointed at joins ``history``."""
        rec = self.record(name) or {}
        history = list(rec.get("history") or [])
        previous = rec.get("collection") or (name if (self.data_dir / "collections" / name).is_dir() else None)
        if previous and previous != target:
            history.append({"collection": previous, "until": now_iso()})
        _write_json_atomic(
            self.alias_path(name), {"name": name, "collection": target, "updated_at": now_iso(), "history": history[-20:]}
        )

    def spec(self, physical: str) -> CollectionSpec | None:
        """The collection's spec file, when its shard exists (read without taking the lock)."""
        from ragops.vectorstore.edge import SHARD_DIR, SPEC_FILE, collection_dir
        from ragops.vectorstore.translate import spec_from_dict

        path = collection_dir(self.data_dir, physical)
        shard = path / SHARD_DIR
        data = _read_json(path / SPEC_FILE)
        if data is None or not shard.is_dir() or not any(shard.iterdir()):
            return None
        return spec_from_dict({**data, "name": physical})

    def lineage(self, physical: str) -> Lineage | None:
        """``collections/<physical>/reembed.json``, or None."""
        from ragops.vectorstore.edge import collection_dir

        data = _read_json(collection_dir(self.data_dir, physical) / LINEAGE_FILE)
        return Lineage.from_dict(data) if data else None

    def set_lineage(self, physical: str, lineage: Lineage) -> None:
        """Write ``collections/<physical>/reembed.json`` atomically (the directory may not exist yet)."""
        from ragops.vectorstore.edge import collection_dir

        _write_json_atomic(collection_dir(self.data_dir, physical) / LINEAGE_FILE, lineage.to_dict())

    def collections(self) -> list[str]:
        """Embedded collections (directories with a spec file)."""
        from ragops.vectorstore.edge import list_collections

        return list_collections(self.data_dir)

    def open(self, physical: str) -> VectorStore:
        """An :class:`~ragops.vectorstore.edge.EdgeStore` on ``physical`` (takes its lock)."""
        from ragops.vectorstore.edge import EdgeStore

        return EdgeStore(self.data_dir, physical)

    def close(self) -> None:
        """Nothing to release."""


class ServerCatalog:
    """Native Qdrant aliases, and lineage in collection metadata, through one client.

    One client serves every store it opens: qdrant-client's local mode (``:memory:``) is one
    database per client, and a ``path:`` folder admits one client per process.

    Args:
        client: A connected ``QdrantClient``.
        local: Whether it runs qdrant-client's local mode.
        where: Printable location (no secrets).
    """

    def __init__(self, client: Any, *, local: bool, where: str) -> None:
        self.client = client
        self.local = local
        self.where = where
        # Transport and auth failures read as the stores' one-line messages.
        self._reach = self._store("")._reach

    def resolve(self, name: str) -> str | None:
        """The collection alias ``name`` points at, or None."""
        with self._reach():
            aliases = self.client.get_aliases().aliases
        for a in aliases:
            if a.alias_name == name:
                return str(a.collection_name)
        return None

    def switch(self, name: str, target: str) -> None:
        """Delete and recreate the alias in one request: Qdrant applies the list atomically."""
        from qdrant_client import models as qm

        ops: list[Any] = []
        if self.resolve(name) is not None:
            ops.append(qm.DeleteAliasOperation(delete_alias=qm.DeleteAlias(alias_name=name)))
        ops.append(qm.CreateAliasOperation(create_alias=qm.CreateAlias(collection_name=target, alias_name=name)))
        with self._reach():
            self.client.update_collection_aliases(change_aliases_operations=ops)

    def _store(self, physical: str) -> Any:
        from ragops.vectorstore.server import QdrantServerStore

        return QdrantServerStore(self.client, physical, local=self.local, where=self.where, owns_client=False)

    def spec(self, physical: str) -> CollectionSpec | None:
        """The spec in the collection's metadata, or None when it does not exist."""
        if physical not in self.collections():
            return None  # an alias name is no physical collection
        return self._store(physical).get_spec()

    def lineage(self, physical: str) -> Lineage | None:
        """The ``ragops_reembed`` metadata of a collection, or None."""
        if physical not in self.collections():
            return None
        with self._reach():
            data = (self.client.get_collection(physical).config.metadata or {}).get(LINEAGE_METADATA_KEY)
        return Lineage.from_dict(data) if isinstance(data, dict) else None

    def set_lineage(self, physical: str, lineage: Lineage) -> None:
        """Merge the lineage into the collection's metadata."""
        with self._reach():
            self.client.update_collection(physical, metadata={LINEAGE_METADATA_KEY: lineage.to_dict()})

    def collections(self) -> list[str]:
        """Collection names on the server (aliases excluded)."""
        with self._reach():
            return sorted(c.name for c in self.client.get_collections().collections)

    def open(self, physical: str) -> VectorStore:
        """A store on ``physical`` sharing this catalog's client (closing it keeps the client)."""
        return self._store(physical)

    def close(self) -> None:
        """Close the client."""
        self.client.close()


def open_catalog(cfg: VectorStoreConfig, data_dir: Path) -> Catalog:
    """The catalog of the configured backend (a server connection for ``backend='qdrant'``)."""
    if cfg.backend == "edge":
        return EdgeCatalog(Path(data_dir))
    from ragops.errors import ConfigError
    from ragops.vectorstore.server import connect

    if not cfg.url:
        raise ConfigError("vectorstore.url is required when vectorstore.backend is 'qdrant'")
    client, local, where = connect(cfg.url, api_key_env=cfg.api_key_env, timeout_s=cfg.timeout_s)
    return ServerCatalog(client, local=local, where=where)


def check_aliasable(catalog: Catalog, name: str) -> None:
    """Refuse a server collection that cannot become an alias (Qdrant forbids the name clash).

    Raises:
        CollectionError: ``name`` is a plain collection on a Qdrant server.
    """
    if isinstance(catalog, ServerCatalog) and catalog.resolve(name) is None and name in catalog.collections():
        raise CollectionError(
            f"'{name}' on {catalog.where} is a plain collection, and Qdrant refuses an alias named like an "
            "existing collection, so it cannot be switched in place. Re-embed it under a new name once "
            f"(`ragops index reembed --collection {name} --alias NEW_NAME --embedder ...`) and point clients at "
            "NEW_NAME (vectorstore.collection); later re-embeds of NEW_NAME switch without downtime."
        )


def slug(text: str, limit: int = 32) -> str:
    """A collection-name-safe short form of an embedder name or path (``bge-small``)."""
    base = Path(text.rstrip("/")).name or text
    if base in ("st", "model", "hf") and Path(text).parent.name:  # e.g. .../my-model/st
        base = Path(text.rstrip("/")).parent.name
    out = re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-.") or "embedder"
    return out[:limit].rstrip("-.") or "embedder"


_SUFFIX = re.compile(r"-(\d+)$")


def next_physical(catalog: Catalog, logical: str, embedder: str) -> str:
    """``<logical>__<embedder slug>-<n>``, ``n`` one above any build of ``logical`` so far."""
    prefix = f"{logical}__"
    numbers = [int(m.group(1)) for c in catalog.collections() if c.startswith(prefix) and (m := _SUFFIX.search(c))]
    return f"{prefix}{slug(embedder)}-{max(numbers, default=0) + 1}"


def lineage_chain(catalog: Catalog, physical: str, limit: int = 50) -> list[str]:
    """``physical`` and the collections it replaced, newest first (stops at a cycle)."""
    chain = [physical]
    while len(chain) < limit:
        lin = catalog.lineage(chain[-1])
        if lin is None or not lin.replaces or lin.replaces in chain:
            break
        chain.append(lin.replaces)
    return chain


#: Seconds a serving replica reuses an alias resolution before reading it again.
RESOLVE_TTL_S = 2.0


def _earlier_embedders(catalog: Catalog, physical: str) -> set[str]:
    """Embedders of the collections ``physical`` replaced, directly or not (dropped ones too)."""
    out: set[str] = set()
    for name in lineage_chain(catalog, physical):
        lin = catalog.lineage(name)
        if lin is not None and lin.replaces_embedder:
            out.add(lin.replaces_embedder)
        if name != physical and (spec := catalog.spec(name)) is not None:
            out.add(spec.embedder)
    return out


def live_settings(
    settings: Settings, collection: str | None = None, catalog: Catalog | None = None
) -> tuple[Settings, str]:
    """Settings whose embedder matches the collection that serves ``collection`` now, and its name.

    The decision this implements (``ragops index reembed`` moves a collection to another
    embedder; searches, ``serve`` and ``ingest`` must then use that embedder without a config
    change, or a running server could not switch):

    * ``collection`` (default ``vectorstore.collection``) is no alias: the settings are
      returned unchanged, and the usual check (configured embedder = collection's) applies.
    * It is an alias: the live collection's recorded embedder is used when
      ``embedder.model`` was left at its default, names the live embedder, or names an
      embedder the alias served before (a config written before the re-embed). Any other
      explicitly chosen embedder is refused, with the two ways out.

    Args:
        settings: The command's settings.
        collection: The name to resolve (default ``vectorstore.collection``).
        catalog: An open catalog to use (kept open); None opens one for this call.

    Returns:
        ``(settings, physical)``: settings to encode with and the physical collection to open.

    Raises:
        CollectionError: an explicitly configured embedder the alias never served.
    """
    name = collection or settings.vectorstore.collection
    owned = catalog is None
    catalog = catalog or open_catalog(settings.vectorstore, settings.data_dir)
    try:
        physical = catalog.resolve(name)
        if physical is None:
            return settings, name
        spec = catalog.spec(physical)
        if spec is None:
            raise CollectionError(
                f"alias '{name}' points at collection '{physical}', which does not exist in {catalog.where}: "
                f"roll back with `ragops index reembed --rollback --collection {name}`"
            )
        from ragops.embeddings import embedder_identity

        configured = embedder_identity(settings.embedder)
        if configured == spec.embedder:
            return settings, physical
        earlier = _earlier_embedders(catalog, physical)
        if settings.is_explicit("embedder.model") and configured not in earlier:
            raise CollectionError(
                f"collection '{name}' is served by '{physical}', embedded with '{spec.embedder}', but the "
                f"configuration asks for embedder '{configured}'. Search with --set embedder.model={spec.embedder}, "
                f"or re-embed the collection with `ragops index reembed --embedder {configured}`."
            )
    finally:
        if owned:
            catalog.close()
    # A separate query tower belonged to the old passage model: the new one encodes both sides.
    embedder = settings.embedder.model_copy(update={"model": spec.embedder, "query_model": None})
    followed = settings.model_copy(update={"embedder": embedder})
    followed.with_explicit(list(settings.explicit_keys))
    return followed, physical
