"""The HTTP API: a FastAPI app over a backend of deployments (no Ray import here).

Endpoints (``/v1/*`` need an API key when keys are configured; ``/v1/admin/*`` an admin key):

* ``POST /v1/chat/completions``: OpenAI chat completions, whole or streamed (SSE), answered
  from retrieved passages with ``citations``. Extensions: ``rag`` (``k``, ``mode``,
  ``reader``, ``filters``) tunes retrieval, ``min_tokens`` (as in vLLM) delays end-of-sequence;
  the response's ``ragops`` object carries timings, the reader and the batch size.
* ``POST /v1/search``: retrieval only, hits as ``ragops search --json`` prints them.
* ``POST /v1/embeddings``: OpenAI embeddings (``float`` or ``base64``).
* ``GET /v1/models``: base model, adapters, embedding model.
* ``POST /v1/feedback``: thumbs up/down (+ comment, preferred answer) on a logged request.
* ``POST /v1/admin/reload``: reopen the vector store.
* ``GET|POST /v1/admin/routes``: the traffic splits; ``{name, weights | null, note}`` changes
  one at runtime (validated; stored in the registry, so every replica follows).

A chat request for a split name is answered by one of its variants (sticky per user: the
OpenAI ``user``, else ``x-ragops-user``, else the API key), named in the ``x-ragops-variant``
header, the ``variant`` field and the request log (:mod:`ragops.serve.routing`).
* ``GET /healthz`` (200/503 JSON), ``GET /metrics`` (Prometheus), ``GET /`` (chat page).

Chat history: the question is the last user message; retrieval always uses it alone (a
follow-up's earlier turns would drag retrieval towards the previous topic). With
``serve.history_turns`` > 0 the reader also sees that many earlier user/assistant turns above
the question; the default 0 answers each question on its own, which suits the small default
generator whose context window is mostly taken by passages. System messages are accepted and
not forwarded: the reader's own instructions (cite ``[n]``, answer from the passages) apply.

Errors are OpenAI-shaped JSON (:mod:`ragops.serve.errors`): bad input is a 400 (FastAPI's 422
is turned into a 400), an unknown model a 404, an oversized body a 413, a full queue a 503
with ``Retry-After``, a request over its time limit a 504 (a gateway-style timeout: the
server, not the client, was too slow; ``serve.request_timeout_s``, lowered per request by an
``X-Request-Timeout: <seconds>`` header).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from ragops.config import Settings
from ragops.errors import InputError, ModelNotFoundError
from ragops.retrieval.search import SearchFilters
from ragops.retrieval.rag import reader_name
from ragops.serve import openai_format as fmt
from ragops.tracking import telemetry
from ragops.serve.answering import AnswerRequest
from ragops.serve.auth import ApiKeys, bearer_token
from ragops.serve.backend import Deadline
from ragops.serve.errors import APIError, bad_request, install_error_handlers, model_not_found
from ragops.serve.feedback import FeedbackStore
from ragops.serve.gate import ROUTES, GateMiddleware
from ragops.serve.health import health_response
from ragops.serve.metrics import ServeMetrics
from ragops.serve.models import ModelCatalog
from ragops.serve.tracing import TracingMiddleware, annotate
from ragops.serve.schemas import ChatCompletionRequest, EmbeddingsRequest, FeedbackBody, RouteBody, SearchBody

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
TIMEOUT_HEADER = "x-request-timeout"
#: The variant that answered a chat request (also the ``variant`` field of the response).
VARIANT_HEADER = "x-ragops-variant"
#: Who a traffic split keeps sticky when the request has no OpenAI ``user``.
USER_HEADER = "x-ragops-user"
_SAFE_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


class Backend(Protocol):
    """What the HTTP layer needs from the deployments (see :class:`ragops.serve.backend.HandleBackend`)."""

    async def encode_query(self, query: str, *, deadline: Deadline) -> Any: ...
    async def embed(self, texts: list[str], input_type: str, *, deadline: Deadline) -> dict[str, Any]: ...
    async def search(self, query: str, encoded: Any, params: dict[str, Any], *, deadline: Deadline) -> Any: ...
    async def retrieve(self, query: str, encoded: Any, params: dict[str, Any], *, deadline: Deadline) -> Any: ...
    async def answer(self, request: AnswerRequest, model_id: str, *, deadline: Deadline) -> dict[str, Any]: ...
    def answer_stream(self, request: AnswerRequest, model_id: str, *, deadline: Deadline) -> AsyncIterator[dict[str, Any]]: ...
    async def retriever_health(self, *, deadline: Deadline) -> dict[str, Any]: ...
    async def generator_info(self, *, deadline: Deadline) -> dict[str, Any]: ...
    async def reload(self, *, deadline: Deadline) -> dict[str, Any]: ...


@dataclass
class IngressContext:
    """Everything the HTTP layer of one ingress replica uses.

    Attributes:
        settings: The app's settings.
        keys: API key digests (empty: open API).
        backend: The deployments.
        metrics: This replica's metrics.
        feedback: Request log and feedback store.
        catalog: Served model names.
        running_replicas: Returns ``{deployment: running replicas}`` (0 when scaled to zero);
            None outside Ray.
        deployment_status: Returns ``{deployment: status}`` as Ray Serve reports it (health
            of replicas, models loaded); None outside Ray.
    """

    settings: Settings
    keys: ApiKeys
    backend: Backend
    metrics: ServeMetrics
    feedback: FeedbackStore
    catalog: ModelCatalog
    deployment_status: Callable[[], Awaitable[dict[str, str]]] | None = None
    running_replicas: Callable[[], Awaitable[dict[str, int]]] | None = None


# ---------------------------------------------------------------------------------------
# The chat page
# ---------------------------------------------------------------------------------------


def chat_page() -> tuple[bytes, str]:
    """The page and its Content-Security-Policy (inline script and style allowed by hash)."""
    html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    csp = (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return html.encode("utf-8"), csp


# ---------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------


def _request_id(request: Request) -> tuple[str, dict[str, str]]:
    """The request id and the headers to add for it.

    Behind Ray Serve's proxy every request carries ``x-request-id`` (the client's, or one the
    proxy made) and the proxy echoes it on the response; the same id is the completion ``id``
    and the key of the request log. Outside the proxy (tests of the bare app) one is made here.
    """
    rid = request.headers.get("x-request-id")
    if rid and _SAFE_ID.match(rid):
        return rid, {}
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    return rid, {"x-request-id": rid}


def _deadline(request: Request, settings: Settings) -> Deadline:
    limit = settings.serve.request_timeout_s
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is not None:
        try:
            asked = float(raw)
        except ValueError:
            raise bad_request(f"{TIMEOUT_HEADER} must be a number of seconds", param=TIMEOUT_HEADER) from None
        if not 0 < asked < float("inf"):
            raise bad_request(f"{TIMEOUT_HEADER} must be a positive number of seconds", param=TIMEOUT_HEADER)
        limit = min(limit, asked)  # a client may only shorten the server's limit
    return Deadline(limit)


def _filters(raw: dict[str, Any] | None, param: str) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        SearchFilters.from_dict(raw)  # validate here: a bad filter is the client's 400, not a replica error
    except (InputError, TypeError, ValueError) as exc:
        raise bad_request(str(exc), param=param) from None
    return raw


def _check_k(k: int | None, settings: Settings, param: str) -> int | None:
    if k is not None and k > settings.serve.max_k:
        raise bad_request(f"'{param}' must be at most {settings.serve.max_k}", param=param)
    return k


def reader_question(body: ChatCompletionRequest, turns: int) -> str:
    """The question the reader sees: the last user message, earlier turns above it when enabled."""
    history = body.history(turns)
    if not history:
        return body.question
    convo = "\n".join(f"{role}: {text}" for role, text in history)
    return f"Conversation so far:\n{convo}\n\nCurrent question: {body.question}"


def create_app(ctx: IngressContext) -> FastAPI:
    """Build the FastAPI app of one ingress replica."""
    settings = ctx.settings
    sc = settings.serve
    app = FastAPI(title="ragops", description="OpenAI-compatible RAG API", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.add_middleware(GateMiddleware, ctx=ctx)
    if sc.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=sc.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type", TIMEOUT_HEADER, USER_HEADER],
                           expose_headers=["x-request-id", VARIANT_HEADER])  # fmt: skip
    if telemetry.enabled():  # added last: outermost, so refused requests are traced too
        app.add_middleware(TracingMiddleware, routes=ROUTES)
    page, csp = chat_page()

    async def route_model(name: str, user: str | None) -> tuple[str, str]:
        try:
            return await asyncio.to_thread(ctx.catalog.route, name, user)
        except ModelNotFoundError:
            raise model_not_found(name) from None

    # -- chat ------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        rid, id_headers = _request_id(request)
        created = int(time.time())
        started = time.perf_counter()
        deadline = _deadline(request, settings)
        model_id, variant = await route_model(body.model, _user_of(body, request))
        # The gate labels this request's metrics with the variant (request.state is the scope's).
        request.state.variant = variant
        id_headers = {**id_headers, VARIANT_HEADER: variant}
        annotate(request.state, {"ragops.request_id": rid, "gen_ai.request.model": body.model,
                                 "ragops.variant": variant, "ragops.stream": body.stream})  # fmt: skip
        # `model` in the log is what answered (the artifact an alias pointed at, or the base
        # model): feedback must stay attributable after an alias moves. `variant` is the
        # split's name for it (the A/B report groups by it).
        served = model_id or settings.generator.model
        record: dict[str, Any] = {"request_id": rid, "model": served, "requested_model": body.model, "variant": variant}
        try:
            return await _chat(ctx, body, rid, created, started, deadline, model_id, record, id_headers)
        except APIError as err:
            await _log_failure(ctx, record, err, started)
            err.headers = {**(err.headers or {}), VARIANT_HEADER: variant}
            raise

    # -- retrieval and embeddings ----------------------------------------------------
    @app.post("/v1/search")
    async def search(body: SearchBody, request: Request) -> Response:
        deadline = _deadline(request, settings)
        annotate(request.state, {"ragops.search.k": body.k, "ragops.search.mode": body.mode})
        params = {
            "k": _check_k(body.k, settings, "k"),
            "mode": body.mode,
            "fusion": body.fusion,
            "filters": _filters(body.filters, "filters"),
            "score_threshold": body.score_threshold,
        }
        encoded = await ctx.backend.encode_query(body.query, deadline=deadline)
        result = await ctx.backend.search(body.query, encoded, params, deadline=deadline)
        ctx.metrics.observe_search(result.timings)
        return JSONResponse(result.to_dict())

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingsRequest, request: Request) -> Response:
        deadline = _deadline(request, settings)
        if body.model not in ctx.catalog.embedding_names:
            raise model_not_found(body.model)
        texts = body.texts
        if len(texts) > sc.max_embedding_inputs:
            raise bad_request(f"'input': at most {sc.max_embedding_inputs} texts per request", param="input")
        out = await ctx.backend.embed(texts, body.input_type, deadline=deadline)
        vectors = out["vectors"]
        if body.dimensions is not None and vectors and body.dimensions != len(vectors[0]):
            raise bad_request(f"'dimensions': this model makes {len(vectors[0])}-dimensional vectors only",
                              param="dimensions")  # fmt: skip
        return JSONResponse(fmt.embeddings(vectors, body.model, int(out["tokens"]), body.encoding_format))

    @app.get("/v1/models")
    async def models() -> Response:
        created = int(time.time())
        chat = await asyncio.to_thread(ctx.catalog.list_chat_models)
        data = [fmt.model_card(m["id"], created, root=m["root"], parent=m["parent"]) for m in chat]
        data.append(fmt.model_card(sc.embedding_model_name, created, root=settings.embedder.model, kind="embedding"))
        return JSONResponse({"object": "list", "data": data})

    # -- feedback --------------------------------------------------------------------
    @app.post("/v1/feedback")
    async def feedback(body: FeedbackBody) -> Response:
        with telemetry.span("feedback.store", {"ragops.request_id": body.request_id, "ragops.rating": body.rating}) as current:
            record = await asyncio.to_thread(ctx.feedback.add_feedback, body.request_id, body.rating,
                                             comment=body.comment, preferred_answer=body.preferred_answer)  # fmt: skip
            current.set_attribute("ragops.stored", record is not None)
            if record and record.get("trace_id"):
                current.set_attribute("ragops.answer_trace_id", record["trace_id"])
        if record is None:
            raise APIError(404, f"no answered request with id '{body.request_id}'", code="request_not_found",
                           param="request_id")  # fmt: skip
        ctx.metrics.feedback.labels(body.rating, str(record.get("variant") or record.get("model") or "")).inc()
        return JSONResponse({"object": "feedback", "request_id": body.request_id, "rating": body.rating, "stored": True})

    # -- admin -----------------------------------------------------------------------
    @app.post("/v1/admin/reload")
    async def reload(request: Request) -> Response:
        result = await ctx.backend.reload(deadline=_deadline(request, settings))
        return JSONResponse({"object": "reload", **result})

    @app.get("/v1/admin/routes")
    async def get_routes() -> Response:
        routes = await asyncio.to_thread(ctx.catalog.routes, fresh=True)
        return JSONResponse({"object": "routes", "routes": routes})

    @app.post("/v1/admin/routes")
    async def set_route(body: RouteBody) -> Response:
        try:
            result = await asyncio.to_thread(ctx.catalog.set_route, body.name, body.weights, by="api", note=body.note)
        except InputError as exc:
            raise bad_request(str(exc), param="weights", code="invalid_weights") from None
        return JSONResponse({"object": "route", **result})

    # -- operations ------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz() -> Response:
        return await health_response(ctx)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(ctx.metrics.render(), media_type=ctx.metrics.content_type)

    @app.get("/")
    async def index() -> Response:
        return HTMLResponse(page, headers={"Content-Security-Policy": csp, "Cache-Control": "no-cache",
                                           "X-Content-Type-Options": "nosniff"})  # fmt: skip

    return app


async def _chat(
    ctx: IngressContext,
    body: ChatCompletionRequest,
    rid: str,
    created: int,
    started: float,
    deadline: Deadline,
    model_id: str,
    record: dict[str, Any],
    id_headers: dict[str, str],
) -> Response:
    """Answer one routed chat request: retrieve, then generate (whole or streamed)."""
    settings = ctx.settings
    sc = settings.serve
    limit = body.token_limit
    if limit is not None and limit > sc.max_tokens_limit:
        raise bad_request(f"'max_tokens' must be at most {sc.max_tokens_limit}", param="max_tokens")
    if body.min_tokens is not None and body.min_tokens > min(limit or sc.max_tokens_limit, sc.max_tokens_limit):
        raise bad_request("'min_tokens' exceeds the token limit of the answer", param="min_tokens")
    rag = body.rag
    params = {
        "k": _check_k(rag.k if rag else None, settings, "rag.k") or sc.default_k,
        "mode": rag.mode if rag else None,
        "filters": _filters(rag.filters if rag else None, "rag.filters"),
    }
    question = body.question
    record.update(question=question, rag=params)
    if trace := telemetry.trace_id():
        record["trace_id"] = trace  # from a feedback record to the answer's trace
    t0 = time.perf_counter()
    encoded = await ctx.backend.encode_query(question, deadline=deadline)
    ctx.metrics.embed_seconds.observe(time.perf_counter() - t0)
    search = await ctx.backend.retrieve(question, encoded, params, deadline=deadline)
    ctx.metrics.observe_search(search.timings)
    areq = AnswerRequest(
        question=reader_question(body, sc.history_turns),
        search=search,
        # A requested adapter must write the answer: with the extractive default it reads with stuff.
        reader=reader_name(settings, rag.reader if rag else None, model_chosen=bool(model_id)),
        gen={
            "max_new_tokens": limit,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "stop": body.stop_list,
            "seed": body.seed,
            "min_new_tokens": body.min_tokens,
        },
    )
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await _stream(ctx, areq, model_id, deadline, rid, created, body.model, record, include_usage, id_headers, started)
    answer = await ctx.backend.answer(areq, model_id, deadline=deadline)
    if "error" in answer:
        raise APIError.from_dict(answer["error"])
    await _log_answer(ctx, record, answer, started)
    return JSONResponse(fmt.chat_completion(rid, body.model, created, answer, variant=record["variant"]), headers=id_headers)


def _user_of(body: ChatCompletionRequest, request: Request) -> str | None:
    """Who the split keeps sticky: the OpenAI ``user``, else ``x-ragops-user``, else the API key."""
    if body.user:
        return body.user
    if header := request.headers.get(USER_HEADER):
        return header[:512]
    token = bearer_token(request.headers.get("authorization"))
    # The key's digest, never the key: the same key is the same user, nothing secret is kept.
    return f"key:{hashlib.sha256(token.encode()).hexdigest()[:16]}" if token else None


async def _log_answer(ctx: IngressContext, record: dict[str, Any], answer: dict[str, Any], started: float) -> None:
    """Write the request log line (before the client can send feedback on it) and metrics."""
    full = {
        **record,
        "status": "ok",
        "latency_s": round(time.perf_counter() - started, 4),
        "passages": answer.get("passages", []),
        "answer": answer.get("answer", ""),
        "citations": answer.get("citations", []),
        "usage": answer.get("usage", {}),
        "finish_reason": answer.get("finish_reason"),
        "reader": answer.get("reader"),
        "grounded": answer.get("grounded"),
        "abstained": answer.get("abstained", False),
    }
    ctx.metrics.observe_answer(record["requested_model"], answer, variant=record["variant"])
    try:
        await asyncio.to_thread(ctx.feedback.log_request, full)
    except OSError as exc:  # the answer is still good; feedback on it will 404
        log.error("could not write the request log: %s", exc)


async def _log_failure(ctx: IngressContext, record: dict[str, Any], err: APIError, started: float) -> None:
    """Log a routed request that failed (the A/B report's error rate); feedback on it stays a 404."""
    full = {**record, "status": "error", "error": {"status": err.status, "code": err.code},
            "latency_s": round(time.perf_counter() - started, 4)}  # fmt: skip
    try:
        await asyncio.to_thread(ctx.feedback.log_request, full)
    except OSError as exc:
        log.error("could not write the request log: %s", exc)


async def _stream(
    ctx: IngressContext,
    areq: AnswerRequest,
    model_id: str,
    deadline: Deadline,
    rid: str,
    created: int,
    model: str,
    record: dict[str, Any],
    include_usage: bool,
    id_headers: dict[str, str],
    started: float,
) -> Response:
    items = ctx.backend.answer_stream(areq, model_id, deadline=deadline)
    # The first item is awaited before any byte is sent, so an overload, a timeout or a bad
    # adapter before the first token is a proper status code rather than an event.
    try:
        first = await items.__anext__()
    except StopAsyncIteration:
        raise APIError(500, "the generator ended without an answer", type="server_error", code="internal_error") from None
    if "error" in first:
        await items.aclose()
        raise APIError.from_dict(first["error"])

    async def events() -> AsyncIterator[str]:
        item: dict[str, Any] = first
        try:
            yield fmt.sse(fmt.chunk(rid, model, created, {"role": "assistant", "content": ""}))
            while True:
                if "delta" in item:
                    yield fmt.sse(fmt.chunk(rid, model, created, {"content": item["delta"]}))
                elif "final" in item:
                    answer = item["final"]
                    await _log_answer(ctx, record, answer, started)
                    yield fmt.sse(fmt.final_chunk(rid, model, created, answer, variant=record["variant"]))
                    if include_usage:
                        yield fmt.sse(fmt.usage_chunk(rid, model, created, answer))
                    break
                elif "error" in item:
                    failed = APIError.from_dict(item["error"])
                    await _log_failure(ctx, record, failed, started)
                    yield fmt.sse(failed.body())
                    break
                item = await items.__anext__()
        except StopAsyncIteration:
            failed = APIError(500, "the answer stream ended early", type="server_error")
            await _log_failure(ctx, record, failed, started)
            yield fmt.sse(failed.body())
        except APIError as err:  # e.g. the time limit passed mid-answer: the status is sent already
            await _log_failure(ctx, record, err, started)
            yield fmt.sse(err.body())
        finally:
            await items.aclose()
        yield fmt.DONE

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **id_headers}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
