"""Embedded backend: the Qdrant engine in-process through Qdrant Edge (``qdrant-edge-py``).

Layout under the project's data dir, one directory per collection::

    <data_dir>/collections/<name>/collection.json   the CollectionSpec (what it was built with)
    <data_dir>/collections/<name>/shard/            the Edge shard (segments, WAL, config)
    <data_dir>/collections/<name>/ragops.pid        PID + command line of the process holding it

Only one process may open a shard: Edge takes an exclusive lock on the shard's WAL and a
second ``EdgeShard.load`` fails with ``WouldBlock``. The pid file exists only to turn that
into a message naming the holder; the lock itself is Edge's.

Gotchas of the Edge 0.9 Python API this module hides from callers:

* point ids come back as :class:`uuid.UUID` (or ``int``): converted to ``str`` here;
* stored cosine vectors are normalised by the engine, so a vector read back differs from
  the one written by a scale factor;
* ``facet`` works only on a field with a payload index (other fields are counted by
  scrolling), and its exact mode reports values of deleted points with count 0 (dropped here);
* ``MatchValue(True)`` is sent as the integer 1 and never matches a JSON boolean, so boolean
  filters are refused (see :mod:`ragops.vectorstore.translate`);
* optimisation (HNSW build, segment merging) runs only when asked: :meth:`EdgeStore.optimize`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import qdrant_edge as qe

from ragops.errors import CollectionError, StoreLockedError
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
    RRF_K,
    as_float_list,
    check_spec,
    count_facet,
    dump_spec_json,
    edge_filter,
    has_terms,
    missing_collection,
    normalize_spec,
    plan_mode,
    sparse_from_engine,
    spec_from_dict,
)

log = logging.getLogger(__name__)

SPEC_FILE = "collection.json"
SHARD_DIR = "shard"
PID_FILE = "ragops.pid"

_DISTANCE = {"cosine": qe.Distance.Cosine, "dot": qe.Distance.Dot}


def collection_dir(data_dir: Path, collection: str) -> Path:
    """Directory holding one collection of the embedded store."""
    return Path(data_dir) / "collections" / collection


def list_collections(data_dir: Path) -> list[str]:
    """Names of the embedded collections under ``data_dir`` (those with a spec file)."""
    root = Path(data_dir) / "collections"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / SPEC_FILE).is_file())


def _is_lock_error(exc: BaseException) -> bool:
    # Edge raises a bare Exception whose text carries the OS error of the WAL's flock.
    text = str(exc)
    return "WouldBlock" in text or ("WAL" in text and "lock" in text.lower())


def _process_cmdline(pid: int) -> str | None:
    """Command line of a live process, or None when it is gone (or not ours to read)."""
    try:
        import psutil

        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return " ".join(proc.cmdline()) or proc.name()
    except Exception:  # psutil missing, process gone, access denied: fall back to /proc
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return raw.replace(b"\0", b" ").decode(errors="replace").strip() or None


class EdgeStore:
    """A collection in the embedded Qdrant Edge store (single process, on-disk shard).

    The shard is opened in the constructor when it exists (taking its lock) and created by
    :meth:`ensure_collection` otherwise, so merely constructing a store for a new collection
    writes nothing.

    Args:
        data_dir: The project's data directory (``settings.data_dir``).
        collection: Collection name (a directory name under ``<data_dir>/collections``).
        max_search_threads: Threads of the shard's search pool; None lets Edge derive it
            from the CPU count.

    Raises:
        StoreLockedError: another process (or another store in this one) has the shard open.
        CollectionError: the shard exists but cannot be opened, or lacks its spec file.
    """

    def __init__(self, data_dir: Path, collection: str, *, max_search_threads: int | None = None) -> None:
        self.collection = collection
        self.data_dir = Path(data_dir)
        self.path = collection_dir(self.data_dir, collection)
        self._shard_path = self.path / SHARD_DIR
        self._spec_path = self.path / SPEC_FILE
        self._pid_path = self.path / PID_FILE
        self._max_search_threads = max_search_threads
        self._shard: qe.EdgeShard | None = None
        self._spec: CollectionSpec | None = None
        self._closed = False
        if self._shard_exists():
            self._spec = self._read_spec()
            self._shard = self._load()

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> EdgeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("open" if self._shard is not None else "absent")
        return f"EdgeStore(collection={self.collection!r}, path='{self.path}', {state})"

    def _shard_exists(self) -> bool:
        return self._shard_path.is_dir() and any(self._shard_path.iterdir())

    def _read_spec(self) -> CollectionSpec | None:
        try:
            return spec_from_dict(json.loads(self._spec_path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            raise CollectionError(
                f"{self._spec_path} is unreadable ({exc}); run `ragops index drop --collection "
                f"{self.collection}` and re-ingest"
            ) from None

    def _write_spec(self, spec: CollectionSpec) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self._spec_path.with_suffix(".json.tmp")
        tmp.write_text(dump_spec_json(spec), encoding="utf-8")
        os.replace(tmp, self._spec_path)  # atomic: a reader never sees half a spec

    def _edge_config(self, spec: CollectionSpec | None = None) -> qe.EdgeConfig | None:
        if spec is None:
            if self._max_search_threads is None:
                return None  # load as persisted
            return qe.EdgeConfig(max_search_threads=self._max_search_threads)
        sparse = {SPARSE_VECTOR: qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)} if spec.sparse else None
        return qe.EdgeConfig(
            vectors={DENSE_VECTOR: qe.EdgeVectorParams(size=spec.dim, distance=_DISTANCE[spec.distance])},
            sparse_vectors=sparse,
            max_search_threads=self._max_search_threads,
        )

    def _locked_error(self) -> StoreLockedError:
        pid: int | None = None
        recorded_cmd: str | None = None
        try:
            first, _, rest = self._pid_path.read_text(encoding="utf-8").partition("\n")
            pid = int(first.strip())
            recorded_cmd = rest.strip() or None
        except (OSError, ValueError):
            pass
        cmd = _process_cmdline(pid) if pid is not None else None
        if pid is not None and pid == os.getpid():
            return StoreLockedError(
                f"the index at {self._shard_path} is already open in this process (PID {pid}); "
                "close the other store on this collection before opening it again"
            )
        if pid is not None and cmd is not None:
            cmd = cmd if len(cmd) <= 200 else cmd[:197] + "..."
            return StoreLockedError(
                f"the index at {self._shard_path} is in use by PID {pid} ({cmd}); "
                "stop that process or point --data-dir elsewhere"
            )
        hint = f" (last recorded holder: PID {pid}, {recorded_cmd})" if pid is not None else ""
        return StoreLockedError(
            f"the index at {self._shard_path} is in use by another process{hint}; "
            "stop that process or point --data-dir elsewhere"
        )

    def _write_pid(self) -> None:
        # Written after the lock is ours, so the file names the live holder; best effort only.
        try:
            self._pid_path.write_text(f"{os.getpid()}\n{' '.join([sys.executable, *sys.argv])}\n", encoding="utf-8")
        except OSError as exc:
            log.debug("could not write %s: %s", self._pid_path, exc)

    def _remove_pid(self) -> None:
        try:
            if self._pid_path.read_text(encoding="utf-8").split("\n", 1)[0].strip() == str(os.getpid()):
                self._pid_path.unlink()
        except (OSError, ValueError):
            pass

    def _load(self) -> qe.EdgeShard:
        try:
            shard = qe.EdgeShard.load(str(self._shard_path), self._edge_config())
        except Exception as exc:
            if _is_lock_error(exc):
                raise self._locked_error() from None
            raise CollectionError(f"cannot open the index at {self._shard_path}: {exc}") from None
        self._write_pid()
        return shard

    def _create(self, spec: CollectionSpec) -> qe.EdgeShard:
        try:
            shard = qe.EdgeShard.create(str(self._shard_path), self._edge_config(spec))
        except Exception as exc:
            if _is_lock_error(exc):
                raise self._locked_error() from None
            if self._shard_exists():  # another process created it between our check and now
                return self._load()
            raise CollectionError(f"cannot create the index at {self._shard_path}: {exc}") from None
        self._write_pid()
        return shard

    def _ensure_indexes(self, shard: qe.EdgeShard) -> None:
        # Keyword indexes make filters on these fields index lookups and enable facet().
        present = shard.info().payload_schema
        for name in INDEXED_FIELDS:
            if name not in present:
                shard.update(qe.UpdateOperation.create_field_index(name, qe.PayloadSchemaType.Keyword))

    def _require(self) -> tuple[qe.EdgeShard, CollectionSpec]:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        if self._shard is None or self._spec is None:
            raise missing_collection(self.collection, str(self.data_dir))
        return self._shard, self._spec

    # -- protocol --------------------------------------------------------------------

    def get_spec(self) -> CollectionSpec | None:
        """The collection's spec, or None when it does not exist."""
        return self._spec if self._shard is not None else None

    def ensure_collection(self, spec: CollectionSpec) -> None:
        """Create the collection (spec file, shard, payload indexes) or check the existing one.

        Raises:
            CollectionError: it exists with another embedder, dimension, distance or sparse
                setting; or its shard exists without a spec file.
        """
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        spec = normalize_spec(spec, self.collection)
        if self._shard is not None:
            if self._spec is None:
                raise CollectionError(
                    f"the index at {self._shard_path} has no {SPEC_FILE}, so what it was built with "
                    f"is unknown: run `ragops index drop --collection {self.collection}` and re-ingest"
                )
            check_spec(self._spec, spec)
            self._ensure_indexes(self._shard)
            return
        # Spec first, shard second: a crash in between leaves a spec without a shard, which
        # the next ensure_collection simply overwrites.
        self._write_spec(spec)
        shard = self._create(spec)
        self._shard, self._spec = shard, spec
        self._ensure_indexes(shard)

    def upsert(self, points: Sequence[Point]) -> None:
        """Insert or overwrite points by id (idempotent).

        Sparse vectors are written only when the collection has them; an empty sparse vector
        (a chunk of stop words) is left out rather than stored.

        Raises:
            ValueError: a dense vector has the wrong dimension.
        """
        shard, spec = self._require()
        if not points:
            return
        out = []
        for p in points:
            dense = as_float_list(p.vector)
            if len(dense) != spec.dim:
                raise ValueError(f"point {p.id}: dense vector has {len(dense)} dims, collection expects {spec.dim}")
            vectors: dict[str, Any] = {DENSE_VECTOR: dense}
            if spec.sparse and has_terms(p.sparse):
                assert p.sparse is not None
                vectors[SPARSE_VECTOR] = qe.SparseVector(list(p.sparse.indices), as_float_list(p.sparse.values))
            out.append(qe.Point(p.id, vectors, p.payload))
        shard.update(qe.UpdateOperation.upsert_points(out))

    def delete(self, flt: Filter) -> None:
        """Delete every point matching ``flt`` (an empty filter matches every point)."""
        shard, _ = self._require()
        translated = edge_filter(flt) or qe.Filter()
        shard.update(qe.UpdateOperation.delete_points_by_filter(translated))

    def delete_documents(self, doc_ids: Iterable[str]) -> None:
        """Delete every point whose payload ``doc_id`` is one of ``doc_ids``."""
        ids = list(dict.fromkeys(doc_ids))
        if ids:
            self.delete(Filter(must=[Match("doc_id", ids)]))

    def count(self, flt: Filter | None = None) -> int:
        """Exact number of points (matching ``flt``)."""
        shard, _ = self._require()
        return shard.count(qe.CountRequest(exact=True, filter=edge_filter(flt)))

    def _query_request(self, req: SearchRequest, mode: str) -> qe.QueryRequest:
        flt = edge_filter(req.filter)
        dense = qe.Query.Nearest(as_float_list(req.dense), using=DENSE_VECTOR) if req.dense is not None else None
        sparse = (
            qe.Query.Nearest(qe.SparseVector(list(req.sparse.indices), as_float_list(req.sparse.values)), using=SPARSE_VECTOR)
            if req.sparse is not None
            else None
        )
        if mode == "hybrid":
            # Each branch carries the filter: fusion only sees candidates that pass it. The
            # threshold is not applied: dense and BM25 scores live on different scales.
            limit = max(req.prefetch, req.k)
            fusion = qe.Fusion.Rrf(k=RRF_K) if req.fusion == "rrf" else qe.Fusion.Dbsf()
            return qe.QueryRequest(
                limit=req.k,
                prefetches=[
                    qe.Prefetch(limit=limit, query=dense, filter=flt),
                    qe.Prefetch(limit=limit, query=sparse, filter=flt),
                ],
                query=fusion,
                with_payload=req.with_payload,
                with_vector=False,
            )
        return qe.QueryRequest(
            limit=req.k,
            query=dense if mode == "dense" else sparse,
            filter=flt,
            score_threshold=req.score_threshold,
            with_payload=req.with_payload,
            with_vector=False,
        )

    @staticmethod
    def _hits(points: Sequence[Any]) -> list[Hit]:
        return [Hit(id=str(p.id), score=float(p.score), payload=p.payload or {}) for p in points]

    def search(self, request: SearchRequest) -> list[Hit]:
        """Run one query; hybrid fuses the dense and BM25 branches inside the engine.

        ``score_threshold`` applies to dense and sparse searches; a hybrid search ignores it
        (fused scores are ranks or normalised blends, not similarities).
        """
        shard, spec = self._require()
        mode = plan_mode(request, spec.sparse)
        if mode is None:
            return []
        return self._hits(shard.query(self._query_request(request, mode)))

    def search_batch(self, requests: Sequence[SearchRequest]) -> list[list[Hit]]:
        """Run several queries as one planned batch (``EdgeShard.query_batch``)."""
        shard, spec = self._require()
        results: list[list[Hit]] = [[] for _ in requests]
        planned = [(i, plan_mode(r, spec.sparse)) for i, r in enumerate(requests)]
        todo = [(i, self._query_request(requests[i], mode)) for i, mode in planned if mode is not None]
        if todo:
            answers = shard.query_batch(qe.QueryBatchRequest([q for _, q in todo]))
            for (i, _), points in zip(todo, answers):
                results[i] = self._hits(points)
        return results

    def scroll(
        self,
        flt: Filter | None = None,
        fields: Sequence[str] | None = None,
        batch_size: int = 1024,
        with_vectors: bool = False,
        with_sparse: bool = False,
    ) -> Iterator[Record]:
        """Iterate over all (matching) points in id order, ``batch_size`` per engine call.

        Args:
            flt: Only points matching this filter.
            fields: Payload keys to return; None returns the whole payload, ``[]`` none.
            batch_size: Points fetched per page.
            with_vectors: Also return the dense vector (as stored: normalised for cosine).
            with_sparse: Also return the BM25 sparse vector (None where the point has none).
        """
        shard, _ = self._require()
        translated = edge_filter(flt)
        with_payload: bool | list[str] = True if fields is None else (list(fields) or False)
        with_vector: bool | list[str] = [DENSE_VECTOR] * with_vectors + [SPARSE_VECTOR] * with_sparse or False
        offset: Any = None
        while True:
            records, offset = shard.scroll(
                qe.ScrollRequest(
                    offset=offset, limit=batch_size, filter=translated, with_payload=with_payload, with_vector=with_vector
                )
            )
            for r in records:
                vec = r.vector or {}
                yield Record(id=str(r.id), payload=r.payload or {}, vector=vec.get(DENSE_VECTOR) if with_vectors else None,
                             sparse=sparse_from_engine(vec.get(SPARSE_VECTOR)) if with_sparse else None)  # fmt: skip
            if offset is None:
                return

    def retrieve(self, ids: Sequence[str]) -> list[Record]:
        """Points by id, in the order asked; missing ids are skipped."""
        shard, _ = self._require()
        if not ids:
            return []
        found = {str(r.id): r for r in shard.retrieve(list(ids), True, False)}
        return [Record(id=i, payload=found[i].payload or {}) for i in ids if i in found]

    def facet(self, key: str, limit: int = 10_000) -> dict[Any, int]:
        """Distinct values of a payload field with their point counts, most frequent first.

        Uses the engine's facet on indexed fields (see ``INDEXED_FIELDS``); Edge refuses to
        facet a field without a payload index, so other fields are counted by scrolling.
        """
        shard, _ = self._require()
        if key in shard.info().payload_schema:
            response = shard.facet(qe.FacetRequest(key, limit=limit, exact=True))
            # An exact facet lists values whose points were all deleted with count 0.
            return {h.value: h.count for h in response if h.count > 0}
        return count_facet((r.payload for r in self.scroll(fields=[key])), key, limit)

    def drop(self) -> None:
        """Delete the collection: close the shard and remove its directory."""
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        if self._shard is not None:
            self._shard.close()
            self._shard = None
        self._remove_pid()
        self._spec = None
        shutil.rmtree(self.path, ignore_errors=True)

    def flush(self) -> None:
        """Write pending changes to disk (segments and WAL)."""
        if self._shard is not None and not self._closed:
            self._shard.flush()

    def close(self) -> None:
        """Flush, release the shard's lock and remove the pid file. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._shard is not None:
            try:
                self._shard.flush()
            finally:
                self._shard.close()
                self._shard = None
                self._remove_pid()

    # -- Edge-only ---------------------------------------------------------------------

    def optimize(self) -> bool:
        """Run Edge's segment optimisers now (HNSW build, merging, vacuum); blocks.

        Edge never optimises in the background, so after a large ingest this makes queries
        use an HNSW index instead of scanning. Returns whether anything changed.
        """
        shard, _ = self._require()
        return shard.optimize()

    def info(self) -> dict[str, Any]:
        """Shard statistics: points, segments, indexed vectors, payload-indexed fields."""
        shard, _ = self._require()
        i = shard.info()
        return {
            "points": i.points_count,
            "segments": i.segments_count,
            "indexed_vectors": i.indexed_vectors_count,
            "payload_indexes": sorted(i.payload_schema),
        }
