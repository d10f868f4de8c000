"""Request-level continuous batching for the generator replica (asyncio, no Ray).

Ray Serve's ``@serve.batch`` forms a batch as soon as its first request arrives plus whatever
comes within ``batch_wait_timeout_s``, and queues the formed batch behind the running one. With
a model that takes seconds per batch, requests that arrive while a batch runs end up in a
string of small batches. :class:`BatchScheduler` coalesces instead: the ``@serve.batch``
handler hands its requests to the scheduler and returns at once; one worker task runs batches
one after another, each taking every request waiting at that moment (oldest first, one model
id per batch, at most ``max_batch_size``). A request whose caller gave up (cancelled future)
is skipped before its batch starts.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

Req = TypeVar("Req")
RunBatch = Callable[[str, list[Any]], Awaitable[list[Any]]]


@dataclass
class _Waiting(Generic[Req]):
    request: Req
    future: asyncio.Future
    seq: int


class BatchScheduler(Generic[Req]):
    """Runs batches one at a time, each of everything waiting (per model id, oldest first).

    Args:
        run_batch: ``async (model_id, requests) -> results`` (one result per request).
        max_batch_size: Most requests per batch.
    """

    def __init__(self, run_batch: RunBatch, max_batch_size: int) -> None:
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self._queues: dict[str, deque[_Waiting[Req]]] = {}
        self._seq = 0
        self._wakeup = asyncio.Event()  # binds no event loop until first awaited (Python 3.10+)
        self._worker: asyncio.Task | None = None

    def submit(self, model_id: str, requests: Sequence[Req]) -> list[asyncio.Future]:
        """Queue requests for ``model_id``; each future resolves to its result."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._loop())
        futures = []
        queue = self._queues.setdefault(model_id, deque())
        for req in requests:
            fut = loop.create_future()
            self._seq += 1
            queue.append(_Waiting(req, fut, self._seq))
            futures.append(fut)
        self._wakeup.set()
        return futures

    def _next_batch(self) -> tuple[str, list[_Waiting[Req]]] | None:
        for q in self._queues.values():
            while q and q[0].future.done():  # cancelled by a caller that gave up
                q.popleft()
        heads = [(q[0].seq, mid) for mid, q in self._queues.items() if q]
        if not heads:
            return None
        model_id = min(heads)[1]
        q = self._queues[model_id]
        batch: list[_Waiting[Req]] = []
        while q and len(batch) < self.max_batch_size:
            w = q.popleft()
            if not w.future.done():
                batch.append(w)
        return model_id, batch

    async def _loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while (picked := self._next_batch()) is not None:
                model_id, batch = picked  # never empty: _next_batch dropped done heads first
                try:
                    results = await self._run_batch(model_id, [w.request for w in batch])
                    if len(results) != len(batch):
                        raise RuntimeError(f"a batch of {len(batch)} requests returned {len(results)} results")
                except Exception as exc:  # noqa: BLE001 - every caller of the batch gets it; the loop goes on
                    log.exception("generator batch failed")
                    for w in batch:
                        if not w.future.done():
                            w.future.set_exception(exc)
                    continue
                for w, result in zip(batch, results, strict=True):
                    if not w.future.done():
                        w.future.set_result(result)
