"""The records that flow through ingest: documents, their sections, and chunks.

Plain dataclasses (no Ray, no Arrow) so every stage is testable on its own; ``to_row`` /
``from_row`` convert to the flat dicts Ray Data batches and Qdrant payloads carry.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

#: Namespace for deterministic chunk ids (uuid5).
CHUNK_NAMESPACE = uuid.UUID("6f1d3c52-5b0e-4c8e-9a57-2f4c1f0b7a10")


def normalize_text(text: str) -> str:
    """Unicode-NFC, unified newlines, trailing spaces stripped, runs of blank lines collapsed."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    lines = [line.rstrip() for line in text.split("\n")]
    out: list[str] = []
    blank = 0
    for line in lines:
        blank = blank + 1 if not line.strip() else 0
        if blank <= 1:
            out.append(line)
    return "\n".join(out).strip()


def content_hash(text: str) -> str:
    """SHA-256 (hex) of the normalized text: equal content ⇒ equal hash, whatever the line endings."""
    return hashlib.sha256(normalize_text(text).encode("utf-8")).hexdigest()


@dataclass
class Section:
    """A run of text under one heading path (``["Guide", "Install"]``); ``[]`` for none."""

    heading_path: list[str]
    text: str


@dataclass
class Document:
    """One source document after loading.

    Attributes:
        doc_id: Stable id: the path relative to the ingest root, or the id a JSONL line gave.
        text: Normalized full text.
        source: Where it came from (path or URI).
        content_hash: :func:`content_hash` of ``text``.
        title: Title, when the format has one (HTML <title>, first Markdown H1).
        sections: Structure for section-aware chunking; one section for flat formats.
        metadata: Free-form metadata (JSONL fields, file type, tags).
    """

    doc_id: str
    text: str
    source: str
    content_hash: str
    title: str | None = None
    sections: list[Section] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        """Flat row for Arrow / Ray Data (sections and metadata as JSON strings)."""
        return {
            "doc_id": self.doc_id,
            "text": self.text,
            "source": self.source,
            "content_hash": self.content_hash,
            "title": self.title or "",
            "sections_json": json.dumps([asdict(s) for s in self.sections]),
            "metadata_json": json.dumps(self.metadata, sort_keys=True, default=str),
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Document":
        """Inverse of :meth:`to_row`."""
        return cls(
            doc_id=str(row["doc_id"]),
            text=str(row["text"]),
            source=str(row["source"]),
            content_hash=str(row["content_hash"]),
            title=str(row.get("title") or "") or None,
            sections=[Section(**s) for s in json.loads(row.get("sections_json") or "[]")],
            metadata=json.loads(row.get("metadata_json") or "{}"),
        )


def chunk_id_for(doc_id: str, chunk_index: int, text: str) -> str:
    """Deterministic chunk id: uuid5 of doc_id, chunk index and the chunk text's hash."""
    text_hash = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return str(uuid.uuid5(CHUNK_NAMESPACE, f"{doc_id}\x1f{chunk_index}\x1f{text_hash}"))


@dataclass
class Chunk:
    """A piece of a document small enough to embed.

    Attributes:
        chunk_id: :func:`chunk_id_for` (a UUID string; also the Qdrant point id).
        doc_id: The owning document.
        chunk_index: Position in the document (0-based).
        text: The chunk's text as stored and shown.
        embed_text: What the embedder sees (text with title/heading context prefixed).
        heading_path: Headings above the chunk.
        source, title, content_hash, metadata: Copied from the document.
    """

    chunk_id: str
    doc_id: str
    chunk_index: int
    text: str
    embed_text: str
    heading_path: list[str]
    source: str
    title: str | None
    content_hash: str
    metadata: dict[str, Any] = field(default_factory=dict)
