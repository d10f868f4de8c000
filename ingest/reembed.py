"""Re-embedding without downtime: ``ragops index reembed``.

A collection's dense vectors are recomputed with another embedder from the chunks the index
already holds — no source document is read or re-chunked — into a *new* physical collection;
then the collection's alias moves to it in one atomic step (:mod:`ragops.vectorstore.aliases`).
Chunk ids, payloads and BM25 sparse vectors are carried over unchanged.

Why this order is crash-safe: until the alias moves nothing that is served changes. A run
killed midway leaves the alias on the old collection and a new one marked ``building``; the
next run with the same embedder resumes it (points already written with the same payload are
skipped, points of chunks that left the source since are deleted), a run with another embedder
drops it and starts over. ``--rollback`` moves the alias back to the collection the live one
replaced; the old collections are kept until dropped with ``ragops index drop``.

Ingest stays incremental: each point's ``fingerprint`` hashes the embedder's name, so the
fingerprints are rewritten for the new embedder (only where the stored one is exactly what the
current chunker/sparse settings would produce — otherwise the next ingest would re-embed that
document anyway, and still does). The embedded text is rebuilt as ingest built it: the heading
label (title > headings) above the chunk text.

Embedded (Edge) store: a shard opens in one process only. When a read-only process (``ragops
serve``) holds the live shard, the chunks are read from a copy of its files (a server never
writes, and Edge does nothing in the background, so the files are stable); a writer holding it
(an ingest, another reembed) is refused with the usual "in use by PID" message. The new
collection is a separate shard, closed before the alias moves, so a running server can open it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ragops.config import Settings
from ragops.errors import CollectionError, InputError, StoreLockedError
from ragops.ingest.chunkers import heading_label
from ragops.ingest.pipeline import pipeline_fingerprint
from ragops.ingest.sink import document_fingerprint
from ragops.manifest import append_record
from ragops.vectorstore.aliases import (
    Catalog,
    EdgeCatalog,
    Lineage,
    check_aliasable,
    lineage_chain,
    next_physical,
    now_iso,
    open_catalog,
)
from ragops.vectorstore.base import CollectionSpec, Filter, Match, Point, Record, VectorStore

log = logging.getLogger(__name__)

ProgressFn = Callable[[dict[str, Any]], None]

#: Holder command lines that write to a shard: their files are not a consistent copy.
_WRITERS = (" ingest", " reembed", "index drop")


@dataclass
class ReembedReport:
    """Outcome of a reembed or a rollback (``--json`` output and manifest record).

    Attributes:
        action: ``reembed`` or ``rollback``.
        collection: The logical name (the alias).
        source: Physical collection read (the one live before).
        target: Physical collection live now.
        embedder, dim: What ``target`` holds.
        previous_embedder, previous_dim: What ``source`` holds.
        points: Points in ``target`` at the end.
        written: Points embedded and written by this run.
        skipped: Points already written by an earlier, interrupted run (resumed).
        removed: Points of an interrupted build whose chunks were no longer in the source.
        fingerprints_updated: Points whose ingest fingerprint was rewritten for the embedder.
        fingerprints_kept: Points whose stored fingerprint the current settings do not
            reproduce (their documents are re-embedded by the next ingest, as before).
        resumed: An interrupted build was continued.
        snapshot_read: The source shard was held by another process and read from a copy.
        duration_s, chunks_per_s: Wall time of the run and written points per second.
    """

    action: str
    collection: str
    source: str
    target: str
    embedder: str
    dim: int
    previous_embedder: str
    previous_dim: int
    points: int = 0
    written: int = 0
    skipped: int = 0
    removed: int = 0
    fingerprints_updated: int = 0
    fingerprints_kept: int = 0
    resumed: bool = False
    snapshot_read: bool = False
    started_at: str = field(default_factory=now_iso)
    duration_s: float = 0.0
    chunks_per_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)


@contextmanager
def reembed_lock(data_dir: Path, logical: str) -> Iterator[None]:
    """One reembed or rollback of a collection at a time (an exclusive ``flock``).

    Raises:
        StoreLockedError: another process holds it.
    """
    path = Path(data_dir) / "aliases" / f"{logical}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise StoreLockedError(
                f"another `ragops index reembed` of '{logical}' is running (PID {holder}); wait for it or stop it"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield
    finally:
        fh.close()  # releases the lock


def embed_text(payload: dict[str, Any], include_heading: bool) -> str:
    """The text ingest embedded for a chunk: its heading label, a blank line, the chunk text."""
    text = str(payload.get("text") or "")
    if not include_heading:
        return text
    label = heading_label(payload.get("title") or None, [str(h) for h in payload.get("heading_path") or []])
    return f"{label}\n\n{text}" if label else text


class _FingerprintMap:
    """Rewrites ingest fingerprints from the old embedder's to the new one's (see module doc)."""

    def __init__(self, settings: Settings, old_embedder: str, new_embedder: str) -> None:
        def with_model(name: str) -> Settings:
            return settings.model_copy(update={"embedder": settings.embedder.model_copy(update={"model": name})})

        self.old_fp = pipeline_fingerprint(with_model(old_embedder))
        self.new_fp = pipeline_fingerprint(with_model(new_embedder))
        self.updated = 0
        self.kept = 0

    def __call__(self, payload: dict[str, Any]) -> dict[str, Any]:
        content_hash = str(payload.get("content_hash") or "")
        if payload.get("fingerprint") == document_fingerprint(content_hash, self.old_fp):
            self.updated += 1
            return {**payload, "fingerprint": document_fingerprint(content_hash, self.new_fp)}
        self.kept += 1
        return payload


def _load_embedder(settings: Settings, embedder: str) -> Any:
    """The new embedder, loaded (so a bad name fails before anything is created)."""
    from ragops.embeddings import TextEmbedder

    cfg = settings.embedder.model_copy(update={"model": embedder, "query_model": None})
    model = TextEmbedder(cfg)
    model.warm_up()
    return model


def _holder(data_dir: Path, physical: str) -> str:
    from ragops.vectorstore.edge import PID_FILE, collection_dir

    try:
        return (collection_dir(data_dir, physical) / PID_FILE).read_text(encoding="utf-8")
    except OSError:
        return ""


@contextmanager
def _open_source(catalog: Catalog, physical: str) -> Iterator[tuple[VectorStore, bool]]:
    """Open the collection to read; an Edge shard held by a reader is read from a copy."""
    try:
        store = catalog.open(physical)
    except StoreLockedError:
        if not isinstance(catalog, EdgeCatalog):
            raise
        holder = _holder(catalog.data_dir, physical)
        if not holder or any(w in holder for w in _WRITERS):
            raise  # a writer's files are not a consistent copy (or we cannot tell who holds it)
        store = None
    if store is not None:
        try:
            yield store, False
        finally:
            store.close()
        return
    from ragops.vectorstore.edge import PID_FILE, EdgeStore, collection_dir

    assert isinstance(catalog, EdgeCatalog)
    scratch = catalog.data_dir / "tmp" / f"reembed-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    copy = collection_dir(scratch, physical)
    log.info("collection '%s' is open in another process (%s); reading a copy", physical, holder.split("\n")[0])
    shutil.copytree(collection_dir(catalog.data_dir, physical), copy, ignore=shutil.ignore_patterns(PID_FILE))
    copied = EdgeStore(scratch, physical)
    try:
        yield copied, True
    finally:
        copied.close()
        shutil.rmtree(scratch, ignore_errors=True)


def _find_build(catalog: Catalog, logical: str, source: str, live: str | None, embedder: str, dim: int) -> str | None:
    """An earlier build for this embedder to resume; unfinished builds for others are dropped."""
    found = None
    for name in catalog.collections():
        if name in (source, live):
            continue
        lin = catalog.lineage(name)
        if lin is None or lin.logical != logical:
            continue
        if lin.embedder == embedder and lin.dim == dim and lin.replaces == source:
            found = name  # building (interrupted) or complete (rolled back from): both resume
        elif lin.state == "building":
            log.info("dropping the unfinished build '%s' (embedder %s)", name, lin.embedder)
            with catalog.open(name) as stale:  # type: ignore[attr-defined]
                stale.drop()
    return found


def _batches(records: Iterator[Record], size: int) -> Iterator[list[Record]]:
    batch: list[Record] = []
    for r in records:
        batch.append(r)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_reembed(
    settings: Settings,
    embedder: str,
    *,
    collection: str | None = None,
    alias: str | None = None,
    batch_size: int = 256,
    progress: ProgressFn | None = None,
) -> ReembedReport:
    """Re-embed a collection with ``embedder`` into a new collection, then move its alias.

    Args:
        settings: Full settings (vectorstore, data_dir; embedder device/batch size/normalize
            for the new model; ingest.chunker/sparse for the fingerprints).
        embedder: Registry name, local sentence-transformers folder, or published artifact.
        collection: The collection (alias or plain) to read; default ``vectorstore.collection``.
        alias: The alias to move; default ``collection`` itself (a new name is needed once
            for a plain collection on a Qdrant server, see :func:`check_aliasable`).
        batch_size: Points read, embedded and written per step.
        progress: Called after each batch with ``{done, total, elapsed}``.

    Raises:
        ModelNotFoundError: ``embedder`` is unknown or cannot be loaded (nothing is changed).
        CollectionError: the collection does not exist, or already uses ``embedder``.
        StoreLockedError: a writer holds the Edge shard, or another reembed is running.
    """
    if batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    source_name = collection or settings.vectorstore.collection
    logical = alias or source_name
    started = time.perf_counter()
    model = _load_embedder(settings, embedder)  # first: an unknown embedder changes nothing
    identity = str(getattr(model, "identity", embedder))
    dim = int(model.dim)
    catalog = open_catalog(settings.vectorstore, settings.data_dir)
    try:
        with reembed_lock(settings.data_dir, logical):
            live = catalog.resolve(logical)
            source = catalog.resolve(source_name) or source_name
            check_aliasable(catalog, logical)  # before building: Qdrant would refuse the switch at the end
            spec = catalog.spec(source)
            if spec is None:
                raise CollectionError(
                    f"collection '{source_name}' does not exist in {catalog.where}; create it with `ragops ingest PATH`"
                )
            if spec.embedder == identity:
                raise CollectionError(
                    f"collection '{logical}' ('{source}') is already embedded with '{identity}': nothing to re-embed"
                )
            report = ReembedReport(
                action="reembed", collection=logical, source=source, target="", embedder=identity, dim=dim,
                previous_embedder=spec.embedder, previous_dim=spec.dim,
            )  # fmt: skip
            _warn_short_model(model, settings)
            _build(catalog, settings, model, spec, report, live, batch_size, progress, started)
            catalog.switch(logical, report.target)  # the one step that changes what is served
    finally:
        catalog.close()
    report.duration_s = round(time.perf_counter() - started, 3)
    report.chunks_per_s = round(report.written / report.duration_s, 1) if report.duration_s else 0.0
    append_record(settings.data_dir, logical, {"kind": "reembed", **report.to_dict()})
    return report


def _warn_short_model(model: Any, settings: Settings) -> None:
    limit = getattr(model, "max_tokens", None)
    if isinstance(limit, int) and limit < settings.ingest.chunker.chunk_tokens:
        log.warning(
            "the new embedder reads at most %d tokens but chunks were cut for %d: their ends are truncated "
            "(re-ingest with a smaller ingest.chunker.chunk_tokens to re-chunk)", limit, settings.ingest.chunker.chunk_tokens,
        )  # fmt: skip


def _build(catalog: Catalog, settings: Settings, model: Any, spec: CollectionSpec, report: ReembedReport,
           live: str | None, batch_size: int, progress: ProgressFn | None, started: float) -> None:  # fmt: skip
    """Fill the new collection (created or resumed) and mark it complete."""
    logical, source = report.collection, report.source
    target = _find_build(catalog, logical, source, live, report.embedder, report.dim)
    report.resumed = target is not None
    target = target or next_physical(catalog, logical, report.embedder)
    report.target = target
    lineage = Lineage(logical=logical, embedder=report.embedder, dim=report.dim, replaces=source,
                      replaces_embedder=spec.embedder)  # fmt: skip
    new_spec = CollectionSpec(name=target, dim=report.dim, embedder=report.embedder, distance=spec.distance,
                              sparse=spec.sparse)  # fmt: skip
    fingerprints = _FingerprintMap(settings, spec.embedder, report.embedder)
    include_heading = settings.ingest.chunker.include_heading
    seen: set[str] = set()
    if isinstance(catalog, EdgeCatalog):
        catalog.set_lineage(target, lineage)  # before the shard: a crash leaves a findable build
    with _open_source(catalog, source) as (src, copied), catalog.open(target) as dst:  # type: ignore[attr-defined]
        report.snapshot_read = copied
        dst.ensure_collection(new_spec)
        if not isinstance(catalog, EdgeCatalog):
            catalog.set_lineage(target, lineage)
        total = src.count()
        for batch in _batches(src.scroll(batch_size=batch_size, with_sparse=spec.sparse), batch_size):
            payloads = [fingerprints(r.payload) for r in batch]
            seen.update(r.id for r in batch)
            done = {r.id: r.payload for r in dst.retrieve([r.id for r in batch])} if report.resumed else {}
            todo = [(r, p) for r, p in zip(batch, payloads) if done.get(r.id) != p]
            report.skipped += len(batch) - len(todo)
            if todo:
                vectors = model.encode_passages([embed_text(p, include_heading) for _, p in todo])
                dst.upsert([Point(id=r.id, vector=v, payload=p, sparse=r.sparse) for (r, p), v in zip(todo, vectors)])
                report.written += len(todo)
            if progress:
                progress({"done": len(seen), "total": total, "elapsed": time.perf_counter() - started})
        if report.resumed and dst.count() != len(seen):
            extra = [r.id for r in dst.scroll(fields=[], batch_size=4096) if r.id not in seen]
            for start in range(0, len(extra), 256):
                dst.delete(Filter(must=[Match("chunk_id", extra[start : start + 256])]))
            report.removed = len(extra)
        dst.flush()
        optimize = getattr(dst, "optimize", None)
        if optimize is not None:
            optimize()  # Edge builds HNSW only when asked: without it queries scan every point
        report.points = dst.count()
    report.fingerprints_updated, report.fingerprints_kept = fingerprints.updated, fingerprints.kept
    lineage.state, lineage.finished_at, lineage.points = "complete", now_iso(), report.points
    catalog.set_lineage(target, lineage)  # the store is closed: a server may open the shard now


def rollback(settings: Settings, *, collection: str | None = None) -> ReembedReport:
    """Move the alias back to the collection the live one replaced.

    Raises:
        CollectionError: the name is no alias (never re-embedded), or the live collection
            replaced none, or that collection has been dropped.
    """
    logical = collection or settings.vectorstore.collection
    started = time.perf_counter()
    catalog = open_catalog(settings.vectorstore, settings.data_dir)
    try:
        with reembed_lock(settings.data_dir, logical):
            live = catalog.resolve(logical)
            if live is None:
                raise CollectionError(
                    f"'{logical}' has never been re-embedded (it is no alias), so there is nothing to roll back to"
                )
            chain = lineage_chain(catalog, live)
            if len(chain) < 2:
                what = "its original collection" if live == logical else f"'{live}'"
                raise CollectionError(f"'{logical}' serves {what}, which replaced no collection: nothing to roll back to")
            previous = chain[1]
            old_spec, new_spec = catalog.spec(live), catalog.spec(previous)
            if new_spec is None:
                raise CollectionError(
                    f"'{logical}' would roll back to '{previous}', which no longer exists in {catalog.where}"
                )
            catalog.switch(logical, previous)
    finally:
        catalog.close()
    report = ReembedReport(
        action="rollback", collection=logical, source=live, target=previous, embedder=new_spec.embedder,
        dim=new_spec.dim, previous_embedder=old_spec.embedder if old_spec else "", previous_dim=old_spec.dim if old_spec else 0,
        duration_s=round(time.perf_counter() - started, 3),
    )  # fmt: skip
    append_record(settings.data_dir, logical, {"kind": "rollback", **report.to_dict()})
    return report


def alias_status(settings: Settings, collection: str | None = None) -> dict[str, Any] | None:
    """``{alias, collection, embedder, chain}`` when ``collection`` is an alias, else None."""
    logical = collection or settings.vectorstore.collection
    catalog = open_catalog(settings.vectorstore, settings.data_dir)
    try:
        live = catalog.resolve(logical)
        if live is None:
            return None
        spec = catalog.spec(live)
        return {"alias": logical, "collection": live, "embedder": spec.embedder if spec else None,
                "chain": lineage_chain(catalog, live)}  # fmt: skip
    finally:
        catalog.close()

