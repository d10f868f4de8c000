"""The served app through HTTP: the official openai client, search, feedback, auth, metrics."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.serve.conftest import ADMIN_KEY, CHAT_KEY, Served, chat_body

pytestmark = pytest.mark.e2e


@pytest.fixture
def oai(served: Served) -> openai.OpenAI:
    """The official OpenAI client pointed at the app."""
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key=CHAT_KEY, max_retries=0, timeout=60)


def _feedback_lines(served: Served, name: str) -> list[dict]:
    path = served.feedback_dir / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_openai_client_chat(oai: openai.OpenAI, served: Served) -> None:
    raw = oai.chat.completions.with_raw_response.create(
        model="ragops", messages=[{"role": "user", "content": "What is MIG?"}], max_tokens=5, temperature=0, seed=1
    )
    resp = raw.parse()
    assert resp.object == "chat.completion" and resp.model == "ragops"
    assert resp.choices[0].message.role == "assistant" and isinstance(resp.choices[0].message.content, str)
    assert resp.choices[0].finish_reason == "length"  # the tiny model never emits EOS
    assert resp.usage.completion_tokens == 5 and resp.usage.total_tokens == resp.usage.prompt_tokens + 5
    assert raw.headers["x-request-id"] == resp.id
    extra = resp.model_extra or {}
    assert isinstance(extra["citations"], list)
    for c in extra["citations"]:
        assert set(c) == {"n", "doc_id", "chunk_id", "source", "score"}
    # The request log holds what feedback will be joined with.
    logged = [r for r in _feedback_lines(served, "requests.jsonl") if r["request_id"] == resp.id]
    assert logged and logged[-1]["answer"] == resp.choices[0].message.content
    assert logged[-1]["question"] == "What is MIG?" and logged[-1]["passages"]
    assert logged[-1]["requested_model"] == "ragops" and logged[-1]["model"] == served.settings.generator.model
    assert set(logged[-1]["passages"][0]) == {"n", "doc_id", "chunk_id", "source", "score", "text"}


def test_chat_default_reader_returns_quotes_support_and_grounded(oai: openai.OpenAI, served: Served) -> None:
    """The extractive reader and the grounding report through HTTP, whole and streamed."""
    for stream in (False, True):
        resp = oai.chat.completions.create(
            model="ragops", messages=[{"role": "user", "content": "What does DRA stand for?"}],
            extra_body={"rag": {"reader": "extractive", "k": 3}}, stream=stream,
        )
        if stream:
            chunks = list(resp)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            extra = next(c for c in chunks if c.choices and c.choices[0].finish_reason).model_extra or {}
        else:
            text, extra = resp.choices[0].message.content, resp.model_extra or {}
        assert extra["grounded"] is True and extra["ragops"]["reader"] == "extractive"
        assert extra["ragops"]["grounding"]["sentences"][0]["support"] == 1.0
        assert extra["citations"] and all({"start", "end", "quote"} <= set(c) for c in extra["citations"])
        assert extra["citations"][0]["quote"].rstrip(".") in text


def test_openai_client_streaming(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="ragops",
        messages=[{"role": "user", "content": "How do I request a GPU in Kubernetes?"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"rag": {"reader": "fid", "k": 3}},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    citations = (finals[0].model_extra or {})["citations"]
    assert citations and all(c["doc_id"] for c in citations)  # FiD always attributes its answer
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    assert len({c.id for c in chunks}) == 1


# Dense search: hybrid (RRF) scores can tie, and the engine may order ties differently between
# calls, which would change the passages and so the tiny model's answer.
DENSE = {"mode": "dense"}


def test_stream_and_whole_answer_agree(api: httpx.Client) -> None:
    whole = api.post("/v1/chat/completions", json=chat_body(max_tokens=6, rag=DENSE)).json()
    with api.stream("POST", "/v1/chat/completions", json=chat_body(max_tokens=6, stream=True, rag=DENSE)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert streamed == whole["choices"][0]["message"]["content"]  # greedy: batched == streamed
    assert chunks[-1]["citations"] == whole["citations"]


def test_openai_client_embeddings_and_models(oai: openai.OpenAI, served: Served) -> None:
    emb = oai.embeddings.create(model="ragops-embedding", input=["GPU sharing", "Ray Serve"])  # client asks base64
    assert [d.index for d in emb.data] == [0, 1] and len(emb.data[0].embedding) == 32
    floats = oai.embeddings.create(model="ragops-embedding", input="GPU sharing", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(emb.data[0].embedding, abs=1e-6)
    assert emb.usage.prompt_tokens > 0
    ids = [m.id for m in oai.models.list().data]
    assert {"ragops", "tiny-lora", "ragops-embedding"} <= set(ids)
    with pytest.raises(openai.NotFoundError):
        oai.embeddings.create(model="text-embedding-3-small", input="x")


def test_adapter_is_multiplexed(api: httpx.Client) -> None:
    base = api.post("/v1/chat/completions", json=chat_body(max_tokens=8, rag=DENSE)).json()
    tuned = api.post("/v1/chat/completions", json={**chat_body(max_tokens=8, rag=DENSE), "model": "tiny-lora"})
    assert tuned.status_code == 200, tuned.text
    assert tuned.json()["model"] == "tiny-lora"
    assert tuned.json()["choices"][0]["message"]["content"] != base["choices"][0]["message"]["content"]
    unknown = api.post("/v1/chat/completions", json={**chat_body(), "model": "no-such-adapter"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    path_like = api.post("/v1/chat/completions", json={**chat_body(), "model": "/etc"})
    assert path_like.status_code == 404


def test_search_matches_cli_shape(api: httpx.Client) -> None:
    r = api.post("/v1/search", json={"query": "MIG Multi-Instance GPU partitions", "k": 3, "mode": "sparse"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "sparse" and len(body["hits"]) == 3
    assert set(body["hits"][0]) >= {"rank", "score", "doc_id", "chunk_id", "text", "source", "metadata"}
    assert "gpus/mig.md" in [h["doc_id"] for h in body["hits"]]
    filtered = api.post("/v1/search", json={"query": "GPU", "filters": {"source": "*kubernetes/*"}}).json()["hits"]
    assert filtered and all(h["doc_id"].startswith("kubernetes/") for h in filtered)
    bad = api.post("/v1/search", json={"query": "GPU", "filters": {"colour": "red"}})
    assert bad.status_code == 400 and "unknown filter key" in bad.json()["error"]["message"]


def test_feedback_roundtrip(api: httpx.Client, served: Served) -> None:
    r = api.post("/v1/chat/completions", json=chat_body("What is time-slicing?"))
    rid = r.headers["x-request-id"]
    assert r.json()["id"] == rid
    fb = api.post("/v1/feedback", json={"request_id": rid, "rating": "down", "comment": "vague",
                                        "preferred_answer": "Sharing a GPU by time."})  # fmt: skip
    assert fb.status_code == 200 and fb.json()["stored"] is True
    record = [x for x in _feedback_lines(served, "feedback.jsonl") if x["request_id"] == rid][-1]
    # trace_id: the test app traces (see conftest), so the answer's trace is kept with the feedback.
    assert set(record) == {"request_id", "question", "passages", "answer", "model", "requested_model", "variant",
                           "rating", "comment", "preferred_answer", "created", "trace_id"}  # fmt: skip
    assert record["variant"] == record["model"]  # no split: the variant is what answered
    assert len(record["trace_id"]) == 32 and int(record["trace_id"], 16)
    assert record["question"] == "What is time-slicing?" and record["rating"] == "down"
    assert record["answer"] == r.json()["choices"][0]["message"]["content"]
    assert record["passages"] and "text" in record["passages"][0]
    missing = api.post("/v1/feedback", json={"request_id": "no-such-request", "rating": "up"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "request_not_found"


@pytest.mark.parametrize(
    "method, path, key, status",
    [
        ("GET", "/v1/models", None, 401),
        ("GET", "/v1/models", "wrong-key", 401),
        ("GET", "/v1/models", CHAT_KEY, 200),
        ("GET", "/v1/models", ADMIN_KEY, 200),
        ("POST", "/v1/admin/reload", None, 401),
        ("POST", "/v1/admin/reload", CHAT_KEY, 403),
        ("POST", "/v1/admin/reload", ADMIN_KEY, 200),
        ("POST", "/v1/search", None, 401),
        ("GET", "/healthz", None, 200),
        ("GET", "/metrics", None, 200),
        ("GET", "/", None, 200),
    ],
)
def test_auth_matrix(served: Served, method: str, path: str, key: str | None, status: int) -> None:
    with served.client(key) as c:
        body = {"query": "GPU"} if path == "/v1/search" else None
        r = c.request(method, path, json=body)
    assert r.status_code == status, r.text
    if status >= 400:
        err = r.json()["error"]
        assert err["type"] in ("authentication_error", "permission_error") and err["message"]
        for secret in (CHAT_KEY, ADMIN_KEY, "wrong-key"):
            assert secret not in r.text


def test_anonymous_malformed_request_gets_401_not_400(served: Served) -> None:
    with served.client(None) as c:
        r = c.post("/v1/chat/completions", content=b"{not json")
    assert r.status_code == 401  # auth is checked before the body is looked at


def test_health_metrics_and_page(api: httpx.Client) -> None:
    health = api.get("/healthz").json()
    assert health["status"] == "ok" and health["vectorstore"]["ok"] and health["vectorstore"]["points"] > 0
    assert set(health["deployments"]) == {"Ingress", "QueryEmbedder", "Retriever", "Reranker", "Generator"}
    api.post("/v1/chat/completions", json=chat_body(max_tokens=3))
    text = api.get("/metrics").text
    for series in ("ragops_http_requests_total", "ragops_http_request_duration_seconds_bucket",
                   "ragops_completion_tokens_total", "ragops_retrieval_duration_seconds_bucket",
                   "ragops_downstream_inflight_calls", "ragops_http_inflight_requests", "ragops_rejections_total",
                   "ragops_queue_depth", "ragops_rerank_duration_seconds_bucket"):  # fmt: skip
        assert series in text, series
    page = api.get("/")
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'sha256-" in csp and "unsafe-inline" not in csp


def test_registry_adapter_is_served_by_alias(api: httpx.Client, served: Served, tiny_lora_dir, tiny_llm_dir) -> None:
    artifacts = pytest.importorskip("ragops.artifacts")
    registry = artifacts.Registry.from_settings(served.settings)
    art = registry.publish(tiny_lora_dir, kind="sft", base_model=str(tiny_llm_dir), move_latest=False)
    registry.set_alias("serve-test", art.name)
    ids = [m["id"] for m in api.get("/v1/models").json()["data"]]
    assert "serve-test" in ids and art.name in ids
    by_alias = api.post("/v1/chat/completions", json={**chat_body(max_tokens=8, rag=DENSE), "model": "serve-test"})
    assert by_alias.status_code == 200, by_alias.text
    assert by_alias.json()["model"] == "serve-test"
    configured = api.post("/v1/chat/completions", json={**chat_body(max_tokens=8, rag=DENSE), "model": "tiny-lora"}).json()
    # The same adapter weights, reached through the registry: the same greedy answer.
    assert by_alias.json()["choices"][0]["message"]["content"] == configured["choices"][0]["message"]["content"]
    # The log names the artifact that answered, so feedback stays attributable after the alias moves.
    logged = [r for r in _feedback_lines(served, "requests.jsonl") if r["request_id"] == by_alias.json()["id"]]
    assert logged[-1]["model"] == art.name and logged[-1]["requested_model"] == "serve-test"
