"""Fixtures for the serving tests: the real Ray Serve app on a free port, once per session.

The app is the production one (five deployments, FastAPI ingress, proxy) with tiny models:
the sample corpus is ingested with the tiny embedder into a private data dir, the generator is
the tiny Llama, a random LoRA adapter is served as ``tiny-lora``, and a tiny random
cross-encoder reranks (its own deployment). The reranker's candidates are 3: a request for k
>= 3 passages gets the retriever's top k reordered (the same hits as without a reranker, which
the tests that look for an obvious document rely on), one for fewer chooses among the top 3
(the reranker test relies on that). Every deployment reserves
0 CPUs so the app never starves the other tests sharing the session's local Ray, and the
generator admits 4 requests (batches of up to 4) and queues 2 more per caller, so the
back-pressure test can fill it with a handful of requests. Every replica exports its spans to
a session-wide OTLP receiver (``otlp_receiver``), so every serving test runs with tracing on.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import SAMPLE_DOCS
from tests.otlp_receiver import OtlpReceiver

CHAT_KEY = "test-chat-key-0123456789"
ADMIN_KEY = "test-admin-key-9876543210"
APP_NAME = "ragops-test"


@dataclass
class Served:
    """The running test app."""

    url: str
    settings: object
    hold_file: Path
    feedback_dir: Path
    chat_key: str = CHAT_KEY
    admin_key: str = ADMIN_KEY

    def client(self, key: str | None = CHAT_KEY, timeout: float = 60.0) -> httpx.Client:
        """An HTTP client on the app, with ``key`` as bearer token (None: anonymous)."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_lora_dir(tiny_llm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter with random B matrices for the tiny model (its output differs from the base's)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llm_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 1.0)
    out = tmp_path_factory.mktemp("serve-lora")
    model.save_pretrained(out)
    return out


#: Hits the served reranker chooses from (retrieval.rerank.candidates of the test app).
RERANK_CANDIDATES = 3


@pytest.fixture(scope="session")
def tiny_cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random cross-encoder (fixed seed), saved once per session."""
    from tests.retrieval._helpers import build_tiny_cross_encoder

    return build_tiny_cross_encoder(tmp_path_factory.mktemp("serve-cross-encoder"))


def index_overrides(tiny_embedder: Path) -> list[str]:
    """Overrides that decide what the test app's index holds (shared by a test's own copy of it)."""
    return [
        f"embedder.model={tiny_embedder}",
        "ingest.runner=local",
        "ingest.chunker.chunk_tokens=64",
        "ingest.chunker.overlap_tokens=8",
    ]


@pytest.fixture(scope="session")
def otlp_receiver() -> Iterator[OtlpReceiver]:
    """The OTLP/HTTP collector every replica of the test app exports its spans to."""
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="session")
def serve_settings(
    tmp_path_factory: pytest.TempPathFactory, tiny_embedder: Path, tiny_llm_dir: Path, tiny_lora_dir: Path,
    tiny_cross_encoder: Path, otlp_receiver: OtlpReceiver,
):  # fmt: skip
    """Settings of the test app, with the sample corpus ingested (local runner); traced to ``otlp_receiver``."""
    from ragops.config import load_settings
    from ragops.ingest.pipeline import run_ingest

    root = tmp_path_factory.mktemp("serve")
    overrides = [
        *index_overrides(tiny_embedder),
        f"retrieval.rerank.model={tiny_cross_encoder}",
        f"retrieval.rerank.candidates={RERANK_CANDIDATES}",
        f"generator.model={tiny_llm_dir}",
        "generator.max_new_tokens=8",
        "generator.context_tokens=128",
        # These tests exercise the generation path (batching, streaming, adapters, limits) with
        # a tiny random LM: the generative reader, unchecked. The extractive default, grounding
        # and abstention have their own tests (tests/retrieval, test_chat_default_reader_*).
        "generator.reader=stuff",
        "generator.grounding=off",
        "generator.abstain_below=0",
        "serve.request_timeout_s=60",
        "serve.max_body_bytes=65536",
        "serve.max_tokens_limit=64",
        f"serve.generator.test_hold_file={root / 'hold'}",
        "serve.generator.max_ongoing_requests=4",
        "serve.generator.max_batch_size=4",
        "serve.generator.max_queued_requests=2",
        "serve.generator.batch_wait_timeout_s=0.05",
        f"serve.generator.adapters={{tiny-lora: '{tiny_lora_dir}'}}",
        f"telemetry.otlp_endpoint={otlp_receiver.endpoint}",
        "telemetry.export_delay_s=0.2",
    ]
    for dep in ("ingress", "embedder", "retriever", "reranker", "generator"):
        overrides += [f"serve.{dep}.num_cpus=0", f"serve.{dep}.torch_threads=1"]
    settings = load_settings([], overrides, data_dir=root / "data", environ={})
    report = run_ingest(settings, [str(SAMPLE_DOCS)])
    assert report.ok
    return settings


@pytest.fixture(scope="session")
def served(ray_local: None, serve_settings) -> Iterator[Served]:
    """The app on 127.0.0.1:<free port> until the end of the session."""
    from ray import serve

    from ragops.serve.app import build_application
    from ragops.serve.auth import ApiKeys
    from ragops.serve.ingress import feedback_dir

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    keys = ApiKeys.from_keys([CHAT_KEY], [ADMIN_KEY])
    serve.run(build_application(serve_settings, keys=keys), name=APP_NAME, route_prefix="/")
    app = Served(
        url=f"http://127.0.0.1:{port}",
        settings=serve_settings,
        hold_file=serve_settings.serve.generator.test_hold_file,
        feedback_dir=feedback_dir(serve_settings),
    )
    deadline = time.monotonic() + 120
    with app.client() as c:
        while True:
            try:
                if c.get("/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the test app did not become healthy")
            time.sleep(0.5)
    try:
        yield app
    finally:
        serve.shutdown()


@pytest.fixture
def api(served: Served) -> Iterator[httpx.Client]:
    """An HTTP client with the chat key."""
    with served.client() as c:
        yield c


def chat_body(question: str = "What is MIG?", **extra: object) -> dict:
    """A minimal valid chat request."""
    return {"model": "ragops", "messages": [{"role": "user", "content": question}], **extra}
