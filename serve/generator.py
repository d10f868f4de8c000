"""Generator deployment: batched and streamed answers, LoRA adapters multiplexed.

* Non-streaming answers go through ``@serve.batch``: concurrent requests are answered by one
  :meth:`Generator.generate_batch` call (see :mod:`ragops.serve.answering`). Ray Serve splits
  a batch by multiplexed model id, so a batch never mixes adapters. The batch handler passes
  its requests to a :class:`~ragops.serve.scheduler.BatchScheduler`, so that requests arriving
  while a batch runs are decoded together in the next one instead of in a string of small
  batches (Ray Serve forms batches eagerly; see that module).
* Streaming answers run the reader's stream; every decoding step is one task on the replica's
  single model thread, so concurrent streams (and batches) interleave token by token instead
  of waiting for each other to finish.
* Adapters: the multiplexed model id is a served adapter name or a registry artifact name
  (see :mod:`ragops.serve.models`); the loader builds a :class:`Generator` whose
  ``cfg.adapter`` is that adapter (on the base model it was trained on) and keeps at most
  ``serve.generator.max_adapters_per_replica`` of them (LRU, Ray Serve's multiplexing).

The model is not thread-safe and, on a CPU, two concurrent forward passes only thrash the
cores, hence one model thread per replica; loading an adapter uses a second thread so
answers on already-loaded models keep flowing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from ragops.retrieval.engines import generator_for
from ragops.retrieval.generator_base import GeneratorBase
from ragops.serve.answering import AnswerRequest, answer_batch, answer_dict, error_dict, start_answer
from ragops.serve.models import BASE, ModelCatalog
from ragops.serve.replica import replica_settings
from ragops.serve.scheduler import BatchScheduler
from ragops.serve.tracing import record_generation
from ragops.tracking import telemetry

log = logging.getLogger(__name__)


@serve.deployment(name="Generator")
class GeneratorDeployment:
    """Answers from retrieved passages with the base model or a LoRA adapter.

    Args:
        settings: The app's settings as a dict.
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = replica_settings(settings, "generator")
        cfg = self.settings.serve.generator
        self.catalog = ModelCatalog(self.settings)
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self._load_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load-adapter")
        self.base = generator_for(self.settings)
        self.base.warm_up()
        # An engine that batches concurrent calls itself (llama.cpp, vLLM) gets them concurrently:
        # a step thread per in-flight request, all feeding the engine's one decode loop.
        self._step_thread = (
            ThreadPoolExecutor(max_workers=4 * cfg.max_batch_size, thread_name_prefix="stream")
            if self.base.concurrent else self._model_thread
        )
        self._hold_file = cfg.test_hold_file
        self._answer_batch.set_max_batch_size(cfg.max_batch_size)
        self._answer_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self._scheduler: BatchScheduler[AnswerRequest] = BatchScheduler(self._run_batch, cfg.max_batch_size)

        async def load_adapter_generator(model_id: str) -> GeneratorBase:
            return await self._load(model_id)

        # Decorated here (not on the class) so the cache size comes from the config.
        self._adapter = serve.multiplexed(max_num_models_per_replica=cfg.max_adapters_per_replica)(load_adapter_generator)

    async def _load(self, model_id: str) -> GeneratorBase:
        loop = asyncio.get_running_loop()
        # Registry look-ups (and downloads from a remote registry) are I/O: off the event loop.
        gen_cfg = await loop.run_in_executor(self._load_thread, self.catalog.generator_config, model_id)
        gen = await loop.run_in_executor(self._load_thread, generator_for, self.settings, gen_cfg)
        await loop.run_in_executor(self._load_thread, gen.warm_up)
        log.info("loaded model %s (%s on %s, engine %s)", model_id, gen_cfg.adapter, gen_cfg.model, gen.engine)
        return gen

    async def _generator(self, model_id: str | None = None) -> GeneratorBase:
        """The base model or the adapter ``model_id`` (default: this request's multiplexed id)."""
        if model_id is None:  # BASE is "", so test for None, not falsiness
            model_id = serve.get_multiplexed_model_id()
        return self.base if model_id == BASE else await self._adapter(model_id)

    async def _run(self, fn: Any, *args: Any, gen: GeneratorBase | None = None) -> Any:
        pool = self._step_thread if gen is not None and gen.concurrent else self._model_thread
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def _hold(self) -> None:
        # TEST HOOK (serve.generator.test_hold_file): lets tests keep requests in flight.
        while self._hold_file is not None and self._hold_file.exists():
            await asyncio.sleep(0.05)

    async def answer(self, request: AnswerRequest, trace_context: dict[str, str] | None = None) -> dict[str, Any]:
        """A whole answer (``Answer.to_dict(with_passages=True)``) or ``{"error": ...}``; batched."""
        model = serve.get_multiplexed_model_id() or self.settings.generator.model
        with telemetry.span("generator.answer", {"gen_ai.request.model": model}, carrier=trace_context,
                            kind=telemetry.SpanKind.SERVER) as current:  # fmt: skip
            await self._hold()
            result = await self._answer_batch(request)
            answer = await result  # the scheduler's future for this request
            record_generation(answer, model, current)
            return answer

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _answer_batch(self, requests: list[AnswerRequest]) -> list[asyncio.Future]:
        # Collects concurrent requests (Ray Serve splits batches by multiplexed model id) and
        # hands them to the scheduler, which merges whatever waits when the model is free.
        return self._scheduler.submit(serve.get_multiplexed_model_id(), requests)

    async def _run_batch(self, model_id: str, requests: list[AnswerRequest]) -> list[dict[str, Any]]:
        try:
            gen = await self._generator(model_id)
        except Exception as exc:  # noqa: BLE001 - e.g. an adapter that does not load: each caller's error
            return [error_dict(exc)] * len(requests)
        return await self._run(answer_batch, gen, self.settings, requests, gen=gen)

    async def answer_stream(self, request: AnswerRequest, trace_context: dict[str, str] | None = None,
                            ) -> AsyncIterator[dict[str, Any]]:  # fmt: skip
        """``{"delta": text}`` items, then ``{"final": answer}``; ``{"error": ...}`` instead on failure."""
        model = serve.get_multiplexed_model_id() or self.settings.generator.model
        # Ended by hand: an async generator's steps do not share one context to restore.
        span = telemetry.start_span("generator.answer_stream", {"gen_ai.request.model": model}, carrier=trace_context,
                                    kind=telemetry.SpanKind.SERVER)  # fmt: skip
        items = self._answer_stream(request)
        try:
            async for item in items:
                if "final" in item:
                    record_generation(item["final"], model, span)
                elif "error" in item:
                    span.set_attribute("ragops.error", str(item["error"].get("message", ""))[:500])
                yield item
        finally:
            await items.aclose()  # now, not at garbage collection: a cancelled answer frees its KV cache
            span.end()

    async def _answer_stream(self, request: AnswerRequest) -> AsyncIterator[dict[str, Any]]:
        await self._hold()
        try:
            gen = await self._generator()
            stream = await self._run(start_answer, gen, self.settings, request, gen=gen)
        except Exception as exc:  # noqa: BLE001
            yield error_dict(exc)
            return
        try:
            while True:
                delta = await self._run(next, stream, None, gen=gen)
                if delta is None:
                    break
                yield {"delta": delta}
            yield {"final": answer_dict(stream)}
        except Exception as exc:  # noqa: BLE001
            yield error_dict(exc)
        finally:
            if stream.answer is None:
                # Cancelled (client gone, time limit): free the suspended decode loop's KV cache.
                self._model_thread.submit(stream.close)

    async def info(self, trace_context: dict[str, str] | None = None) -> dict[str, Any]:
        """The base generator's engine, model and the reason for the engine (``/healthz``)."""
        return self.base.describe()

    def check_health(self) -> None:
        """Serve's periodic health check: the base model is loaded."""
        if not self.base.loaded:
            raise RuntimeError("the generator model is not loaded")
