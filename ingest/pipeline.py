"""The ingest pipeline: discover → load → skip unchanged → chunk → embed → write, incrementally.

Stages are plain callables over columnar batches; :func:`run_ingest` runs them in-process
(``ingest.runner=local``) or hands them to Ray Data (``ingest.runner=ray``, the default; see
:mod:`ragops.ingest.ray_pipeline`). Either way the driver owns the single writer.

One stream carries two kinds of rows, so a single streaming pass yields both the chunks to
write and the per-document outcome for the summary, without materializing anything:

* ``kind="doc"``: one per document (or failed file): its ``status`` — new, updated,
  unchanged or failed — and a ``reason`` for failures;
* ``kind="chunk"``: one per chunk of a new or updated document.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ragops.ingest.chunkers import Chunker
from ragops.ingest.embed import EmbedStage
from ragops.ingest.loaders import LoadError, SourceFile, discover, load_file
from ragops.ingest.sink import QdrantSink, document_fingerprint, scan_index

from ragops.config import Settings
from ragops.documents import Chunk, Document
from ragops.errors import CollectionError, InputError
from ragops.manifest import append_record
from ragops.model_registry import resolve_model
from ragops.vectorstore import open_store
from ragops.vectorstore.aliases import live_settings
from ragops.watchdog import Watchdog
from ragops.vectorstore.base import CollectionSpec, VectorStore
from ragops.tracking import telemetry

log = logging.getLogger(__name__)

Batch = dict[str, Any]

#: Columns of every row in the stream (doc rows leave chunk columns empty).
ROW_COLUMNS = (
    "kind", "status", "reason", "file", "doc_id", "chunk_id", "chunk_index", "n_chunks", "text", "embed_text",
    "heading_path", "source", "title", "content_hash", "fingerprint", "metadata_json",
)  # fmt: skip


def pipeline_fingerprint(settings: Settings) -> str:
    """Hash of every setting that changes the points a document produces."""
    shaping = {
        "embedder": {k: settings.embedder.model_dump()[k] for k in ("model", "normalize", "max_seq_length")},
        "chunker": settings.ingest.chunker.model_dump(),
        "sparse": settings.ingest.sparse.model_dump(),
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=4)
def load_tokenizer(model: str, registry: tuple[str, str] | None = None) -> Any:
    """The embedder's tokenizer alone (chunking needs no model weights).

    Args:
        model: The embedder as configured.
        registry: Where published embedder artifacts resolve (``EmbedderConfig._registry``).
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_model(model, kind="embedder", registry=registry).locate()))


def _empty_batch() -> dict[str, list[Any]]:
    return {c: [] for c in ROW_COLUMNS}


class LoadChunkStage:
    """Loads a batch of files, drops unchanged documents, and chunks the rest.

    Args:
        settings: Full settings (loader, chunker and embedder tokenizer are used).
        known: ``doc_id → fingerprint`` of documents complete in the index.
        indexed: ids of every document with points in the index (complete or not), to tell
            "new" from "updated".
    """

    def __init__(self, settings: Settings, known: dict[str, str], indexed: set[str] | None = None) -> None:
        self.settings = settings
        self.known = known
        self.indexed = set(known) if indexed is None else indexed
        self.pipeline_fp = pipeline_fingerprint(settings)
        self._chunker: Chunker | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Ship config and the known-document map, never a loaded tokenizer.
        return {**self.__dict__, "_chunker": None}

    @property
    def chunker(self) -> Chunker:
        """The chunker, built on first use with the embedder's tokenizer."""
        if self._chunker is None:
            self._chunker = Chunker(self.settings.ingest.chunker, load_tokenizer(self.settings.embedder.model, self.settings.embedder._registry))
        return self._chunker

    def __call__(self, batch: Batch) -> Batch:
        """Process the files of one batch (columns of :class:`SourceFile` fields)."""
        out = _empty_batch()
        files = [SourceFile.from_row({k: _scalar(batch[k][i]) for k in batch}) for i in range(len(batch["rel_path"]))]
        for sf in files:
            for kind, payload in self._process_file(sf):
                _append_row(out, kind, payload)
        return out

    def _process_file(self, sf: SourceFile) -> Iterator[tuple[str, dict[str, Any]]]:
        try:
            docs, errors = _load(sf, self.settings)
        except LoadError as exc:
            yield "doc", {"status": "failed", "reason": exc.reason, "doc_id": sf.rel_path, "file": sf.rel_path, "source": sf.path}
            return
        for err in errors:
            yield "doc", {"status": "failed", "reason": err.reason, "doc_id": f"{sf.rel_path}:{err.line}" if err.line else sf.rel_path, "file": sf.rel_path, "source": sf.path}
        for doc in docs:
            fp = document_fingerprint(doc.content_hash, self.pipeline_fp)
            previous = self.known.get(doc.doc_id)
            if previous == fp:
                yield "doc", {"status": "unchanged", "doc_id": doc.doc_id, "file": sf.rel_path, "source": doc.source}
                continue
            try:
                chunks = self.chunker(doc)
            except Exception as exc:  # noqa: BLE001 - one bad document must not stop the run
                yield "doc", {"status": "failed", "reason": f"chunking failed: {exc}", "doc_id": doc.doc_id, "file": sf.rel_path, "source": doc.source}
                continue
            if not chunks:
                yield "doc", {"status": "failed", "reason": "no text to index", "doc_id": doc.doc_id, "file": sf.rel_path, "source": doc.source}
                continue
            status = "updated" if doc.doc_id in self.indexed else "new"
            yield "doc", {"status": status, "doc_id": doc.doc_id, "file": sf.rel_path, "source": doc.source, "n_chunks": len(chunks)}
            for ch in chunks:
                yield "chunk", _chunk_row(ch, len(chunks), fp, sf.rel_path)


