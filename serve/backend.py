"""How the ingress reaches the other deployments: handle calls with deadlines and back-pressure.

:class:`HandleBackend` wraps the Ray Serve :class:`DeploymentHandle` of each deployment. Every
call runs under the request's deadline (``asyncio.wait_for``; on expiry the call is cancelled
on the replica too, freeing its slot) and turns Ray Serve's refusals into API errors: a full
queue (:class:`~ray.serve.exceptions.BackPressureError`, raised when ``max_queued_requests``
is reached) or an unavailable deployment becomes a 503 with ``Retry-After``; errors raised by
a replica become 400/404/503 by their library type. The HTTP layer
(:mod:`ragops.serve.http_app`) only sees this class's small async API, so it can be tested
against a fake backend without Ray.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import contextmanager
from typing import Any

from ragops.config import RetrievalConfig
from ragops.serve.errors import APIError, from_ragops_error, overloaded, timed_out
from ragops.serve.metrics import ServeMetrics
from ragops.tracking import telemetry

log = logging.getLogger(__name__)


class Deadline:
    """The time left to one request (``serve.request_timeout_s`` or less)."""

    def __init__(self, seconds: float) -> None:
        self.limit_s = seconds
        self._loop = asyncio.get_running_loop()
        self._end = self._loop.time() + seconds

    def remaining(self) -> float:
        """Seconds left; raises the timeout error when none are."""
        left = self._end - self._loop.time()
        if left <= 0:
            raise timed_out(self.limit_s)
        return left


def candidates_to_fetch(k: int, candidates: int) -> int:
    """Hits the retriever fetches for the reranker to keep ``k``: ``max(k, candidates)``, as
    :meth:`ragops.retrieval.search.Retriever.search_batch` fetches before reranking."""
    return max(k, candidates) if k >= 1 else k  # k < 1 reaches the retriever as is: its error


async def until_assigned(response: Any, stream: bool = False) -> None:
    """Wait until Ray Serve's router has handed a handle call to a replica.

    Until then the call waits in the handle's queue (every replica is at its
    ``max_ongoing_requests``; ``max_queued_requests`` bounds that queue). Ray Serve's
    ``_to_object_ref`` / ``_to_object_ref_gen`` (developer API) return exactly then; a
    handle that passes results by value (the gRPC transport) has no ObjectRef, so its
    replica-assignment future is awaited directly. Awaiting the response afterwards reuses
    the assignment: nothing is sent twice.
    """
    if getattr(response, "by_reference", True):
        await (response._to_object_ref_gen() if stream else response._to_object_ref())
    else:
        await response._fetch_future_result_async()


@contextmanager
def _ending(span: Any):  # type: ignore[no-untyped-def]
    """End ``span`` when the block ends; an exception (not a cancellation) is recorded on it."""
    try:
        yield
    except Exception as exc:
        telemetry.record_error(span, exc)
        raise
    finally:
        span.end()


class Downstream:
    """Calls to one deployment, counted in ``ragops_downstream_inflight_calls`` and, while
    they wait for a replica, in ``ragops_queue_depth``.

    Args:
        name: Deployment label for metrics and messages.
        handle: Its DeploymentHandle.
        metrics: The ingress replica's metrics.
        retry_after_s: ``Retry-After`` of the 503 when its queue is full.
    """

    def __init__(self, name: str, handle: Any, metrics: ServeMetrics, retry_after_s: int) -> None:
        self.name = name
        self.handle = handle
        self.metrics = metrics
        self.retry_after_s = retry_after_s

    def _method(self, method: str, model_id: str | None, stream: bool = False) -> Any:
        h = self.handle
        opts: dict[str, Any] = {"method_name": method}
        if model_id:
            opts["multiplexed_model_id"] = model_id
        if stream:
            opts["stream"] = True
        return h.options(**opts)

    def _translate(self, exc: BaseException) -> APIError:
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        if isinstance(exc, APIError):
            return exc
        if isinstance(exc, BackPressureError) or isinstance(getattr(exc, "cause", None), BackPressureError):
            self.metrics.rejections.labels("overloaded").inc()
            return overloaded(self.retry_after_s, f"the {self.name}")
        if isinstance(exc, DeploymentUnavailableError):
            return overloaded(self.retry_after_s, f"the {self.name} (unavailable)")
        api = from_ragops_error(exc)
        if api.status >= 500:
            log.error("%s call failed: %s", self.name, exc)
        return api

    @contextmanager
    def _counted(self, gauge: Any):  # type: ignore[no-untyped-def]
        gauge = gauge.labels(self.name)
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()

    def _inflight(self):  # type: ignore[no-untyped-def]
        return self._counted(self.metrics.downstream_inflight)

    def _queued(self):  # type: ignore[no-untyped-def]
        return self._counted(self.metrics.queue_depth)

    async def _result(self, response: Any) -> Any:
        with self._queued():
            await until_assigned(response)
        return await response

    def _span(self, method: str, model_id: str | None) -> Any:
        attrs = {"ragops.deployment": self.name, "rpc.method": method, "ragops.model_id": model_id or None}
        return telemetry.start_span(f"{self.name}.{method}", attrs, kind=telemetry.SpanKind.CLIENT)

    @staticmethod
    def _traced(kwargs: dict[str, Any], span: Any) -> dict[str, Any]:
        # The replica opens its span under this one (see ragops.tracking.telemetry).
        carrier = telemetry.inject(span)
        return {**kwargs, "trace_context": carrier} if carrier else kwargs

    async def call(self, method: str, *args: Any, deadline: Deadline, model_id: str | None = None, **kwargs: Any) -> Any:
        """Call ``method`` and await its result within the deadline (one CLIENT span)."""
        span = self._span(method, model_id)
        with _ending(span):
            return await self._call(method, args, self._traced(kwargs, span), deadline, model_id)

    async def _call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], deadline: Deadline,
                    model_id: str | None) -> Any:  # fmt: skip
        response = self._method(method, model_id).remote(*args, **kwargs)
        with self._inflight():
            try:
                return await asyncio.wait_for(self._result(response), deadline.remaining())
            except (TimeoutError, asyncio.TimeoutError):
                response.cancel()  # free the replica's slot: nobody waits for this answer any more
                self.metrics.rejections.labels("timeout").inc()
                raise timed_out(deadline.limit_s) from None
            except asyncio.CancelledError:
                response.cancel()  # the client went away
                raise
            except APIError:
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to an API error
                raise self._translate(exc) from None

    async def stream(self, method: str, *args: Any, deadline: Deadline, model_id: str | None = None,
                     **kwargs: Any) -> AsyncIterator[Any]:  # fmt: skip
        """Iterate a streaming method's items, each within the deadline (one CLIENT span)."""
        span = self._span(method, model_id)
        gen = self._method(method, model_id, stream=True).remote(*args, **self._traced(kwargs, span))
        with self._inflight(), _ending(span):
            try:
                with self._queued():
                    await asyncio.wait_for(until_assigned(gen, stream=True), deadline.remaining())
                while True:
                    try:
                        item = await asyncio.wait_for(gen.__anext__(), deadline.remaining())
                    except StopAsyncIteration:
                        return
                    yield item
            except (TimeoutError, asyncio.TimeoutError):
                gen.cancel()
                self.metrics.rejections.labels("timeout").inc()
                raise timed_out(deadline.limit_s) from None
            except (asyncio.CancelledError, GeneratorExit):
                gen.cancel()
                raise
            except APIError:
                gen.cancel()
                raise
            except Exception as exc:  # noqa: BLE001
                gen.cancel()
                raise self._translate(exc) from None


