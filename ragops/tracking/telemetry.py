"""OpenTelemetry traces: one tracer provider per process, W3C trace context across processes.

Code everywhere in ragops opens spans through :func:`span` (the OpenTelemetry *API*); until
:func:`configure` installs the SDK's provider in a process those spans are no-ops, so a
process without ``telemetry`` settings pays a function call per span and exports nothing.

A served request crosses processes: the ingress replica, then the embedder, retriever,
reranker and generator replicas. Ray Serve's own tracing is switched on by environment
variables read when Serve starts (a cluster-wide choice an application cannot make), so the
context travels the explicit way instead: the ingress injects the W3C ``traceparent`` of its
current span into a small dict passed with each handle call (:func:`inject`), and the replica
opens its span under it (``span(name, carrier=...)``). One request is thus one trace whatever
process each part ran in.

Export goes over OTLP/HTTP (protobuf) in a background batch; a collector that is down costs
dropped spans and one warning per outage, never a slow or failed request.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from opentelemetry import trace
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

    from ragops.config import TelemetryConfig

log = logging.getLogger(__name__)

TRACER_NAME = "ragops"
TRACES_PATH = "/v1/traces"
_PROPAGATOR = TraceContextTextMapPropagator()
_lock = threading.Lock()
_installed: Any = None  # the SDK TracerProvider this module installed (one per process)

__all__ = [
    "SpanKind", "check_otlp_endpoint", "clean_attributes", "configure", "enabled", "inject", "record_error", "span",
    "start_span", "trace_id", "traceparent", "tracer", "with_context",
]  # fmt: skip


def check_otlp_endpoint(value: str) -> str:
    """The collector URL the OTLP/HTTP exporter posts to (``/v1/traces`` added to a bare host).

    Raises:
        ValueError: not an http(s) URL with a host.
    """
    value = value.strip()
    parsed = urlparse(value)
    if parsed.scheme.lower() not in ("http", "https") or not parsed.netloc:
        raise ValueError(
            f"telemetry.otlp_endpoint '{value}' is not a URL: give the collector's OTLP/HTTP address, "
            "e.g. http://otel-collector:4318"
        )
    if parsed.path in ("", "/"):
        value = value.rstrip("/") + TRACES_PATH
    return value


class _WarnOnceExporter:
    """Wraps the OTLP exporter so a collector that is down warns once per outage, not per batch."""

    def __init__(self, inner: SpanExporter, endpoint: str) -> None:
        self.inner = inner
        self.endpoint = endpoint
        self._down = False

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        try:
            result = self.inner.export(spans)
        except Exception as exc:  # noqa: BLE001 - an exporter must never raise into the SDK's thread
            log.debug("span export raised", exc_info=exc)
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.FAILURE and not self._down:
            self._down = True
            sys.stderr.write(
                f"ragops: warning: the OpenTelemetry collector at {self.endpoint} is unreachable or refused spans; "
                "requests go on, spans are dropped until it answers again\n"
            )
        elif result is SpanExportResult.SUCCESS:
            self._down = False
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def configure(cfg: TelemetryConfig, component: str, *, exporter: SpanExporter | None = None) -> bool:
    """Install this process's tracer provider from ``cfg`` (once per process).

    Args:
        cfg: The ``telemetry`` settings.
        component: What this process is (``cli``, ``ingress``, ``generator``...): the
            ``ragops.component`` resource attribute.
        exporter: An extra exporter (tests pass the SDK's in-memory one), exported at once.

    Returns:
        Whether spans of this process are recorded (a provider is installed, by this call or an
        earlier one).
    """
    global _installed
    if _installed is not None:
        return True
    if not cfg.enabled and exporter is None:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    with _lock:
        if _installed is not None:
            return True
        resource = Resource.create({"service.name": cfg.service_name, "service.namespace": "ragops", "ragops.component": component})
        provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(cfg.sample_ratio)))
        if cfg.otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            otlp = OTLPSpanExporter(endpoint=cfg.otlp_endpoint, headers=dict(cfg.headers), timeout=10)
            # The exporter logs every failed batch; _WarnOnceExporter says it once per outage.
            logging.getLogger("opentelemetry.exporter.otlp.proto.http").setLevel(logging.CRITICAL)
            logging.getLogger("opentelemetry.exporter.otlp.proto.http.trace_exporter").setLevel(logging.CRITICAL)
            batch = BatchSpanProcessor(
                _WarnOnceExporter(otlp, cfg.otlp_endpoint),  # type: ignore[arg-type]
                schedule_delay_millis=int(cfg.export_delay_s * 1000),
            )
            provider.add_span_processor(batch)
        if cfg.console:
            # stderr: stdout belongs to the command's output (``--json`` is parsed by scripts).
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
        if exporter is not None:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        _installed = provider
    return True


def enabled() -> bool:
    """Whether this process records spans (:func:`configure` installed a provider)."""
    return _installed is not None


def tracer() -> trace.Tracer:
    """ragops' tracer (a no-op one until :func:`configure` installs a provider)."""
    return trace.get_tracer(TRACER_NAME)


def clean_attributes(attrs: Mapping[str, Any] | None) -> dict[str, Any]:
    """``attrs`` as OpenTelemetry takes them: None dropped, anything but str/bool/int/float stringified."""
    out: dict[str, Any] = {}
    for key, value in (attrs or {}).items():
        if value is None:
            continue
        out[key] = value if isinstance(value, (str, bool, int, float)) else str(value)
    return out


@contextmanager
def span(
    name: str,
    attributes: Mapping[str, Any] | None = None,
    *,
    carrier: Mapping[str, str] | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
) -> Iterator[trace.Span]:
    """A span around the block (the current span's child, or ``carrier``'s when given).

    An exception leaving the block is recorded on the span and marks it as an error.
    """
    context = _PROPAGATOR.extract(dict(carrier)) if carrier else None
    with tracer().start_as_current_span(name, context=context, kind=kind, attributes=clean_attributes(attributes)) as current:
        yield current


def start_span(
    name: str,
    attributes: Mapping[str, Any] | None = None,
    *,
    carrier: Mapping[str, str] | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
) -> trace.Span:
    """A span the caller ends (``.end()``), not made current: for async generators, whose
    steps run in whatever context iterates them, so a current span could not be restored."""
    context = _PROPAGATOR.extract(dict(carrier)) if carrier else None
    return tracer().start_span(name, context=context, kind=kind, attributes=clean_attributes(attributes))


def record_error(current: trace.Span, exc: BaseException) -> None:
    """Mark ``current`` failed with ``exc`` (what ``start_as_current_span`` does on its own)."""
    from opentelemetry.trace import Status, StatusCode

    current.record_exception(exc)
    current.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:500]))


def inject(current: trace.Span | None = None) -> dict[str, str] | None:
    """The W3C context of ``current`` (default: the current span) as a dict to pass to another
    process; None when that span does not record."""
    current = current or trace.get_current_span()
    if not current.is_recording():
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(current))
    return carrier or None


def traceparent(current: trace.Span | None = None) -> str | None:
    """The W3C ``traceparent`` of ``current`` (default: the current span), None when it has none."""
    ctx = (current or trace.get_current_span()).get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def trace_id() -> str | None:
    """The current trace's id in hex (as trace back-ends show it), None outside a recorded span."""
    current = trace.get_current_span()
    ctx = current.get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid and current.is_recording() else None


def with_context(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` bound to the caller's context, for a thread pool (``run_in_executor`` does not carry it)."""
    ctx = contextvars.copy_context()
    return lambda *args, **kwargs: ctx.run(fn, *args, **kwargs)
