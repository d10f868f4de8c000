"""A minimal OTLP/HTTP trace receiver for tests: what a collector gets, decoded from protobuf.

The SDK's in-memory exporter sees the spans of its own process only; a served request crosses
the Serve replicas' processes, so those tests point ``telemetry.otlp_endpoint`` here and read
what the real OTLP exporters of every replica sent.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class ReceivedSpan:
    """One span as the collector received it."""

    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: int
    attributes: dict[str, Any]
    resource: dict[str, Any]
    status_code: int
    start_ns: int
    end_ns: int


def _value(v: Any) -> Any:
    which = v.WhichOneof("value")
    return getattr(v, which) if which else None


@dataclass
class OtlpReceiver:
    """``POST /v1/traces`` on 127.0.0.1:<port>; ``spans`` holds everything received."""

    spans: list[ReceivedSpan] = field(default_factory=list)
    requests: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1/traces"

    def start(self) -> OtlpReceiver:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                receiver._add(req)
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()

    def _add(self, req: Any) -> None:
        with self._lock:
            self.requests += 1
            for rs in req.resource_spans:
                resource = {a.key: _value(a.value) for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self.spans.append(ReceivedSpan(
                            trace_id=s.trace_id.hex(), span_id=s.span_id.hex(), parent_id=s.parent_span_id.hex(),
                            name=s.name, kind=s.kind, attributes={a.key: _value(a.value) for a in s.attributes},
                            resource=resource, status_code=s.status.code, start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                        ))  # fmt: skip

    def trace(
        self, trace_id: str, *, until: tuple[str, ...] = (), rooted_at: str | None = None, timeout_s: float = 30.0
    ) -> list[ReceivedSpan]:
        """The spans of ``trace_id``, waiting (bounded) until every name in ``until`` arrived.

        With ``rooted_at`` (the caller's span id, "" for none) it also waits until the spans form
        one tree under it: each process exports in its own batches, so a child's process may send
        before its parent's does (a streamed response's ingress span ends last).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                found = [s for s in self.spans if s.trace_id == trace_id]
            names = {s.name for s in found}
            ids = {s.span_id for s in found} | ({rooted_at} if rooted_at is not None else set())
            whole = rooted_at is None or all(s.parent_id in ids for s in found)
            if (whole and all(n in names for n in until)) or time.monotonic() > deadline:
                return found
            time.sleep(0.2)
