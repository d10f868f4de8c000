"""Serving pieces that need no Ray: config, auth, feedback store, batched answering, request rules."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from ragops.config import load_settings
from ragops.errors import ConfigError
from ragops.serve.auth import ApiKeys, Role, authorize, check_bind, is_loopback
from ragops.serve.config import AutoscalingSettings, GeneratorSettings, ServeConfig
from ragops.serve.errors import APIError
from ragops.serve.feedback import FeedbackStore

# -- config ---------------------------------------------------------------------------------


def test_serve_config_defaults_fit_a_two_core_laptop() -> None:
    sc = load_settings(environ={}).serve
    total = sum(getattr(sc, d).num_cpus for d in ("ingress", "embedder", "retriever", "generator"))
    assert total <= 2 and sc.host == "127.0.0.1"
    assert sc.generator.autoscaling.max_replicas == 1 and sc.retriever.autoscaling.max_replicas == 1
    opts = sc.generator.deployment_options()
    assert opts["ray_actor_options"] == {"num_cpus": 1.0}
    assert opts["autoscaling_config"]["min_replicas"] == 1 and opts["max_queued_requests"] == 32


def test_serve_config_is_validated_and_overridable() -> None:
    with pytest.raises(ValidationError, match="max_batch_size"):
        GeneratorSettings(max_batch_size=32, max_ongoing_requests=8)
    with pytest.raises(ValidationError, match="min_replicas"):
        AutoscalingSettings(min_replicas=3, max_replicas=2)
    with pytest.raises(ValidationError):
        ServeConfig(default_k=60, max_k=50)
    s = load_settings([], ["serve.generator.num_gpus=0.5", "serve.ingress.autoscaling.max_replicas=4"],
                      environ={"RAGOPS_SERVE__PORT": "9001"})  # fmt: skip
    assert s.serve.port == 9001 and s.serve.ingress.autoscaling.max_replicas == 4
    assert s.serve.generator.deployment_options()["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.5}
    with pytest.raises(ConfigError, match="serve.generator.max_batch"):
        load_settings([], ["serve.generator.max_batch"], environ={})


def test_edge_store_allows_one_retriever_replica() -> None:
    from ragops.serve.app import check_topology

    with pytest.raises(ConfigError, match="one process only.*Qdrant server"):
        check_topology(load_settings([], ["serve.retriever.autoscaling.max_replicas=2"], environ={}))
    check_topology(load_settings([], ["serve.retriever.autoscaling.max_replicas=4", "vectorstore.backend=qdrant",
                                      "vectorstore.url=http://qdrant:6333"], environ={}))  # fmt: skip


def test_gpu_reserved_for_a_cpu_model_is_refused() -> None:
    from ragops.serve.app import check_topology

    with pytest.raises(ConfigError, match="generator.device=auto"):
        check_topology(load_settings([], ["serve.generator.num_gpus=0.5"], environ={}))
    check_topology(load_settings([], ["serve.generator.num_gpus=0.5", "generator.device=auto"], environ={}))
    # The reranker runs on the embedder's device; its GPU matters only when a reranker is configured.
    check_topology(load_settings([], ["serve.reranker.num_gpus=0.5"], environ={}))
    with pytest.raises(ConfigError, match="serve.reranker.num_gpus.*embedder.device=auto"):
        check_topology(load_settings([], ["serve.reranker.num_gpus=0.5", "retrieval.rerank.model=bge-reranker-base"],
                                     environ={}))  # fmt: skip


def test_reranker_settings_and_candidates() -> None:
    from ragops.serve.backend import candidates_to_fetch
    from ragops.serve.config import RerankerSettings

    with pytest.raises(ValidationError, match="max_batch_size"):
        RerankerSettings(max_batch_size=8, max_ongoing_requests=4)
    s = load_settings([], ["serve.reranker.num_cpus=1", "serve.reranker.autoscaling.max_replicas=3"], environ={})
    opts = s.serve.reranker.deployment_options()
    assert opts["ray_actor_options"] == {"num_cpus": 1.0} and opts["autoscaling_config"]["max_replicas"] == 3
    # As the library's Retriever: the reranker chooses among max(k, candidates) hits.
    assert candidates_to_fetch(3, 30) == 30 and candidates_to_fetch(40, 30) == 40


def test_build_app_refuses_unknown_arguments() -> None:
    from ragops.serve.app import build_app

    with pytest.raises(ConfigError, match="unknown build_app argument"):
        build_app({"configs": "x.yaml"})


# -- auth -----------------------------------------------------------------------------------


def test_api_keys_roles_and_secrecy() -> None:
    keys = ApiKeys.from_env({"RAGOPS_API_KEYS_CHAT": " c1, c2 ,", "RAGOPS_API_KEYS_ADMIN": "a1"})
    assert keys.enabled and keys.role_of("c2") is Role.CHAT and keys.role_of("a1") is Role.ADMIN
    assert keys.role_of("nope") is None and keys.role_of("") is None
    assert "c1" not in repr(keys) and keys.chat[0] not in repr(keys)
    assert authorize(keys, "Bearer a1", Role.ADMIN) is Role.ADMIN
    assert authorize(keys, "bearer c1", Role.CHAT) is Role.CHAT
    for header, role, status in [(None, Role.CHAT, 401), ("Bearer", Role.CHAT, 401), ("Basic c1", Role.CHAT, 401),
                                 ("Bearer zz", Role.CHAT, 401), ("Bearer c1", Role.ADMIN, 403)]:  # fmt: skip
        with pytest.raises(APIError) as exc:
            authorize(keys, header, role)
        assert exc.value.status == status and "c1" not in exc.value.message
    assert authorize(ApiKeys(), None, Role.ADMIN) is None  # no keys: open (loopback only, see below)


def test_bind_policy() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and not is_loopback("0.0.0.0")
    check_bind("127.0.0.1", ApiKeys(), insecure=False)
    check_bind("0.0.0.0", ApiKeys.from_keys(["k"]), insecure=False)
    check_bind("0.0.0.0", ApiKeys(), insecure=True)
    with pytest.raises(ConfigError, match="RAGOPS_API_KEYS_CHAT.*--insecure"):
        check_bind("0.0.0.0", ApiKeys(), insecure=False)


# -- feedback store ---------------------------------------------------------------------------


def test_feedback_joins_the_request_log(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path / "fb")
    passages = [{"n": 1, "doc_id": "a.md", "chunk_id": "c1", "source": "/d/a.md", "score": 0.5, "text": "A."}]
    store.log_request({"request_id": "r1", "question": "q?", "passages": passages, "answer": "A [1]", "model": "ragops"})
    assert store.add_feedback("nope", "up") is None
    rec = store.add_feedback("r1", "down", comment="meh", preferred_answer="B")
    assert rec == {"request_id": "r1", "question": "q?", "passages": passages, "answer": "A [1]", "model": "ragops",
                   "requested_model": None, "variant": "ragops", "rating": "down", "comment": "meh",
                   "preferred_answer": "B", "created": rec["created"]}  # fmt: skip
    lines = (tmp_path / "fb" / "feedback.jsonl").read_text().splitlines()
    assert json.loads(lines[-1]) == rec


def test_failed_requests_are_logged_but_take_no_feedback(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path / "fb")
    store.log_request({"request_id": "r2", "model": "m", "variant": "b", "status": "error", "error": {"status": 504}})
    assert store.add_feedback("r2", "up") is None
    fresh = FeedbackStore(tmp_path / "fb")  # from the log on disk, not the memory of recent requests
    assert fresh.add_feedback("r2", "up") is None
    assert "r2" in (tmp_path / "fb" / "requests.jsonl").read_text()


def test_feedback_finds_old_requests_in_a_large_log(tmp_path: Path) -> None:
    writer = FeedbackStore(tmp_path)
    for i in range(400):  # ~200 KB: several blocks of the backwards reader
        writer.log_request({"request_id": f"r{i}", "question": "x" * 500, "answer": str(i)})
    with open(tmp_path / "requests.jsonl", "a") as f:
        f.write('{"request_id": "torn')  # a crash mid-write leaves a partial last line
    reader = FeedbackStore(tmp_path)  # a fresh replica: nothing in memory
    assert reader.find_request("r0")["answer"] == "0"
    assert reader.find_request("r399")["answer"] == "399"
    assert reader.find_request("r400") is None


def test_concurrent_appends_stay_whole_lines(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path)

    def write(t: int) -> None:
        for i in range(50):
            store.log_request({"request_id": f"{t}-{i}", "answer": "y" * 3000})

    threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = (tmp_path / "requests.jsonl").read_text().splitlines()
    assert len(lines) == 200 and all(json.loads(x)["answer"] == "y" * 3000 for x in lines)


# -- request rules --------------------------------------------------------------------------


def test_chat_request_rules() -> None:
    from ragops.serve.http_app import reader_question
    from ragops.serve.schemas import ChatCompletionRequest

    body = ChatCompletionRequest.model_validate({
        "model": "ragops",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is MIG?"},
                     {"role": "assistant", "content": "A GPU partitioning."},
                     {"role": "user", "content": [{"type": "text", "text": "And MPS?"}]}],
        "max_completion_tokens": 7, "stop": "\n",
    })  # fmt: skip
    assert body.question == "And MPS?" and body.token_limit == 7 and body.stop_list == ["\n"]
    assert reader_question(body, 0) == "And MPS?"
    with_history = reader_question(body, 2)
    assert with_history.startswith("Conversation so far:\nuser: What is MIG?\nassistant: A GPU partitioning.")
    assert with_history.endswith("Current question: And MPS?")
    for bad in ({"n": 2}, {"tools": []}, {"logprobs": True}, {"temperature": "0"}, {"stop": ["a"] * 5},
                {"messages": [{"role": "assistant", "content": "hi"}]}, {"unknown": 1}):  # fmt: skip
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "q"}], **bad})


# -- batched answering (no Ray) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def answering(tiny_llm_dir: Path, tiny_embedder: Path):
    from ragops.retrieval.generation import Generator
    from ragops.retrieval.search import SearchHit, SearchResult

    settings = load_settings([], [f"generator.model={tiny_llm_dir}", f"embedder.model={tiny_embedder}",
                                  "generator.max_new_tokens=6", "generator.context_tokens=96",
                                  # The batched path is the stuff reader's (grounding on: batched equals alone).
                                  "generator.reader=stuff", "generator.abstain_below=0"], environ={})  # fmt: skip
    gen = Generator(settings.generator)
    gen.warm_up()
    texts = ["The capital of France is Paris.", "Qdrant stores vectors.", "Ray Data embeds documents in parallel."]
    hits = [SearchHit(rank=i + 1, score=1.0 - i / 10, doc_id=f"d{i}.md", chunk_id=f"c{i}", text=t, source=f"/x/d{i}.md")
            for i, t in enumerate(texts)]  # fmt: skip
    return settings, gen, SearchResult(hits=hits, timings={"total_s": 0.001}, mode="dense")


def test_batched_answers_equal_single_answers(answering) -> None:
    from ragops.serve.answering import AnswerRequest, answer_batch, answer_dict, start_answer

    settings, gen, search = answering
    reqs = [AnswerRequest(question=q, search=search) for q in ("What is the capital of France?", "Who stores vectors?")]
    reqs.append(AnswerRequest(question="Where is Paris?", search=search, gen={"max_new_tokens": 3}))
    batched = answer_batch(gen, settings, reqs)
    for req, got in zip(reqs, batched):
        alone = start_answer(gen, settings, req)
        for _ in alone:
            pass
        want = answer_dict(alone)
        assert got["answer"] == want["answer"] and got["citations"] == want["citations"]
        assert got["passages"] == want["passages"] and got["usage"] == want["usage"]
    assert batched[2]["usage"]["completion_tokens"] == 3


def test_an_abstaining_request_in_a_batch_is_answered_without_generation(answering) -> None:
    from ragops.serve.answering import AnswerRequest, answer_batch

    settings, gen, search = answering
    strict = settings.model_copy(update={"generator": settings.generator.model_copy(update={"abstain_below": 0.99})})
    out = answer_batch(gen, strict, [AnswerRequest(question="What is the capital of Peru?", search=search)] * 2)
    assert all(o["abstained"] and o["usage"]["completion_tokens"] == 0 for o in out)
    assert out[0]["answer"].startswith("The indexed documents do not cover this question.")


def test_one_bad_request_does_not_fail_its_batch(answering) -> None:
    from ragops.serve.answering import AnswerRequest, answer_batch

    settings, gen, search = answering
    good = AnswerRequest(question="What is Qdrant?", search=search)
    bad_reader = AnswerRequest(question="x", search=search, reader="nonsense")
    empty = AnswerRequest(question="   ", search=search)
    fid = AnswerRequest(question="What is Qdrant?", search=search, reader="fid")
    out = answer_batch(gen, settings, [good, bad_reader, empty, fid])
    assert "answer" in out[0] and out[3]["reader"] == "fid" and out[3]["citations"]
    assert out[1]["error"]["status"] == 400 and "unknown reader" in out[1]["error"]["message"]
    assert out[2]["error"]["status"] == 400


# -- continuous batching ----------------------------------------------------------------------


def test_scheduler_merges_requests_that_arrive_while_a_batch_runs() -> None:
    import asyncio

    from ragops.serve.scheduler import BatchScheduler

    batches: list[tuple[str, list[int]]] = []

    async def run_batch(model_id: str, reqs: list[int]) -> list[int]:
        batches.append((model_id, list(reqs)))
        await asyncio.sleep(0.05)  # the model is busy: later requests queue up
        return [r * 10 for r in reqs]

    async def scenario() -> list:
        sched: BatchScheduler[int] = BatchScheduler(run_batch, max_batch_size=4)
        first = sched.submit("", [1])
        await asyncio.sleep(0.01)  # the first batch is running now
        later = [sched.submit("", [i]) for i in range(2, 8)] + [sched.submit("lora", [100])]
        gone = sched.submit("", [99])
        gone[0].cancel()  # its caller gave up before the batch started
        results = await asyncio.gather(*first, *(f for fs in later for f in fs))
        return results

    results = asyncio.run(scenario())
    assert results == [10, 20, 30, 40, 50, 60, 70, 1000]
    assert batches == [("", [1]), ("", [2, 3, 4, 5]), ("", [6, 7]), ("lora", [100])]


def test_backend_sends_the_candidates_to_the_reranker_then_expands() -> None:
    """The ingress's flow with a reranker: search candidates, rerank to k, then expand neighbours."""
    import asyncio

    from ragops.serve.backend import Deadline, HandleBackend
    from ragops.serve.metrics import ServeMetrics

    retrieval = load_settings([], ["retrieval.rerank.model=x", "retrieval.rerank.candidates=7",
                                   "retrieval.expand_neighbors=1", "retrieval.k=4"], environ={}).retrieval  # fmt: skip
    backend = HandleBackend(object(), object(), object(), ServeMetrics(), 1, reranker=object(), retrieval=retrieval)
    calls: list[tuple] = []

    def fake(name: str):  # type: ignore[no-untyped-def]
        async def call(method: str, *args, deadline, **kw):  # type: ignore[no-untyped-def]
            calls.append((name, method, *args))
            return f"{name}.{method}"

        return call

    class Reranked:  # a result with hits, so that expansion runs
        hits = (1,)

    async def rerank(method: str, *args, deadline, **kw):  # type: ignore[no-untyped-def]
        calls.append(("reranker", method, *args))
        return Reranked()

    backend.retriever.call = fake("retriever")  # type: ignore[method-assign]
    assert backend.reranker is not None
    backend.reranker.call = rerank  # type: ignore[method-assign]

    async def scenario() -> list:
        d = Deadline(5.0)
        return [await backend.search("q", "vec", {"k": 2, "mode": "dense"}, deadline=d),
                await backend.retrieve("q", "vec", {"k": None}, deadline=d)]  # fmt: skip

    out = asyncio.run(scenario())
    assert calls[0] == ("retriever", "search", "q", "vec", {"k": 7, "mode": "dense"})  # max(k, candidates)
    assert calls[1][:2] == ("reranker", "rerank") and calls[1][-1] == 2  # keeps the k asked for
    assert calls[2] == ("retriever", "search", "q", "vec", {"k": 7})  # default k 4 → 7 candidates
    assert calls[3][-1] == 4 and calls[4][:2] == ("retriever", "expand")  # expansion after reranking
    assert out[1] == "retriever.expand"