class HandleBackend:
    """The deployments behind the ingress, reached through their handles.

    With a reranker (``retrieval.rerank.model`` set) a search is two calls: the retriever
    fetches ``max(k, retrieval.rerank.candidates)`` hits without reranking, the reranker
    orders them and keeps ``k`` (what ``ragops search`` does in one process); neighbour
    expansion for answering comes after reranking, as in the library's pipeline.

    Args:
        embedder, retriever, generator: DeploymentHandles.
        metrics: The ingress replica's metrics.
        retry_after_s: ``Retry-After`` for 503 answers.
        reranker: The reranker's DeploymentHandle; None when reranking is off.
        retrieval: Retrieval settings (default ``k``, rerank candidates, neighbour
            expansion); needed with a reranker.
    """

    def __init__(
        self,
        embedder: Any,
        retriever: Any,
        generator: Any,
        metrics: ServeMetrics,
        retry_after_s: int,
        reranker: Any = None,
        retrieval: RetrievalConfig | None = None,
    ) -> None:
        if reranker is not None and retrieval is None:
            raise ValueError("a reranker needs the retrieval settings (k, rerank.candidates)")
        self.embedder = Downstream("embedder", embedder, metrics, retry_after_s)
        self.retriever = Downstream("retriever", retriever, metrics, retry_after_s)
        self.generator = Downstream("generator", generator, metrics, retry_after_s)
        self.reranker = Downstream("reranker", reranker, metrics, retry_after_s) if reranker is not None else None
        self.retrieval = retrieval

    async def encode_query(self, query: str, *, deadline: Deadline) -> Any:
        """Dense + BM25 query vectors (an ``EncodedQuery``)."""
        return await self.embedder.call("encode_query", query, deadline=deadline)

    async def embed(self, texts: list[str], input_type: str, *, deadline: Deadline) -> dict[str, Any]:
        """``{"vectors": [[...]], "tokens": int}`` for /v1/embeddings."""
        return await self.embedder.call("embed", texts, input_type, deadline=deadline)

    async def search(self, query: str, encoded: Any, params: dict[str, Any], *, deadline: Deadline) -> Any:
        """A ``SearchResult`` (retrieval only; reranked when a reranker is configured)."""
        if self.reranker is None:
            return await self.retriever.call("search", query, encoded, params, deadline=deadline)
        assert self.retrieval is not None
        k = params.get("k") or self.retrieval.k
        fetch = candidates_to_fetch(k, self.retrieval.rerank.candidates)
        found = await self.retriever.call("search", query, encoded, {**params, "k": fetch}, deadline=deadline)
        return await self.reranker.call("rerank", query, found, k, deadline=deadline)

    async def retrieve(self, query: str, encoded: Any, params: dict[str, Any], *, deadline: Deadline) -> Any:
        """A ``SearchResult`` with neighbour expansion, for answering."""
        if self.reranker is None:
            return await self.retriever.call("retrieve", query, encoded, params, deadline=deadline)
        assert self.retrieval is not None
        result = await self.search(query, encoded, params, deadline=deadline)
        if self.retrieval.expand_neighbors > 0 and result.hits:
            result = await self.retriever.call("expand", result, deadline=deadline)
        return result

    async def answer(self, request: Any, model_id: str, *, deadline: Deadline) -> dict[str, Any]:
        """A whole answer (batched on the generator) or ``{"error": ...}``."""
        return await self.generator.call("answer", request, deadline=deadline, model_id=model_id)

    def answer_stream(self, request: Any, model_id: str, *, deadline: Deadline) -> AsyncIterator[dict[str, Any]]:
        """``{"delta"}`` items, then ``{"answer"}`` (or ``{"error"}``)."""
        return self.generator.stream("answer_stream", request, deadline=deadline, model_id=model_id)

    async def retriever_health(self, *, deadline: Deadline) -> dict[str, Any]:
        """The retriever's view of the vector store."""
        return await self.retriever.call("health", deadline=deadline)

    async def generator_info(self, *, deadline: Deadline) -> dict[str, Any]:
        """The base generator's engine, model and why that engine was picked."""
        return await self.generator.call("info", deadline=deadline)

    async def reload(self, *, deadline: Deadline) -> dict[str, Any]:
        """Reopen the vector store (admin)."""
        return {"retriever": await self.retriever.call("reload", deadline=deadline)}