def _scalar(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _load(sf: SourceFile, settings: Settings) -> tuple[list[Document], list[LoadError]]:
    """Load one file; JSONL files may return per-line errors beside their documents."""
    errors: list[LoadError] = []
    docs = load_file(sf, settings.ingest.loader, errors)
    return docs, errors


def _chunk_row(ch: Chunk, n_chunks: int, fingerprint: str, file: str) -> dict[str, Any]:
    return {
        "doc_id": ch.doc_id,
        "chunk_id": ch.chunk_id,
        "chunk_index": ch.chunk_index,
        "n_chunks": n_chunks,
        "text": ch.text,
        "embed_text": ch.embed_text,
        "heading_path": list(ch.heading_path),
        "source": ch.source,
        "title": ch.title or "",
        "content_hash": ch.content_hash,
        "fingerprint": fingerprint,
        "metadata_json": json.dumps(ch.metadata, sort_keys=True, default=str),
        "file": file,
    }


def _append_row(out: dict[str, list[Any]], kind: str, payload: dict[str, Any]) -> None:
    defaults: dict[str, Any] = {"chunk_index": -1, "n_chunks": 0, "heading_path": [], "metadata_json": "{}"}
    out["kind"].append(kind)
    for col in ROW_COLUMNS[1:]:
        out[col].append(payload.get(col, defaults.get(col, "")))


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


@dataclass
class Failure:
    """A document or file that could not be ingested."""

    doc_id: str
    source: str
    reason: str


@dataclass
class IngestReport:
    """Outcome of one ingest run (printed as the summary, appended to the manifest)."""

    run_id: str
    collection: str
    embedder: str
    config_hash: str
    roots: list[str]
    runner: str
    started_at: str
    new: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    failed: list[Failure] = field(default_factory=list)
    files: int = 0
    chunks: int = 0
    points_written: int = 0
    incomplete: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    #: Seconds per driver-side phase: ``discover`` (list files), ``scan`` (read the index's
    #: fingerprints), ``pipeline`` (waiting for loaded/chunked/embedded batches: load, chunk
    #: and embed overlap in the stream, so they are one figure), ``write`` (upserts),
    #: ``optimize`` and ``prune``.
    timings: dict[str, float] = field(default_factory=dict)
    #: How the dense vectors were computed: ``torch`` (float32) or ``onnx-int8`` (see
    #: ``embedder.backend``). Not part of the collection's embedder identity: same vector space.
    embedder_backend: str = "torch"

    @property
    def ok(self) -> bool:
        """True when nothing failed."""
        return not self.failed and not self.incomplete

    @property
    def documents(self) -> int:
        """Documents seen (excluding failures)."""
        return self.new + self.updated + self.unchanged

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``--json`` output and manifest record)."""
        d = dataclasses.asdict(self)
        d["failed_count"] = len(self.failed)
        d["documents"] = self.documents
        d["points_per_s"] = round(self.points_written / self.duration_s, 1) if self.duration_s else 0.0
        d["ok"] = self.ok
        return d


ProgressFn = Callable[[dict[str, Any]], None]


# ---------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------


def open_collection(settings: Settings, collection: str | None = None) -> tuple[VectorStore, CollectionSpec]:
    """Open the store and make sure the collection exists and matches the embedder."""
    from ragops.embeddings import TextEmbedder, embedder_identity

    model = resolve_model(settings.embedder.model, kind="embedder", registry=settings.embedder._registry)
    model.locate()  # fail fast (and before creating anything) when the weights are not here
    store = open_store(settings.vectorstore, settings.data_dir, collection)
    dim = model.dim or TextEmbedder(settings.embedder).dim
    spec = CollectionSpec(
        name=store.collection, dim=dim, embedder=embedder_identity(settings.embedder), sparse=settings.ingest.sparse.enabled
    )
    try:
        store.ensure_collection(spec)
    except CollectionError:
        store.close()
        raise
    return store, spec


def run_ingest(
    settings: Settings,
    roots: Sequence[str] | None = None,
    *,
    collection: str | None = None,
    prune: bool = False,
    progress: ProgressFn | None = None,
) -> IngestReport:
    """Ingest ``roots`` (default: ``ingest.sources``) into the collection incrementally.

    Raises:
        InputError: no roots at all, a root does not exist, or nothing matches the include globs.
        CollectionError: the collection was built with another embedder or dimension.
        StoreLockedError: another process holds the embedded index.
    """
    roots = list(roots or settings.ingest.sources)
    if not roots:
        raise InputError("nothing to ingest: name paths or URIs (ragops ingest ./docs), or set ingest.sources in the config")
    attrs = {"ragops.runner": settings.ingest.runner, "ragops.embedder": settings.embedder.model, "ragops.roots": len(roots)}
    with telemetry.span("ingest", attrs) as root:
        report = _run_ingest(settings, roots, collection, prune, progress)
        root.set_attributes(telemetry.clean_attributes({
            "ragops.collection": report.collection, "ragops.files": report.files, "ragops.documents": report.documents,
            "ragops.chunks": report.chunks, "ragops.points_written": report.points_written,
            "ragops.failed": len(report.failed), "ragops.run_id": report.run_id,
        }))  # fmt: skip
    return report


def _run_ingest(settings: Settings, roots: list[str], collection: str | None, prune: bool,
                progress: ProgressFn | None) -> IngestReport:  # fmt: skip
    started = time.perf_counter()
    timings: dict[str, float] = {}
    with _timed(timings, "discover"):
        files = discover(roots, settings.ingest.loader)
    # An alias moved by `ragops index reembed` brings its embedder along (see live_settings);
    # the run is recorded under the name the user gave, whichever collection serves it now.
    name = collection or settings.vectorstore.collection
    settings, physical = live_settings(settings, name)
    store, spec = open_collection(settings, physical)
    try:
        with _timed(timings, "scan"):
            states = scan_index(store)
        known = {doc_id: fp for doc_id, st in states.items() if (fp := st.complete_fingerprint())}
        report = IngestReport(
            run_id=datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6],
            collection=name,
            embedder=spec.embedder,
            config_hash=pipeline_fingerprint(settings),
            roots=[str(r) for r in roots],
            runner=settings.ingest.runner,
            started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            files=len(files),
            embedder_backend="onnx-int8" if settings.embedder.backend == "onnx" else "torch",
        )
        stage = LoadChunkStage(settings, known, set(states))
        sink = QdrantSink(store, settings.ingest.write_batch_size)
        seen_docs: set[str] = set()
        failed_sources: set[str] = set()
        files_done: set[str] = set()
        timings["pipeline"] = timings["write"] = 0.0
        # Only Ray can wait forever (for resources it cannot place); the local runner just runs.
        dog = Watchdog(
            settings.runtime.stall_timeout_s if settings.ingest.runner == "ray" else 0, "ingest",
            status=lambda: f"{len(files_done)}/{len(files)} files read, {report.chunks} chunks written",
        )  # fmt: skip
        if files:
            batches = iter(_run_stages(settings, stage, files))  # Ray starts and admits the stages here
            # One span for the stream: load, chunk and embed overlap with the writes, batch by batch.
            with dog, telemetry.span("ingest.stream", {"ragops.files": len(files)}) as stream_span:
                while True:
                    with _timed(timings, "pipeline", span=False):  # waiting for the stream's next batch
                        batch = next(batches, None)
                    if batch is None:
                        break
                    dog.beat()
                    _account(batch, report, seen_docs, failed_sources, files_done)
                    with _timed(timings, "write", span=False):
                        report.chunks += sink.write_batch(batch)
                    if progress:
                        progress({"files_done": len(files_done), "files": len(files), "documents": report.documents,
                                  "chunks": report.chunks, "points": sink.points_written,
                                  "elapsed": time.perf_counter() - started})  # fmt: skip
                stream_span.set_attributes({"ragops.wait_s": timings["pipeline"], "ragops.write_s": timings["write"],
                                            "ragops.chunks": report.chunks})  # fmt: skip
        with _timed(timings, "write", name="flush"):
            report.incomplete = sink.close()
        report.points_written = sink.points_written
        optimize = getattr(store, "optimize", None)
        if optimize is not None and report.points_written:
            # Qdrant Edge never optimizes on its own: without this, queries scan every point.
            with _timed(timings, "optimize"):
                optimize()
        if prune:
            with _timed(timings, "prune"):
                gone = [d for d, st in states.items() if d not in seen_docs and st.source not in failed_sources]
                report.deleted = sink.delete_documents(gone)
                store.flush()
    finally:
        store.close()
    report.duration_s = round(time.perf_counter() - started, 3)
    report.timings = {k: round(v, 3) for k, v in timings.items()}
    append_record(settings.data_dir, report.collection, report.to_dict())
    return report


@contextmanager
def _timed(timings: dict[str, float], phase: str, *, span: bool = True, name: str | None = None) -> Iterator[None]:
    """Add the block's wall time to ``timings[phase]``; with ``span``, trace it as ``ingest.<name or phase>``."""
    t = time.perf_counter()
    try:
        if span:
            with telemetry.span(f"ingest.{name or phase}"):
                yield
        else:
            yield
    finally:
        timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - t


