"""One trace per served request across the Serve deployments, as a real collector receives it.

The test app's replicas export over OTLP/HTTP to ``otlp_receiver`` (see conftest): what is
checked here is what the SDK's exporters in five processes sent, decoded from protobuf.
"""

from __future__ import annotations

import json
import secrets

import pytest

from tests.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.serve.conftest import Served, chat_body

pytestmark = pytest.mark.e2e

SERVER, CLIENT = 2, 3  # OTLP's SpanKind numbers


def _traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def _by_name(spans: list[ReceivedSpan]) -> dict[str, list[ReceivedSpan]]:
    out: dict[str, list[ReceivedSpan]] = {}
    for s in spans:
        out.setdefault(s.name, []).append(s)
    return out


def _assert_one_tree(spans: list[ReceivedSpan], caller_span: str) -> None:
    """Every span's parent is another span of the trace, or the caller's span for the root."""
    ids = {s.span_id for s in spans}
    roots = [s for s in spans if s.parent_id not in ids]
    assert [r.parent_id for r in roots] == [caller_span], [(r.name, r.span_id) for r in roots]
    for s in spans:
        assert s.end_ns >= s.start_ns > 0


def _child(spans: dict[str, list[ReceivedSpan]], name: str, parent: ReceivedSpan) -> ReceivedSpan:
    kids = [s for s in spans.get(name, []) if s.parent_id == parent.span_id]
    assert kids, f"no '{name}' span under '{parent.name}'"
    return kids[0]


def _under(spans: dict[str, list[ReceivedSpan]], name: str, ancestor: ReceivedSpan, kind: int = CLIENT) -> ReceivedSpan:
    """A ``name`` span of ``kind`` anywhere below ``ancestor`` (FastAPI's endpoint span sits in between)."""
    by_id = {s.span_id: s for group in spans.values() for s in group}
    for s in spans.get(name, []):
        if s.kind != kind:
            continue
        p = by_id.get(s.parent_id)
        while p is not None:
            if p.span_id == ancestor.span_id:
                return s
            p = by_id.get(p.parent_id)
    raise AssertionError(f"no '{name}' span below '{ancestor.name}'")


CHAT_SPANS = (
    "POST /v1/chat/completions", "embedder.encode_query", "embed.query", "retriever.search", "retrieval.query",
    "reranker.rerank", "rerank", "generator.answer", "generation",
)  # fmt: skip


def test_a_chat_request_is_one_trace_across_the_deployments(served: Served, otlp_receiver: OtlpReceiver) -> None:
    header, trace_id, caller_span = _traceparent()
    with served.client() as c:
        r = c.post("/v1/chat/completions", json=chat_body("What is MIG?", max_tokens=4), headers={"traceparent": header})
    assert r.status_code == 200, r.text
    # The response's traceparent is the ingress span: same trace, a span of ours.
    returned = r.headers["traceparent"].split("-")
    assert returned[1] == trace_id and returned[2] != caller_span

    spans = otlp_receiver.trace(trace_id, until=CHAT_SPANS, rooted_at=caller_span)
    names = _by_name(spans)
    assert set(CHAT_SPANS) <= set(names), sorted(names)
    _assert_one_tree(spans, caller_span)

    ingress = names["POST /v1/chat/completions"][0]
    assert ingress.kind == SERVER and ingress.parent_id == caller_span and ingress.span_id == returned[2]
    assert ingress.attributes["ragops.request_id"] == r.json()["id"]
    assert ingress.attributes["http.response.status_code"] == 200
    assert ingress.attributes["ragops.variant"] == str(served.settings.generator.model)
    assert ingress.resource["ragops.component"] == "serve-ingress"

    # ingress → CLIENT call → the replica's SERVER span, in the replica's own process
    call = _under(names, "embedder.encode_query", ingress)
    embed = _child(names, "embed.query", call)
    assert embed.kind == SERVER and embed.resource["ragops.component"] == "serve-embedder"
    retr_call = _under(names, "retriever.search", ingress)
    retr = _child(names, "retriever.search", retr_call)
    assert retr.kind == SERVER and retr.resource["ragops.component"] == "serve-retriever"
    query = _child(names, "retrieval.query", retr)
    assert query.attributes["ragops.retrieval.mode"] == served.settings.retrieval.mode
    assert query.attributes["ragops.retrieval.hits"] >= 1
    rerank = _child(names, "rerank", _under(names, "reranker.rerank", ingress))
    assert rerank.resource["ragops.component"] == "serve-reranker"
    answer = _child(names, "generator.answer", _under(names, "generator.answer", ingress))
    assert answer.resource["ragops.component"] == "serve-generator"
    gen = _child(names, "generation", answer)
    usage = r.json()["usage"]
    assert gen.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert gen.attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert gen.attributes["ragops.ttft_s"] > 0 and gen.attributes["ragops.batch_size"] >= 1


