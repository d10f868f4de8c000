"""Continuous batching over one llama.cpp context: every active sequence advances in one batch.

llama-cpp-python's ``Llama`` class decodes one sequence at a time; serving it to concurrent
users means a lock and a queue, and total throughput stays that of one client. llama.cpp
itself decodes several sequences in one ``llama_decode`` call (the ``seq_id`` of each token in a
``llama_batch``; its own server does this), and a decode step of a small model is
memory-bound, so eight sequences cost little more than one. :class:`LlamaBatcher` is that
scheduler, on llama-cpp-python's low-level bindings:

* one background thread owns the context; callers :meth:`~LlamaBatcher.submit` a prompt and
  read text deltas from the request's queue, from any thread;
* each step puts one token of every decoding sequence and, with the room left in
  ``n_batch``, chunks of newly admitted prompts into the same batch (chunked prefill, so a
  long prompt never stalls the others' streams);
* the system prompt's KV cells are computed once into a reserved sequence and copied (shared,
  not duplicated: the KV cache is unified) into every request that starts with it;
* a request is admitted when a sequence slot and enough KV cells for its prompt and token
  budget are free, so a step never runs out of cache mid-answer;
* sampling runs per request with its own seeded generator, so a sampled reply does not depend
  on which other requests shared its batch.
"""

from __future__ import annotations

import ctypes
import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ragops.retrieval.decoding import DecodeOptions, RunStats, SequenceState, banned_ngram_tokens

log = logging.getLogger(__name__)

#: Sequence id that holds the shared system-prompt prefix.
PREFIX_SEQ = 0
#: Marks the end of a request's delta queue.
END = object()


@dataclass(eq=False)
class Request:
    """One submitted prompt and its decoding state (owned by the batcher's thread).

    Attributes:
        prompt: Prompt token ids.
        opts: Decoding options.
        seq: Text, stop and runaway handling of the reply.
        stats: Timings.
        prefix: Token ids of the prompt's system prefix to share (a prefix of ``prompt``), or ().
        out: Text deltas, then :data:`END` (or an exception), for the caller.
    """

    prompt: list[int]
    opts: DecodeOptions
    seq: SequenceState
    stats: RunStats
    prefix: tuple[int, ...] = ()
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    seq_id: int = -1
    fed: int = 0
    shared: int = 0
    cells: int = 0
    last_token: int = -1
    cancelled: bool = False
    rng: np.random.Generator | None = None


