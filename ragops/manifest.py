"""Append-only ingest manifests: one JSON line per run, per collection.

They record what each run did (counts, durations, config hash, embedder) so `index stats` can
say when the collection was last ingested and a user can audit its history. JSON Lines, not
pickle: readable by anything, appendable without rewriting.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def manifest_path(data_dir: Path, collection: str) -> Path:
    """Where a collection's manifest lives."""
    return Path(data_dir) / "manifests" / f"{collection}.jsonl"


def append_record(data_dir: Path, collection: str, record: dict[str, Any]) -> Path:
    """Append one record (fsync'd, so a crash right after still keeps it)."""
    path = manifest_path(data_dir, collection)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True, default=str)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return path


def read_records(data_dir: Path, collection: str) -> list[dict[str, Any]]:
    """All records, oldest first; a torn last line (crash mid-write) is ignored."""
    path = manifest_path(data_dir, collection)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def last_record(data_dir: Path, collection: str) -> dict[str, Any] | None:
    """The newest record, or None."""
    records = read_records(data_dir, collection)
    return records[-1] if records else None
