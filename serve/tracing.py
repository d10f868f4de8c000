"""Traces of served requests: the ingress span (W3C ``traceparent`` in and out) and the generation span.

The spans themselves go through :mod:`ragops.tracking.telemetry`; this module holds what is
particular to serving: an ASGI middleware that returns each request's ``traceparent`` and
lets handlers annotate its SERVER span, and the span that reports what a generator
answer measured (TTFT, token counts, batch size) in OpenTelemetry's GenAI attribute names.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ragops.tracking import telemetry

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"


#: FastAPI (0.16x+) opens the SERVER span of each request itself once a tracer provider is
#: installed, with OpenTelemetry's HTTP attributes and spans for dependencies and the endpoint;
#: the middleware then only annotates that span. With an older FastAPI it opens the span.
NATIVE_SERVER_SPANS = importlib.util.find_spec("fastapi.telemetry") is not None


class TracingMiddleware:
    """Returns the request's ``traceparent`` and exposes its SERVER span to the handlers.

    The SERVER span is a child of the caller's ``traceparent`` when one was sent. The
    response carries ``traceparent`` with that span's id, so a caller that sent none can still
    find the trace. Handlers annotate the span through ``request.state.server_span`` (see
    :func:`annotate`). Installed outermost, so refused requests (401, 413) are traced too.

    Args:
        app: The ASGI app.
        routes: Known paths (a span this middleware names uses ``other`` for the rest).
    """

    def __init__(self, app: ASGIApp, routes: tuple[str, ...]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if NATIVE_SERVER_SPANS:
            await self._annotated(trace.get_current_span(), scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        carrier = {
            name: headers[name.encode()].decode("latin-1") for name in (TRACEPARENT, TRACESTATE) if name.encode() in headers
        }
        method = scope.get("method", "")
        route = scope["path"] if scope["path"] in self.routes else "other"
        attrs = {"http.request.method": method, "http.route": route, "url.path": scope["path"]}
        with telemetry.span(f"{method} {route}", attrs, carrier=carrier or None, kind=telemetry.SpanKind.SERVER) as current:
            await self._annotated(current, scope, receive, send, own=True)

    async def _annotated(self, current: Any, scope: Scope, receive: Receive, send: Send, own: bool = False) -> None:
        scope.setdefault("state", {})["server_span"] = current
        parent = telemetry.traceparent(current)

        async def send_traced(message: Message) -> None:
            if message["type"] == "http.response.start":
                if own:
                    status = int(message["status"])
                    current.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        current.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
                if parent:
                    message = {**message, "headers": [*message.get("headers", []), (TRACEPARENT.encode(), parent.encode())]}
            await send(message)

        await self.app(scope, receive, send_traced)


def annotate(state: Any, attributes: Mapping[str, Any]) -> None:
    """Add attributes to the request's SERVER span (``request.state``; a no-op untraced)."""
    current = getattr(state, "server_span", None)
    if current is not None and current.is_recording():
        current.set_attributes(telemetry.clean_attributes(attributes))


def record_generation(answer: Mapping[str, Any], model: str, parent: Any) -> None:
    """A ``generation`` span (child of ``parent``) for a finished answer.

    The decode ran on the replica's model thread, possibly in a batch with other requests, so
    the span is placed from the answer's own measurements: it ends now and lasts
    ``timings.generate_s``.
    """
    if "error" in answer or not parent.is_recording():  # nothing records: skip the arithmetic
        return
    timings = answer.get("timings") or {}
    usage = answer.get("usage") or {}
    end = time.time_ns()
    start = end - int(float(timings.get("generate_s", 0.0)) * 1e9)
    attrs = telemetry.clean_attributes({
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": model,
        "gen_ai.usage.input_tokens": usage.get("prompt_tokens"),
        "gen_ai.usage.output_tokens": usage.get("completion_tokens"),
        "gen_ai.response.finish_reasons": answer.get("finish_reason"),
        "ragops.ttft_s": timings.get("time_to_first_token_s"),
        "ragops.tokens_per_s": timings.get("tokens_per_s"),
        "ragops.batch_size": answer.get("batch_size"),
        "ragops.reader": answer.get("reader"),
        "ragops.abstained": answer.get("abstained"),
    })  # fmt: skip
    gen = telemetry.tracer().start_span("generation", context=trace.set_span_in_context(parent), start_time=start, attributes=attrs)
    gen.end(end_time=end)
