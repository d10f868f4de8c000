"""ragops.tracking.telemetry: settings, the exporters, and the spans of in-process phases.

In-process spans are read with the SDK's in-memory exporter (the ``spans`` fixture of
tests/conftest.py: OpenTelemetry allows one tracer provider per process). Spans of the Serve replicas,
which are other processes, are checked in tests/serve/test_serve_tracing.py through an OTLP
receiver.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from ragops.errors import ConfigError

def _tree(finished: Any) -> dict[str, Any]:
    return {s.name: s for s in finished}


@pytest.mark.parametrize("value", ["collector:4318", "localhost", "ftp://collector:4318", "http://"])
def test_an_otlp_endpoint_that_is_not_a_url_is_one_clear_error(tmp_path: Path, value: str) -> None:
    from ragops.config import load_settings

    with pytest.raises(ConfigError, match="is not a URL"):
        load_settings([], [f"telemetry.otlp_endpoint={value}"], data_dir=tmp_path, environ={})


def test_a_bare_collector_address_gets_the_traces_path(tmp_path: Path) -> None:
    from ragops.config import load_settings

    s = load_settings([], ["telemetry.otlp_endpoint=http://otel:4318"], data_dir=tmp_path, environ={})
    assert s.telemetry.otlp_endpoint == "http://otel:4318/v1/traces" and s.telemetry.enabled
    s = load_settings([], ["telemetry.otlp_endpoint=https://otel.example/custom/traces"], data_dir=tmp_path, environ={})
    assert s.telemetry.otlp_endpoint == "https://otel.example/custom/traces"
    assert not load_settings([], [], data_dir=tmp_path, environ={}).telemetry.enabled


def test_an_unreachable_collector_warns_once_per_outage(capsys: pytest.CaptureFixture[str]) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExportResult

    from ragops.tracking.telemetry import _WarnOnceExporter

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}/v1/traces"
    exporter = _WarnOnceExporter(OTLPSpanExporter(endpoint=endpoint, timeout=1), endpoint)
    span = TracerProvider().get_tracer("t").start_span("x")
    span.end()
    assert exporter.export([span]) is SpanExportResult.FAILURE
    assert exporter.export([span]) is SpanExportResult.FAILURE
    err = capsys.readouterr().err
    assert err.count("warning: the OpenTelemetry collector at") == 1 and endpoint in err
    exporter.shutdown()


def test_the_traceparent_of_a_carrier_is_followed(spans: Any) -> None:
    from ragops.tracking import telemetry

    caller = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    with telemetry.span("server", carrier={"traceparent": caller}) as server:
        carrier = telemetry.inject()
        assert telemetry.traceparent(server).startswith("00-" + "ab" * 16)
    with telemetry.span("replica", carrier=carrier):
        pass
    done = _tree(spans.get_finished_spans())
    assert done["server"].parent.span_id == int("cd" * 8, 16)
    assert done["replica"].parent.span_id == done["server"].context.span_id
    assert done["replica"].context.trace_id == int("ab" * 16, 16)


def test_ingest_has_a_span_per_phase(spans: Any, make_settings: Any, sample_docs: Path) -> None:
    from ragops.ingest.pipeline import run_ingest

    report = run_ingest(make_settings(), [str(sample_docs)])
    done = _tree(spans.get_finished_spans())
    root = done["ingest"]
    for phase in ("ingest.discover", "ingest.scan", "ingest.stream", "ingest.flush", "ingest.optimize"):
        assert done[phase].parent.span_id == root.context.span_id, phase
    assert root.attributes["ragops.chunks"] == report.chunks > 0
    assert root.attributes["ragops.files"] == report.files
    assert done["ingest.stream"].attributes["ragops.chunks"] == report.chunks


def test_a_search_has_encode_and_query_spans(spans: Any, make_settings: Any, sample_docs: Path) -> None:
    from ragops.ingest.pipeline import run_ingest
    from ragops.retrieval.search import Retriever

    settings = make_settings()
    run_ingest(settings, [str(sample_docs)])
    spans.clear()
    from ragops.tracking import telemetry

    with telemetry.span("caller"):
        result = Retriever(settings).search("What is MIG?", k=3, mode="hybrid")
    done = _tree(spans.get_finished_spans())
    query = done["retrieval.query"]
    assert query.parent.span_id == done["caller"].context.span_id
    assert done["retrieval.encode"].parent.span_id == done["caller"].context.span_id
    assert query.attributes["ragops.retrieval.branches"] == "dense,sparse"
    assert query.attributes["ragops.retrieval.fusion"] == settings.retrieval.fusion
    assert query.attributes["ragops.retrieval.hits"] == len(result.hits)
