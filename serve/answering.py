"""Answering on a generator replica, without Ray: context → reader → (batched) generation.

The generator deployment calls these functions; they compose the retrieval stages' own code
(:func:`~ragops.retrieval.context.assemble_context`, :func:`~ragops.retrieval.rag.reader_for`,
:class:`~ragops.retrieval.rag.AnswerStream`) exactly as :class:`~ragops.retrieval.rag.RAGPipeline`
does, so a served answer equals ``ragops ask`` on the same passages.

Dynamic batching needs one thing the readers do not offer: building the prompt without
generating. :class:`DeferredGenerator` stands in for the generator inside a reader: the reader
fits the passages, builds its prompt and calls ``stream(messages)``; the stand-in records the
prompt and returns a stream that replays a result provided later. The batch's prompts then go
through :meth:`Generator.generate_batch` in one left-padded batch, each result is handed back,
and the reader finishes as usual (citations parsed, timings, :class:`Answer`). Only the stuff
reader batches this way; the FiD reader already decodes one batch per question (a row per
passage) and runs on its own.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Generator as PyGenerator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ragops.config import Settings
from ragops.retrieval.context import assemble_context
from ragops.retrieval.decoding import GenerationResult, ResultStream
from ragops.retrieval.generator_base import GeneratorBase
from ragops.retrieval.rag import AnswerStream, reader_for
from ragops.retrieval.search import SearchResult
from ragops.serve.errors import APIError, from_ragops_error

log = logging.getLogger(__name__)

#: Generation options a request may set (the Generator's keyword names).
GEN_OPTIONS = ("max_new_tokens", "temperature", "top_p", "stop", "seed", "min_new_tokens")


@dataclass
class AnswerRequest:
    """What the generator needs to answer one question.

    Attributes:
        question: What the reader is asked (the user's question, earlier turns prepended
            when ``serve.history_turns`` > 0).
        search: The retriever's result (hits already expanded with neighbours).
        reader: ``stuff`` or ``fid``; None takes ``generator.reader``.
        gen: Generation options (see :data:`GEN_OPTIONS`); None values take the config's.
    """

    question: str
    search: SearchResult
    reader: str | None = None
    gen: dict[str, Any] = field(default_factory=dict)

    def options(self) -> dict[str, Any]:
        """The generation options that are set."""
        return {k: v for k, v in self.gen.items() if k in GEN_OPTIONS and v is not None}


class DeferredGenerator:
    """A :class:`Generator` stand-in that records a reader's prompt instead of generating.

    Token counting and truncation (which readers use to fit passages) go to the real
    generator. ``stream`` records ``messages`` and options and returns a stream that yields
    :attr:`result`'s text once :attr:`result` has been set.
    """

    def __init__(self, generator: GeneratorBase) -> None:
        self._generator = generator
        self.messages: list[dict[str, str]] | None = None
        self.options: dict[str, Any] = {}
        self.result: GenerationResult | None = None

    @property
    def cfg(self) -> Any:
        """The real generator's config."""
        return self._generator.cfg

    def count_tokens(self, text: str) -> int:
        """See :meth:`Generator.count_tokens`."""
        return self._generator.count_tokens(text)

    def truncate_text(self, text: str, max_tokens: int) -> str:
        """See :meth:`Generator.truncate_text`."""
        return self._generator.truncate_text(text, max_tokens)

    def stream(self, messages: Sequence[Mapping[str, str]], **options: Any) -> ResultStream[GenerationResult]:
        """Record the prompt; the returned stream replays :attr:`result` when iterated."""
        self.messages = [dict(m) for m in messages]
        self.options = options

        def replay() -> PyGenerator[str, None, GenerationResult]:
            if self.result is None:
                raise RuntimeError("the deferred generation has no result yet")
            if self.result.text:
                yield self.result.text
            return self.result

        return ResultStream(replay())

    def stream_fused(self, *args: Any, **kwargs: Any) -> ResultStream[GenerationResult]:
        """Fused decoding is not deferred (the FiD reader runs on its own)."""
        raise NotImplementedError("fused decoding is not batched across requests")


