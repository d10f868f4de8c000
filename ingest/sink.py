"""The idempotent Qdrant sink and the index-state scan that makes re-ingest incremental.

Write semantics (why re-running a killed ingest ends exactly like an uninterrupted one):

* Point ids are deterministic (uuid5 of doc id, chunk index and chunk text), so writing the
  same chunk twice overwrites it: upserts are idempotent.
* Each point records its document's ``fingerprint`` (content hash + everything that shapes
  the points: chunker, embedder, sparse settings) and ``n_chunks``.
* A document is *complete* in the index when all its points carry one fingerprint and their
  number equals ``n_chunks``. Only complete documents with an unchanged fingerprint are
  skipped; anything else (new, changed, half-written by a killed run) is re-embedded.
* A changed document's new points are written first, then its points with any other
  fingerprint are deleted — old chunks are never left beside new ones once its write ends.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ragops.vectorstore.base import Filter, Match, Point, SparseVector, VectorStore

#: Payload fields read back when scanning the index state.
STATE_FIELDS = ("doc_id", "fingerprint", "n_chunks", "source")


def document_fingerprint(content_hash: str, pipeline_fingerprint: str) -> str:
    """Identity of a document's points: its content and the settings that shaped them."""
    return hashlib.sha256(f"{content_hash}:{pipeline_fingerprint}".encode()).hexdigest()[:24]


@dataclass
class DocState:
    """What the index holds for one document."""

    fingerprints: Counter = field(default_factory=Counter)
    n_chunks: int = 0
    source: str = ""

    def complete_fingerprint(self) -> str | None:
        """The fingerprint if the document is fully and only written with it, else None."""
        if len(self.fingerprints) != 1:
            return None
        (fp, count), = self.fingerprints.items()
        return fp if count == self.n_chunks else None


def scan_index(store: VectorStore) -> dict[str, DocState]:
    """Read every document's state from the index (payload fields only, no vectors)."""
    states: dict[str, DocState] = defaultdict(DocState)
    for rec in store.scroll(fields=list(STATE_FIELDS), batch_size=4096):
        p = rec.payload
        st = states[str(p.get("doc_id"))]
        st.fingerprints[str(p.get("fingerprint"))] += 1
        st.n_chunks = int(p.get("n_chunks") or 0)
        st.source = str(p.get("source") or "")
    return dict(states)


def _clean(value: Any) -> Any:
    """Convert numpy scalars/arrays from Ray batches into JSON-able payload values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def rows_to_points(batch: dict[str, Any]) -> list[Point]:
    """Build Qdrant points from the chunk rows of an embedded batch."""
    points: list[Point] = []
    kinds = batch.get("kind")
    n = len(batch["chunk_id"])
    for i in range(n):
        if kinds is not None and kinds[i] != "chunk":
            continue
        metadata = json.loads(batch["metadata_json"][i] or "{}")
        tags = metadata.get("tags") or []
        payload = {
            "doc_id": str(batch["doc_id"][i]),
            "chunk_id": str(batch["chunk_id"][i]),
            "chunk_index": int(batch["chunk_index"][i]),
            "n_chunks": int(batch["n_chunks"][i]),
            "text": str(batch["text"][i]),
            "source": str(batch["source"][i]),
            "title": str(batch["title"][i] or ""),
            "heading_path": [str(h) for h in _clean(batch["heading_path"][i])],
            "content_hash": str(batch["content_hash"][i]),
            "fingerprint": str(batch["fingerprint"][i]),
            "metadata": metadata,
            "tags": [str(t) for t in tags] if isinstance(tags, list) else [str(tags)],
        }
        sparse = None
        if "sparse_indices" in batch and len(batch["sparse_indices"][i]):
            sparse = SparseVector(
                indices=[int(x) for x in _clean(batch["sparse_indices"][i])],
                values=[float(x) for x in _clean(batch["sparse_values"][i])],
            )
        vector = batch["vector"][i]
        points.append(Point(id=payload["chunk_id"], vector=[float(x) for x in vector], payload=payload, sparse=sparse))
    return points


class QdrantSink:
    """Writes embedded chunk batches; finalizes each document once all its chunks are in.

    Single writer by design: with the embedded Edge shard only one process may open it, so the
    Ray pipeline streams embedded batches back to the driver, which owns this sink.

    Args:
        store: An open vector store whose collection exists.
        write_batch_size: Points per upsert call.
    """

    def __init__(self, store: VectorStore, write_batch_size: int = 512) -> None:
        self.store = store
        self.write_batch_size = write_batch_size
        self._pending: list[Point] = []
        self._written: Counter = Counter()
        self._expected: dict[str, tuple[int, str]] = {}
        self.points_written = 0
        self.documents_finalized = 0

    def write_batch(self, batch: dict[str, Any]) -> int:
        """Buffer a batch's chunk points and flush full write batches. Returns points accepted."""
        points = rows_to_points(batch)
        for p in points:
            self._expected[p.payload["doc_id"]] = (p.payload["n_chunks"], p.payload["fingerprint"])
        self._pending.extend(points)
        while len(self._pending) >= self.write_batch_size:
            self._flush_pending(self.write_batch_size)
        return len(points)

    def _flush_pending(self, n: int | None = None) -> None:
        n = len(self._pending) if n is None else n
        if n == 0:
            return
        todo, self._pending = self._pending[:n], self._pending[n:]
        self.store.upsert(todo)
        self.points_written += len(todo)
        touched = Counter(p.payload["doc_id"] for p in todo)
        for doc_id, count in touched.items():
            self._written[doc_id] += count
            expected, fingerprint = self._expected[doc_id]
            if self._written[doc_id] >= expected:
                self._finalize(doc_id, fingerprint)

    def _finalize(self, doc_id: str, fingerprint: str) -> None:
        # New points are in; drop any point of this document written under another fingerprint.
        self.store.delete(Filter(must=[Match("doc_id", [doc_id])], must_not=[Match("fingerprint", [fingerprint])]))
        self.documents_finalized += 1
        del self._written[doc_id]
        del self._expected[doc_id]

    def close(self) -> list[str]:
        """Write what is buffered and flush the store. Returns ids of documents left incomplete."""
        self._flush_pending()
        self.store.flush()
        return sorted(self._expected)

    def delete_documents(self, doc_ids: Iterable[str]) -> int:
        """Delete documents (``--prune``). Returns how many were deleted."""
        ids = list(doc_ids)
        for start in range(0, len(ids), 256):
            self.store.delete_documents(ids[start : start + 256])
        return len(ids)

