"""The served chat on the llama.cpp engine: the packaged SmolLM2 GGUF behind the real Ray Serve app.

A second application beside the session's test app (its own route prefix and data dir: a
retriever replica holds its Edge shard), so both share the session's Serve instance.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import SAMPLE_DOCS
from tests.serve.conftest import CHAT_KEY, Served, chat_body, index_overrides

pytest.importorskip("llama_cpp", reason="llama-cpp-python is built by scripts/setup.sh")
pytestmark = pytest.mark.e2e

PREFIX = "/llamacpp"


@pytest.fixture(scope="module")
def llama_app(served: Served, tmp_path_factory: pytest.TempPathFactory, tiny_embedder: Path) -> Iterator[httpx.Client]:
    from ray import serve

    from ragops.config import load_settings
    from ragops.ingest.pipeline import run_ingest
    from ragops.serve.app import build_application
    from ragops.serve.auth import ApiKeys

    root = tmp_path_factory.mktemp("serve-llamacpp")
    overrides = [
        *index_overrides(tiny_embedder),
        "generator.model=smollm2-135m-instruct",
        "generator.engine=llamacpp",
        "generator.reader=stuff",
        "generator.grounding=off",
        "generator.abstain_below=0",
        "generator.max_new_tokens=16",
        "generator.llamacpp.n_ctx=4096",
        "generator.llamacpp.n_threads=1",
        "serve.request_timeout_s=120",
        "serve.generator.max_ongoing_requests=8",
    ]
    for dep in ("ingress", "embedder", "retriever", "reranker", "generator"):
        overrides += [f"serve.{dep}.num_cpus=0", f"serve.{dep}.torch_threads=1"]
    settings = load_settings([], overrides, data_dir=root / "data", environ={})
    assert run_ingest(settings, [str(SAMPLE_DOCS / "gpus")]).ok
    serve.run(build_application(settings, keys=ApiKeys.from_keys([CHAT_KEY], [])), name="ragops-llamacpp", route_prefix=PREFIX)
    with httpx.Client(base_url=served.url + PREFIX, headers={"Authorization": f"Bearer {CHAT_KEY}"}, timeout=120) as client:
        deadline = time.monotonic() + 180
        while client.get("/healthz").status_code != 200:
            assert time.monotonic() < deadline, "the llama.cpp app did not become healthy"
            time.sleep(0.5)
        yield client
    serve.delete("ragops-llamacpp")


def _stream(client: httpx.Client, body: dict) -> list[dict]:
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_healthz_names_the_engine(llama_app: httpx.Client) -> None:
    gen = llama_app.get("/healthz").json()["generator"]
    assert gen["engine"] == "llamacpp" and gen["gguf"].endswith(".gguf")
    assert "generator.engine is llamacpp" in gen["reason"]


def test_streamed_and_whole_chat_agree(llama_app: httpx.Client) -> None:
    body = chat_body("What is MIG?", max_tokens=12, rag={"mode": "dense", "k": 3})
    whole = llama_app.post("/v1/chat/completions", json=body)
    assert whole.status_code == 200, whole.text
    answer = whole.json()
    text = answer["choices"][0]["message"]["content"]
    assert text.strip() and answer["usage"]["completion_tokens"] <= 12 and "citations" in answer
    chunks = _stream(llama_app, {**body, "stream_options": {"include_usage": True}})
    deltas = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert sum(1 for d in deltas if d) > 1  # token by token, not one blob
    assert "".join(deltas) == text  # greedy: the same answer streamed
    assert chunks[-1]["usage"]["completion_tokens"] == answer["usage"]["completion_tokens"]


def test_concurrent_clients_are_answered_together(llama_app: httpx.Client) -> None:
    questions = ["What is MIG?", "What does MPS do?", "How does time-slicing work?", "What is a GPU?"]
    got: dict[str, httpx.Response] = {}

    def ask(q: str) -> None:
        got[q] = llama_app.post("/v1/chat/completions", json=chat_body(q, max_tokens=8, rag={"mode": "dense"}))

    threads = [threading.Thread(target=ask, args=(q,)) for q in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    # Every client is answered in full. (The answers are not compared with one-at-a-time ones:
    # llama.cpp's kernels are not batch-invariant, so a greedy near-tie may break differently
    # when a prompt is prefilled beside others' tokens. tests/retrieval/test_llamacpp_engine.py
    # checks the engine's batching itself.)
    for q in questions:
        assert got[q].status_code == 200, got[q].text
        body = got[q].json()
        assert body["choices"][0]["message"]["content"].strip() and 0 < body["usage"]["completion_tokens"] <= 8
