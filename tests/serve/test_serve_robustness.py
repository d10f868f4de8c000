"""Bad input, overload and time limits against the running app: always a JSON answer, never a 5xx."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serve.conftest import Served, chat_body

pytestmark = pytest.mark.e2e

# -- generated malformed requests ---------------------------------------------------------

_JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20))
_ANY_JSON = st.recursive(_JSON_SCALARS, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=8), c, max_size=3)), max_leaves=8)
_NOT_STR = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.lists(_JSON_SCALARS, max_size=2), st.dictionaries(st.text(max_size=4), _JSON_SCALARS, max_size=2))
_NOT_NUMBER = st.one_of(st.booleans(), st.text(max_size=8), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
_NOT_BOOL = st.one_of(st.integers(), st.text(max_size=5), st.lists(st.booleans(), max_size=2))
_NOT_LIST = st.one_of(st.booleans(), st.integers(), st.text(max_size=8), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))

_BAD_MESSAGES = st.one_of(
    _NOT_LIST,
    st.just([]),
    st.lists(_JSON_SCALARS, min_size=1, max_size=3),
    st.builds(lambda r: [{"role": r, "content": "hi"}], st.text(max_size=10).filter(lambda r: r not in ("user", "system", "developer", "assistant"))),
    st.builds(lambda c: [{"role": "user", "content": c}], _NOT_STR.filter(lambda c: c is not None and not isinstance(c, list))),
    st.just([{"role": "user", "content": "   "}]),
    st.just([{"role": "user", "content": None}]),
    st.just([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]),
    st.just([{"role": "tool", "content": "x", "tool_call_id": "1"}]),
    st.just([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]),
    st.just([{"role": "user"}]),
    st.just([{"content": "hi"}]),
)

CHAT_FIELDS: dict[str, Any] = {
    "model": st.one_of(_NOT_STR, st.just(""), st.text(min_size=1, max_size=20).map(lambda s: "missing-" + s)),
    "messages": _BAD_MESSAGES,
    "temperature": st.one_of(_NOT_NUMBER, st.floats(min_value=2.01, max_value=1e300), st.floats(max_value=-0.01, min_value=-1e300)),
    "top_p": st.one_of(_NOT_NUMBER, st.just(0), st.floats(min_value=1.01, max_value=1e9)),
    "max_tokens": st.one_of(_NOT_NUMBER, st.integers(max_value=0), st.integers(min_value=65, max_value=10**30), st.just(1.5)),
    "n": st.integers(min_value=2, max_value=1000),
    "min_tokens": st.one_of(st.integers(max_value=-1), st.just(1.5), st.text(max_size=3), st.integers(min_value=65, max_value=10**6)),
    "stream": _NOT_BOOL,
    "stop": st.one_of(st.integers(), st.lists(st.text(min_size=1, max_size=3), min_size=5, max_size=8), st.just([""])),
    "seed": st.one_of(st.text(max_size=4), st.just(1.5), st.integers(min_value=2**63)),
    "tools": st.just([{"type": "function", "function": {"name": "f"}}]),
    "logprobs": st.just(True),
    "presence_penalty": st.floats(min_value=0.1, max_value=2),
    "logit_bias": st.just({"50256": -100}),
    "response_format": st.just({"type": "json_object"}),
    "stream_options": st.just({"include_usage": True}),  # without stream: true
    "rag": st.one_of(
        _NOT_LIST.filter(lambda v: not isinstance(v, dict)),
        st.builds(lambda k: {"k": k}, st.one_of(st.integers(max_value=0), st.integers(min_value=51, max_value=10**9), st.text(max_size=3))),
        st.builds(lambda m: {"mode": m}, st.text(max_size=8).filter(lambda m: m not in ("dense", "sparse", "hybrid"))),
        st.builds(lambda r: {"reader": r}, st.text(max_size=8).filter(lambda r: r not in ("stuff", "fid"))),
        st.builds(lambda f: {"filters": f}, st.dictionaries(st.text(min_size=1, max_size=6).filter(lambda k: k not in ("doc_id", "tag", "tags", "source", "metadata") and not k.startswith("metadata.")), st.text(max_size=3), min_size=1, max_size=2)),
        st.just({"filters": {"metadata": "not-a-mapping"}}),
        st.just({"filters": {"metadata": {"year": [1.5]}}}),
        st.just({"unknown": 1}),
    ),
}
SEARCH_FIELDS: dict[str, Any] = {
    "query": st.one_of(_NOT_STR, st.just(""), st.just("   ")),
    "k": st.one_of(_NOT_NUMBER, st.integers(max_value=0), st.integers(min_value=51, max_value=10**12)),
    "mode": st.text(max_size=8).filter(lambda m: m not in ("dense", "sparse", "hybrid")),
    "fusion": st.text(max_size=8).filter(lambda m: m not in ("rrf", "dbsf")),
    "filters": st.one_of(_NOT_LIST.filter(lambda v: not isinstance(v, dict)), st.just({"colour": "red"})),
    "score_threshold": _NOT_NUMBER,
}
EMBED_FIELDS: dict[str, Any] = {
    "input": st.one_of(st.just(""), st.just([]), st.just([""]), st.integers(), st.lists(st.integers(), min_size=1, max_size=3),
                       st.lists(st.text(min_size=1, max_size=3), min_size=257, max_size=260), st.none()),
    "model": st.one_of(_NOT_STR, st.just("text-embedding-3-small")),
    "encoding_format": st.text(max_size=6).filter(lambda f: f not in ("float", "base64")),
    "dimensions": st.one_of(st.integers(max_value=0), st.integers(min_value=33, max_value=4096), st.text(max_size=3)),
    "input_type": st.text(max_size=6).filter(lambda f: f not in ("query", "passage")),
}
FEEDBACK_FIELDS: dict[str, Any] = {
    "request_id": st.one_of(_NOT_STR, st.just(""), st.just("r" * 201)),
    "rating": st.one_of(_NOT_STR, st.text(max_size=5).filter(lambda r: r not in ("up", "down"))),
    "comment": st.one_of(st.integers(), st.lists(st.text(max_size=2), max_size=2), st.just("x" * 10_001)),
}

ENDPOINTS: dict[str, tuple[dict[str, Any], dict[str, Any], tuple[str, ...]]] = {
    "/v1/chat/completions": (chat_body(), CHAT_FIELDS, ("model", "messages")),
    "/v1/search": ({"query": "GPU", "k": 3}, SEARCH_FIELDS, ("query",)),
    "/v1/embeddings": ({"model": "ragops-embedding", "input": "hello"}, EMBED_FIELDS, ("model", "input")),
    "/v1/feedback": ({"request_id": "does-not-exist", "rating": "up"}, FEEDBACK_FIELDS, ("request_id", "rating")),
}


@st.composite
def malformed_request(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str]]:
    """An invalid request to one endpoint: one field broken, a required one missing, an unknown
    one added, a non-object or truncated JSON body, or raw bytes."""
    path = draw(st.sampled_from(sorted(ENDPOINTS)))
    base, fields, required = ENDPOINTS[path]
    kind = draw(st.sampled_from(["field", "field", "field", "missing", "unknown", "not_object", "truncated", "bytes"]))
    headers = {"content-type": "application/json"}
    if kind == "field":
        name = draw(st.sampled_from(sorted(fields)))
        body: Any = {**base, name: draw(fields[name])}
    elif kind == "missing":
        gone = draw(st.sampled_from(required))
        body = {k: v for k, v in base.items() if k != gone}
    elif kind == "unknown":
        key = draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in fields and k not in base and k not in _KNOWN))
        body = {**base, key: draw(_ANY_JSON)}
    elif kind == "not_object":
        body = draw(st.one_of(_JSON_SCALARS, st.lists(_JSON_SCALARS, max_size=3)))
    elif kind == "truncated":
        raw = json.dumps(base).encode()
        return path, raw[: draw(st.integers(min_value=0, max_value=len(raw) - 1))], headers
    else:
        raw = draw(st.binary(max_size=64))
        headers = draw(st.sampled_from([headers, {"content-type": "text/plain"}, {}]))
        return path, raw, headers
    return path, json.dumps(body).encode(), headers


# Optional fields of the request models that a random "unknown" key must not hit.
_KNOWN = {
    "stream", "stream_options", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed", "n",
    "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "response_format", "user",
    "store", "metadata", "parallel_tool_calls", "min_tokens", "tools", "tool_choice", "functions", "function_call", "audio",
    "prediction", "web_search_options", "rag", "k", "mode", "fusion", "filters", "score_threshold",
    "encoding_format", "dimensions", "input_type", "comment", "preferred_answer",
}  # fmt: skip


@pytest.fixture(scope="module")
def fuzz_client(served: Served):
    with served.client(timeout=30) as c:
        yield c


@settings(max_examples=240, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(req=malformed_request())
def test_malformed_requests_get_a_4xx_json_error(fuzz_client: httpx.Client, req: tuple[str, bytes, dict[str, str]]) -> None:
    path, body, headers = req
    r = fuzz_client.post(path, content=body, headers=headers)
    assert 400 <= r.status_code < 500, (r.status_code, path, body[:300], r.text[:300])
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and err["type"]


def test_server_still_answers_after_fuzzing(api: httpx.Client) -> None:
    assert api.get("/healthz").status_code == 200
    r = api.post("/v1/chat/completions", json=chat_body(max_tokens=3))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_bad_input_edge_cases(api: httpx.Client) -> None:
    big = {"query": "x" * 70_000}
    r = api.post("/v1/search", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = api.post("/v1/chat/completions", json=chat_body(max_tokens=65))
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = api.post("/v1/chat/completions", content=b'{"model": "ragops", "messages": [{"role": "user", "content": "\\ud800"}]}',
                 headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 400
    r = api.post("/v1/chat/completions", json=chat_body(), headers={"x-request-timeout": "soon"})
    assert r.status_code == 400
    r = api.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]
    r = api.post("/v1/nothing-here", json={})
    assert r.status_code == 404 and r.json()["error"]


# -- overload and time limits -------------------------------------------------------------


def _gauge(api: httpx.Client, series: str) -> float:
    for line in api.get("/metrics").text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _generator_calls(api: httpx.Client) -> float:
    return _gauge(api, 'ragops_downstream_inflight_calls{deployment="generator"}')


def _generator_queue(api: httpx.Client) -> float:
    return _gauge(api, 'ragops_queue_depth{deployment="generator"}')


def _wait_for(predicate: Any, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.1)


def test_full_queue_is_503_with_retry_after_and_nothing_is_lost(served: Served, api: httpx.Client) -> None:
    # The generator admits 4 requests and each caller queues 2 more (see conftest); the hold
    # file keeps admitted requests waiting. Requests are sent one at a time until one is
    # refused: normally the 7th, earlier if Ray Serve's router sees a request queued for an
    # instant before a replica slot takes it (it refuses on the queue length it sees).
    served.hold_file.touch()
    sent = []
    try:
        with ThreadPoolExecutor(12) as pool, served.client() as c:
            answered: list = []
            for _ in range(12):
                future = pool.submit(c.post, "/v1/chat/completions", json=chat_body(max_tokens=2))
                sent.append(future)
                _wait_for(lambda: any(f.done() for f in sent) or _generator_calls(api) >= len(sent))
                answered = [f for f in sent if f.done()]
                if answered:
                    break
            refused = answered[0].result()
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "overloaded"
            assert len(sent) <= 7  # never more than 4 running + 2 queued were accepted
            # The rest of the app keeps answering while the generator is saturated.
            assert api.post("/v1/search", json={"query": "GPU"}).status_code == 200
            assert api.get("/healthz").status_code == 200
            served.hold_file.unlink()
            statuses = [f.result().status_code for f in sent]
    finally:
        served.hold_file.unlink(missing_ok=True)
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 1  # every accepted request was answered
    _wait_for(lambda: _generator_calls(api) == 0, timeout=30)
    assert "ragops_rejections_total{reason=\"overloaded\"}" in api.get("/metrics").text


def test_queue_depth_counts_requests_waiting_for_a_generator_replica(served: Served, api: httpx.Client) -> None:
    # The generator admits 4 requests (see conftest) and the hold file keeps them there: a 5th
    # and a 6th (one streamed) wait in the handle's queue until a slot frees.
    assert _generator_queue(api) == 0
    served.hold_file.touch()
    try:
        with ThreadPoolExecutor(6) as pool, served.client() as c:

            def stream() -> int:
                with c.stream("POST", "/v1/chat/completions", json=chat_body(max_tokens=2, stream=True)) as r:
                    r.read()
                    return r.status_code

            sent = []
            for i in range(6):
                if i < 5:
                    sent.append(pool.submit(lambda: c.post("/v1/chat/completions", json=chat_body(max_tokens=2)).status_code))
                else:
                    sent.append(pool.submit(stream))
                # One at a time, each settled (on the replica or queued) before the next: no refusal.
                n = i + 1
                _wait_for(lambda n=n: _generator_calls(api) == n and _generator_queue(api) == max(0, n - 4))
            assert _generator_queue(api) == 2 and _generator_calls(api) == 6  # 4 held on the replica + 2 queued
            assert _gauge(api, 'ragops_queue_depth{deployment="embedder"}') == 0
            served.hold_file.unlink()
            statuses = [f.result() for f in sent]
    finally:
        served.hold_file.unlink(missing_ok=True)
    assert statuses == [200] * 6
    _wait_for(lambda: _generator_queue(api) == 0 and _generator_calls(api) == 0, timeout=30)


@pytest.mark.parametrize("stream", [False, True])
def test_request_over_its_time_limit_is_504_json(served: Served, api: httpx.Client, stream: bool) -> None:
    served.hold_file.touch()
    try:
        r = api.post("/v1/chat/completions", json=chat_body(stream=stream), headers={"x-request-timeout": "1"})
        assert r.status_code == 504, r.text
        assert r.json()["error"]["type"] == "timeout_error"
    finally:
        served.hold_file.unlink(missing_ok=True)
    # The timed-out call was cancelled on the replica: its slot is free again.
    _wait_for(lambda: _generator_calls(api) == 0, timeout=30)
    assert api.post("/v1/chat/completions", json=chat_body(max_tokens=2)).status_code == 200