def test_a_streamed_chat_and_its_feedback_are_traced(served: Served, otlp_receiver: OtlpReceiver) -> None:
    header, trace_id, caller_span = _traceparent()
    with served.client() as c:
        with c.stream("POST", "/v1/chat/completions", json=chat_body("What is MPS?", stream=True, max_tokens=4),
                      headers={"traceparent": header}) as r:  # fmt: skip
            assert r.status_code == 200
            assert r.headers["traceparent"].split("-")[1] == trace_id
            events = [line for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
        rid = json.loads(events[0][6:])["id"]
        fb_header, fb_trace, _ = _traceparent()
        fb = c.post("/v1/feedback", json={"request_id": rid, "rating": "up"}, headers={"traceparent": fb_header})
    assert fb.status_code == 200, fb.text

    spans = otlp_receiver.trace(
        trace_id, until=("POST /v1/chat/completions", "generator.answer_stream", "generation"), rooted_at=caller_span
    )
    names = _by_name(spans)
    _assert_one_tree(spans, caller_span)
    stream = [s for s in names["generator.answer_stream"] if s.kind == SERVER][0]
    gen = _child(names, "generation", stream)
    assert gen.attributes["gen_ai.usage.output_tokens"] >= 1
    assert names["POST /v1/chat/completions"][0].attributes["ragops.stream"] is True

    fb_spans = _by_name(otlp_receiver.trace(fb_trace, until=("feedback.store",)))
    store = fb_spans["feedback.store"][0]
    assert store.attributes["ragops.request_id"] == rid and store.attributes["ragops.rating"] == "up"
    assert store.attributes["ragops.answer_trace_id"] == trace_id  # from the feedback back to the answer
    # ...and the feedback record on disk names the answer's trace too.
    records = [json.loads(line) for line in (served.feedback_dir / "feedback.jsonl").read_text().splitlines()]
    assert any(rec["request_id"] == rid and rec.get("trace_id") == trace_id for rec in records)


def test_a_search_without_traceparent_starts_a_trace_and_returns_it(served: Served, otlp_receiver: OtlpReceiver) -> None:
    with served.client() as c:
        r = c.post("/v1/search", json={"query": "What is MIG?", "k": 2})
    assert r.status_code == 200, r.text
    _, trace_id, span_id, _ = r.headers["traceparent"].split("-")
    spans = otlp_receiver.trace(trace_id, until=("POST /v1/search", "retrieval.query"), rooted_at="")
    names = _by_name(spans)
    root = names["POST /v1/search"][0]
    assert root.span_id == span_id and root.parent_id == ""
    _assert_one_tree(spans, "")


def test_a_refused_request_is_traced_with_its_status(served: Served, otlp_receiver: OtlpReceiver) -> None:
    header, trace_id, _ = _traceparent()
    with served.client(key=None) as c:
        r = c.post("/v1/chat/completions", json=chat_body(), headers={"traceparent": header})
    assert r.status_code == 401
    assert r.headers["traceparent"].split("-")[1] == trace_id
    spans = otlp_receiver.trace(trace_id, until=("POST /v1/chat/completions",))
    assert [s.attributes["http.response.status_code"] for s in spans] == [401]
