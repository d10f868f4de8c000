"""Query-embedder deployment: dense query vectors + BM25 vectors, and /v1/embeddings.

Wraps :class:`~ragops.retrieval.encoder.QueryEncoder` (the same encoder ``ragops search`` uses;
the live collection's, see :mod:`ragops.serve.live`) with Ray Serve dynamic batching: concurrent queries are encoded in one forward pass. Model
work runs on one thread per replica, so the event loop stays free to collect the next batch.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from ragops.embeddings import TextEmbedder
from ragops.errors import InputError
from ragops.retrieval.encoder import EncodedQuery, QueryEncoder
from ragops.serve.live import LiveEncoder
from ragops.serve.replica import replica_settings
from ragops.tracking import telemetry


@serve.deployment(name="QueryEmbedder")
class QueryEmbedder:
    """Encodes queries (batched) and embeds texts for ``/v1/embeddings``.

    Args:
        settings: The app's settings as a dict (``Settings.model_dump(mode='json')``).
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = replica_settings(settings, "embedder")
        cfg = self.settings.serve.embedder
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        # Follows the collection alias (`ragops index reembed`): see ragops.serve.live.
        self.live = LiveEncoder(self.settings)
        # Passage-side embeddings use the passage model; with a separate query tower that is
        # another model, loaded on the first passage request only.
        self._passages: TextEmbedder | None = None
        self._encode_batch.set_max_batch_size(cfg.max_batch_size)
        self._encode_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self._ready = True

    @property
    def encoder(self) -> QueryEncoder:
        """The query encoder of the live collection."""
        return self.live.current()[2]

    def _encode(self, queries: list[str]) -> list[EncodedQuery]:
        # One (collection, encoder) pair per batch: the vectors say which collection they fit.
        physical, _, encoder = self.live.current()
        encoded = encoder.encode_batch(queries)
        for q in encoded:
            q.collection = physical
        return encoded

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def encode_query(self, query: str, trace_context: dict[str, str] | None = None) -> EncodedQuery:
        """Dense + BM25 vectors of one query (batched with concurrent calls)."""
        with telemetry.span("embed.query", {"ragops.query_chars": len(query)}, carrier=trace_context, kind=telemetry.SpanKind.SERVER):
            result = await self._encode_batch(query)
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _encode_batch(self, queries: list[str]) -> list[EncodedQuery | Exception]:
        try:
            return await self._run(self._encode, queries)
        except InputError:
            # One bad query must not fail the others: encode them one by one.
            out: list[EncodedQuery | Exception] = []
            for q in queries:
                try:
                    out.extend(await self._run(self._encode, [q]))
                except InputError as exc:
                    out.append(exc)
            return out

    async def embed(self, texts: list[str], input_type: str = "passage", trace_context: dict[str, str] | None = None) -> dict[str, Any]:
        """Vectors for /v1/embeddings: ``{"vectors": [[float]], "tokens": int}``."""
        attrs = {"ragops.inputs": len(texts), "ragops.input_type": input_type}
        with telemetry.span("embed.texts", attrs, carrier=trace_context, kind=telemetry.SpanKind.SERVER):
            return await self._run(self._embed, texts, input_type)

    def _embed(self, texts: list[str], input_type: str) -> dict[str, Any]:
        if input_type == "query":
            model = self.encoder.embedder
            vectors = model.encode_queries(texts)
        else:
            if not self.settings.embedder.query_model:
                model = self.encoder.embedder  # the live passage model encodes both sides
            else:
                if self._passages is None:
                    self._passages = TextEmbedder(self.settings.embedder)
                model = self._passages
            vectors = model.encode_passages(texts)
        tokens = sum(len(ids) for ids in model.tokenizer(list(texts), add_special_tokens=True)["input_ids"])
        return {"vectors": vectors.tolist(), "tokens": tokens}

    def check_health(self) -> None:
        """Serve's periodic health check: the query model loaded (in the constructor)."""
        if not self._ready:
            raise RuntimeError("the query embedder is not loaded")
