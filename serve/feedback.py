"""Durable request log and user feedback, the start of the LLMOps loop.

Two append-only JSONL files under ``<data_dir>/feedback/`` (``serve.feedback_dir``):

* ``requests.jsonl``: one line per answered chat request, written when the answer is
  complete: ``{request_id, question, passages: [{n, doc_id, chunk_id, source, score, text}],
  answer, model, requested_model, variant, status, latency_s, rag, citations, usage,
  finish_reason, reader, created}``,
  where ``model`` is what answered (the registry artifact an alias pointed at, a configured
  adapter's name, or the base model), ``requested_model`` what the client asked for and
  ``variant`` the traffic split's pick (:mod:`ragops.serve.routing`; without a split, what
  answered). A routed request that failed is logged too, with ``status: "error"`` and
  ``error: {status, code}`` (the A/B report's error rate); feedback on it is refused;
* ``feedback.jsonl``: one line per feedback, joined with its request:
  ``{request_id, question, passages, answer, model, requested_model, variant, rating, comment,
  preferred_answer, created}`` (what the fine-tuning code reads; several feedbacks for one request are all
  kept, the latest wins).

Every append is one ``write`` of a whole line under an exclusive ``flock`` (several ingress
replicas on one node may append) followed by ``fsync``: a feedback that was acknowledged
survives a crash. ``created`` is Unix time in seconds, as in OpenAI objects.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REQUESTS_FILE = "requests.jsonl"
FEEDBACK_FILE = "feedback.jsonl"
#: Recent request records kept in memory so feedback rarely needs to scan the log.
RECENT_REQUESTS = 2048
_BLOCK = 1 << 16


def feedback_dir(settings: Any) -> Path:
    """Where the request log and feedback live (``serve.feedback_dir`` or ``<data_dir>/feedback``).

    Serving writes there and ``ragops train ... feedback`` reads there: one answer for both.
    """
    return Path(settings.serve.feedback_dir or Path(settings.data_dir) / "feedback").expanduser()


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line durably (locked single write + fsync)."""
    line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            view = memoryview(line)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _lines_backwards(path: Path) -> Iterator[bytes]:
    """The file's lines, last first, read in blocks (the log can be large)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        pos = f.tell()
        tail = b""
        while pos > 0:
            step = min(_BLOCK, pos)
            pos -= step
            f.seek(pos)
            chunk = f.read(step) + tail
            lines = chunk.split(b"\n")
            tail = lines[0]
            for line in reversed(lines[1:]):
                if line.strip():
                    yield line
        if tail.strip():
            yield tail


class FeedbackStore:
    """The request log and the feedback file of one data directory.

    Args:
        directory: Where ``requests.jsonl`` and ``feedback.jsonl`` live (created on first write).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.requests_path = self.directory / REQUESTS_FILE
        self.feedback_path = self.directory / FEEDBACK_FILE
        self._recent: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def log_request(self, record: dict[str, Any]) -> None:
        """Append an answered request (must hold ``request_id``)."""
        if not record.get("request_id"):
            raise ValueError("a request record needs a request_id")
        record = {"created": int(time.time()), **record}
        append_jsonl(self.requests_path, record)
        if record.get("status", "ok") != "ok":
            return  # a failed request: nothing to give feedback on
        with self._lock:
            self._recent[record["request_id"]] = record
            self._recent.move_to_end(record["request_id"])
            while len(self._recent) > RECENT_REQUESTS:
                self._recent.popitem(last=False)

    def find_request(self, request_id: str) -> dict[str, Any] | None:
        """The latest logged record of ``request_id`` (memory first, then the log, newest first)."""
        with self._lock:
            hit = self._recent.get(request_id)
        if hit is not None:
            return hit
        if not self.requests_path.exists():
            return None
        needle = json.dumps(request_id).encode("utf-8")
        for line in _lines_backwards(self.requests_path):
            if needle not in line:  # cheap filter before parsing
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a torn last line after a crash
            if record.get("request_id") == request_id and record.get("status", "ok") == "ok":
                return record
        return None

    def add_feedback(
        self,
        request_id: str,
        rating: str,
        *,
        comment: str | None = None,
        preferred_answer: str | None = None,
    ) -> dict[str, Any] | None:
        """Store feedback on a logged request.

        Returns:
            The stored record, or None when the request id is unknown.
        """
        req = self.find_request(request_id)
        if req is None:
            return None
        record = {
            "request_id": request_id,
            "question": req.get("question"),
            "passages": req.get("passages", []),
            "answer": req.get("answer"),
            "model": req.get("model"),
            "requested_model": req.get("requested_model"),
            "variant": req.get("variant") or req.get("model"),
            "rating": rating,
            "comment": comment,
            "preferred_answer": preferred_answer,
            "created": int(time.time()),
        }
        if req.get("trace_id"):
            record["trace_id"] = req["trace_id"]  # the answer's trace (telemetry on)
        append_jsonl(self.feedback_path, record)
        return record