class LlamaBatcher:
    """The decode loop of one llama.cpp context (see the module docstring).

    Args:
        ctx: llama-cpp-python's ``LlamaContext`` (its ``ctx`` and ``memory`` are used).
        n_vocab: Vocabulary size (logit row length).
        eos_ids: Tokens that end a sequence.
        n_ctx: KV cells of the context.
        n_batch: Most tokens per ``llama_decode``.
        n_parallel: Most sequences decoded together (sequence ids 1..n_parallel).
    """

    def __init__(self, ctx: Any, *, n_vocab: int, eos_ids: frozenset[int], n_ctx: int, n_batch: int, n_parallel: int) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self._ctx = ctx
        self._n_vocab = n_vocab
        self._eos = np.array(sorted(eos_ids), dtype=np.int64)
        self._eos_set = eos_ids
        self._n_ctx = n_ctx
        self._n_batch = n_batch
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._free_ids = deque(range(1, n_parallel + 1))
        self._waiting: deque[Request] = deque()
        self._active: list[Request] = []
        self._prefix: tuple[int, ...] = ()
        #: The prefix that holds once the admitted requests have started (admission decides it).
        self._target_prefix: tuple[int, ...] = ()
        self._prefix_users = 0
        self._cells_reserved = 0
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        #: Counters for tests and metrics: decode calls, and tokens they carried.
        self.steps = 0
        self.max_sequences_in_step = 0
        self.prefix_builds = 0

    # -- caller side ---------------------------------------------------------------------

    def submit(self, request: Request) -> Request:
        """Queue ``request``; its deltas arrive on ``request.out``."""
        if request.opts.temperature > 0:
            request.rng = np.random.default_rng(request.opts.seed)
        with self._cv:
            if self._closed:
                raise RuntimeError("the llama.cpp generator is closed")
            self._waiting.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="llamacpp-decode", daemon=True)
                self._thread.start()
            self._cv.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Stop decoding ``request`` (a client that went away); frees its KV cells."""
        with self._cv:
            request.cancelled = True
            self._cv.notify()

    def close(self) -> None:
        """Stop the loop thread; pending requests end with an error."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._batch is not None:
            self._lib.llama_batch_free(self._batch)
            self._batch = None

    # -- the loop ------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                self._drop_cancelled()
                while not self._closed and not self._active and not self._waiting:
                    self._cv.wait()
                if self._closed:
                    self._fail_all(RuntimeError("the llama.cpp generator was closed"))
                    return
                admitted = self._admit()
            try:
                for req in admitted:
                    self._start(req)
                if self._active:
                    self._step()
            except Exception as exc:  # noqa: BLE001 - a failed decode fails its requests, the loop goes on
                log.exception("llama.cpp decode failed")
                with self._cv:
                    for req in list(self._active):
                        self._finish(req, exc)

    def _drop_cancelled(self) -> None:
        for req in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(req)
            req.out.put(END)
        for req in [r for r in self._active if r.cancelled]:
            self._finish(req, None)

    def _admit(self) -> list[Request]:
        """Move waiting requests to active while a sequence id and their KV cells are free."""
        admitted = []
        while self._waiting and self._free_ids:
            req = self._waiting[0]
            # One shared prefix at a time: a different one replaces it only when nobody uses it.
            share = bool(req.prefix) and (req.prefix == self._target_prefix or self._prefix_users == 0)
            shared = len(req.prefix) if share else 0
            cells = len(req.prompt) - shared + req.seq.max_tokens
            capacity = self._n_ctx - max(len(self._prefix), shared)
            if self._active and self._cells_reserved + cells > capacity:
                break  # wait for a sequence to finish (FIFO: no overtaking)
            self._waiting.popleft()
            req.seq_id, req.shared, req.cells = self._free_ids.popleft(), shared, cells
            self._cells_reserved += cells
            if shared:
                self._prefix_users += 1
                self._target_prefix = req.prefix
            self._active.append(req)
            admitted.append(req)
        return admitted

    def _start(self, req: Request) -> None:
        """Give a newly admitted request its shared prefix (computing it if it is new)."""
        if req.shared:
            if req.prefix != self._prefix:
                self._build_prefix(req.prefix)
            self._lib.llama_memory_seq_cp(self._ctx.memory, PREFIX_SEQ, req.seq_id, -1, -1)
        req.fed = req.shared

    def _build_prefix(self, prefix: tuple[int, ...]) -> None:
        """Prefill ``prefix`` into the reserved sequence (no logits needed)."""
        self._lib.llama_memory_seq_rm(self._ctx.memory, PREFIX_SEQ, -1, -1)
        self._prefix = ()
        for start in range(0, len(prefix), self._n_batch):
            chunk = prefix[start : start + self._n_batch]
            self._batch.n_tokens = 0
            for i, tok in enumerate(chunk):
                self._add(tok, start + i, PREFIX_SEQ, False)
            self._decode()
        self._prefix = prefix
        self.prefix_builds += 1

    def _add(self, token: int, pos: int, seq_id: int, logits: bool) -> int:
        b = self._batch
        j = b.n_tokens
        b.token[j] = token
        b.pos[j] = pos
        b.n_seq_id[j] = 1
        b.seq_id[j][0] = seq_id
        b.logits[j] = logits
        b.n_tokens = j + 1
        return j

    def _decode(self) -> None:
        rc = self._lib.llama_decode(self._ctx.ctx, self._batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} ({'no KV cache slot' if rc == 1 else 'error'})")
        self.steps += 1

    def _step(self) -> None:
        """One ``llama_decode``: a token of each decoding sequence plus prompt chunks."""
        self._batch.n_tokens = 0
        outputs: list[tuple[int, Request]] = []
        decoding = [r for r in self._active if r.fed >= len(r.prompt)]
        for req in decoding:
            pos = len(req.prompt) + req.seq.n_tokens - 1
            outputs.append((self._add(req.last_token, pos, req.seq_id, True), req))
        budget = self._n_batch - len(decoding)
        for req in self._active:
            if budget <= 0:
                break
            if req.fed >= len(req.prompt):
                continue
            chunk = req.prompt[req.fed : req.fed + budget]
            for i, tok in enumerate(chunk):
                last = req.fed + i == len(req.prompt) - 1
                j = self._add(tok, req.fed + i, req.seq_id, last)
                if last:
                    outputs.append((j, req))
            req.fed += len(chunk)
            budget -= len(chunk)
        self.max_sequences_in_step = max(self.max_sequences_in_step, len(outputs))
        self._decode()
        now = time.perf_counter()
        with self._cv:
            for j, req in outputs:
                if req.cancelled:
                    continue
                logits = np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self._ctx.ctx, j), shape=(self._n_vocab,))
                token = self._pick(logits, req)
                if req.stats.first_token_at is None:
                    req.stats.first_token_at = now
                delta = req.seq.push(token, token in self._eos_set)
                if delta:
                    req.out.put(delta)
                req.last_token = token
                if req.seq.done:
                    req.seq.finished_at = now
                    self._finish(req, None)

    def _pick(self, logits: np.ndarray, req: Request) -> int:
        """Penalties, EOS blocking, then greedy or temperature + nucleus sampling."""
        opts, hist = req.opts, req.seq.generated_ids
        edit = (hist and (opts.repetition_penalty != 1.0 or opts.no_repeat_ngram_size)) or (
            req.seq.n_tokens < opts.min_new_tokens
        )
        if edit:
            logits = np.array(logits, dtype=np.float32)  # a copy: the buffer is llama.cpp's
            if hist and opts.repetition_penalty != 1.0:
                ids = np.fromiter(set(hist), dtype=np.int64)
                vals = logits[ids]
                logits[ids] = np.where(vals > 0, vals / opts.repetition_penalty, vals * opts.repetition_penalty)
            banned = banned_ngram_tokens(hist, opts.no_repeat_ngram_size)
            if banned:
                logits[banned] = -math.inf
            if req.seq.n_tokens < opts.min_new_tokens and len(self._eos):
                logits[self._eos] = -math.inf
        if opts.temperature <= 0 or req.rng is None:
            return int(np.argmax(logits))
        return sample_top_p(logits, opts.temperature, opts.top_p, req.rng)

    def _finish(self, req: Request, error: BaseException | None) -> None:
        """Release a request's sequence and cells; end its queue (caller holds the lock)."""
        if req in self._active:
            self._active.remove(req)
            self._lib.llama_memory_seq_rm(self._ctx.memory, req.seq_id, -1, -1)
            self._free_ids.append(req.seq_id)
            self._cells_reserved -= req.cells
            if req.shared:
                self._prefix_users -= 1
        req.out.put(error if error is not None else END)

    def _fail_all(self, error: BaseException) -> None:
        for req in list(self._active):
            self._finish(req, error)
        while self._waiting:
            self._waiting.popleft().out.put(error)


def sample_top_p(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Sample a token at ``temperature`` from the smallest set holding ``top_p`` of the mass."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max()
    probs = np.exp(scaled)
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        sorted_p = probs[order]
        # Keep a token while the mass before it is below top_p (always keeps the first).
        keep = (np.cumsum(sorted_p) - sorted_p) < top_p
        kept = order[keep]
        p = probs[kept] / probs[kept].sum()
        return int(kept[rng.choice(len(kept), p=p)])
    return int(rng.choice(len(probs), p=probs))


def log_silently(level: int, text: bytes, user_data: Any) -> None:  # pragma: no cover - called from C
    """llama.cpp's log callback: its load chatter goes to our debug log, not to stderr."""
    log.debug("llama.cpp: %s", text.decode("utf-8", errors="replace").rstrip())


#: Kept alive for the process: llama.cpp holds a pointer to it.
_LOG_CALLBACK: Any = None


def silence_llama_log() -> None:
    """Route llama.cpp's logging (hundreds of lines per model load) to the debug log."""
    global _LOG_CALLBACK
    import llama_cpp

    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = llama_cpp.llama_log_callback(log_silently)
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))