def _account(batch: Batch, report: IngestReport, seen: set[str], failed_sources: set[str], files_done: set[str]) -> None:
    for i, kind in enumerate(batch["kind"]):
        if kind != "doc":
            continue
        status = str(batch["status"][i])
        doc_id = str(batch["doc_id"][i])
        files_done.add(str(batch["file"][i]))
        if status == "failed":
            report.failed.append(Failure(doc_id, str(batch["source"][i]), str(batch["reason"][i])))
            failed_sources.add(str(batch["source"][i]))
            continue
        seen.add(doc_id)
        if status == "new":
            report.new += 1
        elif status == "updated":
            report.updated += 1
        else:
            report.unchanged += 1


def _run_stages(settings: Settings, stage: LoadChunkStage, files: list[SourceFile]) -> Iterable[Batch]:
    if settings.ingest.runner == "ray":
        from ragops.ingest.ray_pipeline import run_ray

        return run_ray(settings, stage, files)
    return _run_local(settings, stage, files)


def _run_local(settings: Settings, stage: LoadChunkStage, files: list[SourceFile]) -> Iterator[Batch]:
    """Same stages, one process: for small inputs, debugging, and tests of the stage logic."""
    embed = EmbedStage(settings.embedder, settings.ingest.sparse)
    size = settings.ingest.docs_per_task
    for start in range(0, len(files), size):
        part = files[start : start + size]
        rows = stage({k: [row[k] for row in source_rows(part)] for k in source_rows(part[:1])[0]})
        n = len(rows["kind"])
        step = settings.ingest.embed_batch_size
        for s in range(0, max(n, 1), step):
            sub = {k: v[s : s + step] for k, v in rows.items()}
            if sub["kind"]:
                yield embed(sub)


def source_rows(files: Sequence[SourceFile]) -> list[dict[str, Any]]:
    """SourceFiles as plain dicts (Ray Data items)."""
    return [f.to_row() for f in files]


def default_sample_corpus() -> Path:
    """The sample corpus shipped in the repository (README quickstart)."""
    return Path(__file__).resolve().parent.parent / "samples" / "docs"