# -- health at zero replicas --------------------------------------------------------------------


class _AsleepBackend:
    """A backend whose deployments must not be called (they are at zero replicas)."""

    calls: list[str] = []

    async def retriever_health(self, *, deadline: object) -> dict:
        self.calls.append("retriever")
        return {"ok": True}

    async def generator_info(self, *, deadline: object) -> dict:
        self.calls.append("generator")
        return {"engine": "llamacpp"}


def _health(running: dict[str, int], statuses: dict[str, str]) -> tuple[int, dict, list[str]]:
    import asyncio

    from ragops.serve.health import health_response
    from ragops.serve.http_app import IngressContext

    backend = _AsleepBackend()
    backend.calls = []

    async def status() -> dict[str, str]:
        return statuses

    async def replicas() -> dict[str, int]:
        return running

    ctx = IngressContext(settings=None, keys=ApiKeys(), backend=backend, metrics=None, feedback=None, catalog=None,  # type: ignore[arg-type]
                         deployment_status=status, running_replicas=replicas)  # fmt: skip
    resp = asyncio.run(health_response(ctx))
    return resp.status_code, json.loads(resp.body), backend.calls


def test_health_does_not_wake_deployments_scaled_to_zero() -> None:
    code, body, calls = _health({"Generator": 0, "Retriever": 0, "Ingress": 1}, {"Generator": "HEALTHY", "Retriever": "HEALTHY", "Ingress": "HEALTHY"})
    assert code == 200 and calls == []
    assert body["generator"]["replicas"] == 0 and "scaled to zero" in body["generator"]["state"]
    assert body["replicas"]["Generator"] == 0
    # Waking up (upscaling) is serving, not unhealthy; a running generator is asked for its engine.
    code, body, calls = _health({"Generator": 1, "Retriever": 1}, {"Generator": "UPSCALING", "Retriever": "HEALTHY"})
    assert code == 200 and calls == ["retriever", "generator"] and body["generator"]["engine"] == "llamacpp"
    code, _, _ = _health({"Generator": 1, "Retriever": 1}, {"Generator": "UNHEALTHY", "Retriever": "HEALTHY"})
    assert code == 503
