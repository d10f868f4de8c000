"""Reranker deployment: cross-encoder ordering of retrieved candidates (optional).

Created by the app only when ``retrieval.rerank.model`` is set. The ingress asks the
retriever for ``max(k, retrieval.rerank.candidates)`` hits without reranking and sends them
here; this deployment orders them with the library's
:class:`~ragops.retrieval.rerank.Reranker` and keeps ``k``, which is what
:meth:`ragops.retrieval.search.Retriever.search` does in one process (``ragops search``): same
candidates, same cross-encoder, same ordering (ties keep the retrieval order), same scores.

Concurrent queries are scored together (``@serve.batch``: one ``Reranker.rerank_batch`` call,
one ``predict`` over every query's pairs). Sentence-transformers pads each predict batch to
its longest pair, so a score computed in a batch with other queries can differ from the
same query scored alone in the last float digits (the order does not, unless two candidates
tie to that precision). Model work runs on one thread per replica, so the event loop keeps
collecting the next batch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from ragops.retrieval.rerank import Reranker
from ragops.retrieval.search import SearchHit, SearchResult
from ragops.serve.replica import replica_settings
from ragops.tracking import telemetry


@serve.deployment(name="Reranker")
class RerankerDeployment:
    """Re-scores retrieved hits with the configured cross-encoder and keeps the best ``k``.

    Args:
        settings: The app's settings as a dict (``retrieval.rerank.model`` must be set).
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = replica_settings(settings, "reranker")
        cfg = self.settings.serve.reranker
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rerank")
        # The same construction as the library's Retriever: rerank settings, embedder's device.
        self.reranker = Reranker(self.settings.retrieval.rerank, device=self.settings.embedder.device)
        self.reranker.warm_up()
        self._rerank_batch.set_max_batch_size(cfg.max_batch_size)
        self._rerank_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    async def rerank(self, query: str, result: SearchResult, k: int, trace_context: dict[str, str] | None = None) -> SearchResult:
        """``result`` with its hits ordered by the cross-encoder, the best ``k`` kept.

        Hits get the cross-encoder score as ``score``, the retrieval score as
        ``retrieval_score`` and ranks ``1..k``; ``timings`` gain ``rerank_s`` (the batch's) and
        ``total_s`` includes it; ``reranked`` is True.
        """
        attrs = {"ragops.candidates": len(result.hits), "ragops.k": k}
        with telemetry.span("rerank", attrs, carrier=trace_context, kind=telemetry.SpanKind.SERVER):
            hits, seconds = await self._rerank_batch((query, list(result.hits)))
        timings = {**result.timings, "rerank_s": seconds}
        timings["total_s"] = float(result.timings.get("total_s", 0.0)) + seconds
        return dataclasses.replace(result, hits=hits[:k], timings=timings, reranked=True)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.005)
    async def _rerank_batch(
        self, items: list[tuple[str, list[SearchHit]]]
    ) -> list[tuple[list[SearchHit], float]]:
        started = time.perf_counter()
        queries = [q for q, _ in items]
        hit_lists = [h for _, h in items]
        loop = asyncio.get_running_loop()
        # top_k=None: every hit, ordered; each caller keeps its own k (ranks 1..k either way).
        # An error here reaches every caller of the batch (@serve.batch passes it on).
        ordered = await loop.run_in_executor(self._executor, self.reranker.rerank_batch, queries, hit_lists, None)
        seconds = time.perf_counter() - started
        return [(hits, seconds) for hits in ordered]