def start_answer(generator: Any, settings: Settings, req: AnswerRequest) -> AnswerStream:
    """Assemble the passages and start the reader: an answer stream (deltas, then ``.answer``).

    ``generator`` is a :class:`Generator` or a :class:`DeferredGenerator`. Prefill happens on
    the first ``next()``; errors in the prompt or the options raise here.
    """
    started = time.perf_counter()
    reader = reader_for(settings, generator, req.reader)  # validate before any work (sentence scorer shared per process)
    passages = assemble_context(req.search.hits, store=None, settings=settings, count_tokens=generator.count_tokens)
    return AnswerStream(req.question, req.search, reader.stream(req.question, passages, **req.options()), started)


def answer_dict(stream: AnswerStream) -> dict[str, Any]:
    """The finished answer as the ingress consumes it (passages with their text included)."""
    assert stream.answer is not None
    d = stream.answer.to_dict(with_passages=True)
    d["query_truncated"] = stream.answer.query_truncated
    return d


def error_dict(exc: BaseException) -> dict[str, Any]:
    """An error handed back as data (exceptions lose their type across Ray otherwise)."""
    api = exc if isinstance(exc, APIError) else from_ragops_error(exc)
    if api.status >= 500:
        log.exception("answering failed", exc_info=exc)
    return {"error": api.to_dict()}


def _batch_key(req: AnswerRequest, index: int, generator: GeneratorBase) -> str:
    opts = req.options()
    temperature = opts.get("temperature", generator.cfg.temperature)
    if temperature > 0 and "seed" in opts:
        # A batch shares one seeded sampler: a seeded sample is reproducible only alone.
        return f"alone:{index}"
    return json.dumps(opts, sort_keys=True)


def answer_batch(generator: GeneratorBase, settings: Settings, requests: Sequence[AnswerRequest]) -> list[dict[str, Any]]:
    """Answer several requests; stuff-reader requests with equal options share one batch.

    Returns:
        One dict per request, in order: an answer (see :func:`answer_dict`, plus ``batch_size``:
        how many answers were decoded together) or ``{"error": ...}``.
    """
    results: list[dict[str, Any] | None] = [None] * len(requests)
    groups: dict[str, list[tuple[int, DeferredGenerator, AnswerStream]]] = {}
    for i, req in enumerate(requests):
        try:
            # Only the stuff reader batches; others (and unknown names: start_answer rejects them) run alone.
            if (req.reader or settings.generator.reader) != "stuff":
                results[i] = _answer_alone(generator, settings, req)
                continue
            deferred = DeferredGenerator(generator)
            stream = start_answer(deferred, settings, req)
            groups.setdefault(_batch_key(req, i, generator), []).append((i, deferred, stream))
        except Exception as exc:  # noqa: BLE001 - one bad request must not fail the batch
            results[i] = error_dict(exc)
    for members in groups.values():
        # A reader that abstained (weak evidence) built no prompt: its answer is already final.
        for i, deferred, stream in members:
            if deferred.messages is None:
                results[i] = _finish(stream, 1)
        members = [m for m in members if m[1].messages is not None]
        if not members:
            continue
        try:
            outputs = generator.generate_batch([d.messages for _, d, _ in members], **members[0][1].options)  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001
            for i, _, _ in members:
                results[i] = error_dict(exc)
            continue
        for (i, deferred, stream), output in zip(members, outputs, strict=True):
            deferred.result = output
            results[i] = _finish(stream, len(members))
    return [r if r is not None else error_dict(RuntimeError("no result")) for r in results]


def _finish(stream: AnswerStream, batch_size: int) -> dict[str, Any]:
    """Run a started answer to its end: the answer dict, or the error as data."""
    try:
        for _ in stream:
            pass
        return {**answer_dict(stream), "batch_size": batch_size}
    except Exception as exc:  # noqa: BLE001 - one bad request must not fail the batch
        return error_dict(exc)


def _answer_alone(generator: GeneratorBase, settings: Settings, req: AnswerRequest) -> dict[str, Any]:
    return _finish(start_answer(generator, settings, req), 1)
